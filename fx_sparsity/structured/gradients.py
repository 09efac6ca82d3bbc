"""``accumulate_gradients``: the loss gradients ``ChannelPruner(criterion="taylor")`` scores channels with."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import fx, nn

from fx_sparsity.meta import get_sparsifier
from fx_sparsity.structured.pruner import ChannelPruner
from fx_sparsity.utils.running import as_model_inputs, eval_mode
from passes.dependency import ChannelGroup
from passes.utils import get_tensor

__all__ = ["accumulate_gradients"]


def _taylor_tensors(gm: fx.GraphModule, groups: Iterable[ChannelGroup]) -> dict[str, torch.Tensor]:
    """Tensor FQN -> parameter, for every member (not a module) of ``groups`` that is a parameter needing grad."""
    found = {}
    for group in groups:
        for m in group.members:
            if m.kind == "module":
                continue
            tensor = get_tensor(gm, m.target)
            if isinstance(tensor, nn.Parameter) and tensor.requires_grad:
                found[m.target] = tensor
    return found


def accumulate_gradients(
    gm: fx.GraphModule, batches: Iterable[Any], loss_fn: Callable[[Any, Any], torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Sum the loss gradients of the pruned groups' parameters over ``batches``, for ``criterion="taylor"``.

    Each batch runs ``loss_fn(gm(*inputs), target)`` and ``torch.autograd.grad`` in eval
    mode (the prepared module shares its parameters and BatchNorm statistics with the
    user's model: no ``.grad`` is set and no statistic moves). The sums are kept by the
    module's ``ChannelPruner`` and used, then dropped, by its next ``step()``; a second call
    replaces them. Users who train ``gm`` themselves can skip this: ``step()`` then reads
    the parameters' ``.grad``.

    Args:
        gm: a module returned by ``ChannelPruner(criterion="taylor").prepare``.
        batches: an iterable of ``(inputs, target)`` pairs; ``inputs`` a tensor, a tuple of
            positional inputs or a dict of keyword inputs.
        loss_fn: ``loss_fn(output, target)`` returning a scalar tensor (e.g. ``nn.CrossEntropyLoss()``).

    Returns:
        tensor FQN -> summed gradient, for every parameter member of a pruned group.

    Raises:
        TypeError / ValueError: ``gm`` has no ChannelPruner, a batch is not an ``(inputs, target)``
            pair, ``batches`` is empty, or the loss is not a scalar; nothing is kept then.

    Example::

        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> pruner = ChannelPruner(0.5, criterion="taylor")
        >>> gm = pruner.prepare(model, example_inputs=torch.randn(2, 8))
        >>> grads = accumulate_gradients(gm, [(torch.randn(4, 8), torch.randn(4, 4))], nn.MSELoss())
        >>> sorted(grads)
        ['0.bias', '0.weight', '2.weight']
        >>> pruner.step()
    """
    pruner = get_sparsifier(gm)
    if not isinstance(pruner, ChannelPruner):
        raise ValueError(
            f"accumulate_gradients needs a module prepared by ChannelPruner, got one prepared by "
            f"{type(pruner).__name__}; use ChannelPruner(criterion='taylor').prepare(model, example_inputs=...)"
        )
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(output, target), got {type(loss_fn).__name__}")
    if batches is None or isinstance(batches, (torch.Tensor, str, bytes)) or not isinstance(batches, Iterable):
        raise TypeError(f"batches must be an iterable of (inputs, target) pairs, got {type(batches).__name__}")
    tensors = _taylor_tensors(gm, (pruner.channel_groups[i] for i in pruner.pruned_groups()))
    names, params = list(tensors), list(tensors.values())
    sums: list[torch.Tensor | None] = [None] * len(params)
    seen = 0
    with eval_mode(gm), torch.enable_grad():
        for batch in batches:
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise TypeError(
                    f"batch {seen} of batches must be an (inputs, target) pair, got {type(batch).__name__}"
                )
            args, kwargs = as_model_inputs(batch[0], f"inputs of batch {seen}")
            loss = loss_fn(gm(*args, **kwargs), batch[1])
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError(
                    f"loss_fn must return a scalar tensor, got {type(loss).__name__} "
                    f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''} at batch {seen}; reduce it"
                )
            grads = torch.autograd.grad(loss.reshape(()), params, allow_unused=True)
            sums = [s if g is None else g.detach() if s is None else s + g.detach() for s, g in zip(sums, grads)]
            seen += 1
    if not seen:
        raise ValueError("accumulate_gradients needs at least one batch; batches was empty")
    pruner.gradients = {name: s for name, s in zip(names, sums) if s is not None}
    return dict(pruner.gradients)
