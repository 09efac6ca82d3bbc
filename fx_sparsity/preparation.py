"""``prepare``: the compile-style entry point. The recipe's steps are in :mod:`fx_sparsity.sparsifier.preparing`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn

from fx_sparsity.config import SparsityConfig
from fx_sparsity.sparsifier.base import BaseSparsifier
from fx_sparsity.sparsifier.preparing import CaptureMethod
from fx_sparsity.sparsifier.weight_norm.sparsifier import WeightNormSparsifier

__all__ = ["prepare"]


def prepare(
    model: nn.Module,
    config: SparsityConfig = None,
    *,
    sparsifier: BaseSparsifier | None = None,
    example_inputs: Any = None,
    dynamic_shapes: Any = None,
    capture_method: CaptureMethod = "auto",
    leaf_modules: type[nn.Module] | Iterable[type[nn.Module] | str] = (),
    concrete_args: dict[str, Any] | None = None,
    mask_dtype: torch.dtype | None = None,
) -> fx.GraphModule:
    """Return a new ``GraphModule`` computing ``model`` with a mask on each selected weight.

    Capture (symbolic tracing, or ``torch.export`` when that fails and
    ``example_inputs`` are given), match Linear/Conv weights, select them by
    ``config`` and insert ``mul(weight, mask)`` nodes with all-ones mask buffers
    (or the config's initial ``"mask"``). ``model`` is not modified; its
    parameters are shared, not copied.

    Args:
        model: the module to sparsify.
        config: ``None`` selects every Linear and Conv weight; else a list of
            dicts (torch.ao.pruning form) or an FQN-keyed dict whose entries
            override the sparsifier's arguments (see :mod:`fx_sparsity.config`).
        sparsifier: the sparsifier to prepare (one not prepared yet);
            ``WeightNormSparsifier()`` when ``None``. Either way
            ``fx_sparsity.get_sparsifier(gm)`` returns it, ready for ``step()``.
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs (what a
            tokenizer returns), for the ``torch.export`` capture; the prepared module then takes
            batches in the same form (a Hugging Face model's cache is turned off on capture's copy,
            yours keeps its config: see :func:`passes.capture`).
        dynamic_shapes: for the ``torch.export`` capture; by default dim 0 of every
            tensor input, and the sequence length of token inputs (dim 1 of 2-D integer
            tensors such as ``input_ids``), are dynamic where export allows (else a
            warning says why).
        capture_method: ``"auto"`` (symbolic tracing; with ``example_inputs``, ``torch.export``
            when tracing fails, or when it hides weights in opaque calls that the export graph
            exposes, with a warning naming them), ``"symbolic_trace"`` or ``"export"``.
        leaf_modules, concrete_args: symbolic-tracing knobs.
        mask_dtype: the dtype of the mask buffers: ``None`` (default) for each weight's own dtype, as
            torch.ao.pruning keeps them (the fastest eager ``weight * mask``); ``torch.bool`` for one byte per
            weight (a quarter of an fp32 weight's memory; ``mul`` then promotes it, which costs time in eager mode);
            or another floating dtype.

    Weights of Linear/Conv-like modules that the graph gives no op for (hidden
    in a ``torch.fx.wrap``'ed function, inside a leaf module, ...) stay dense:
    ``get_unmatched(gm)`` lists them with the reason and the remedy, the
    sparsity table shows them, and a ``UserWarning`` names those the config selects.

    ``gm`` keeps a reference to ``model`` (not pickled) so that
    :func:`fx_sparsity.to_model` can return a pruned copy of its class.

    This is ``sparsifier.prepare(model, config, ...)``: the recipe's steps are in
    :mod:`fx_sparsity.sparsifier.preparing` (a ``ChannelPruner`` finds its channel groups
    between them, and needs ``example_inputs``).

    Returns:
        The prepared ``GraphModule``.

    Raises:
        TypeError / ValueError: bad arguments, a config entry that selects
            nothing or sets an unknown argument, hooks on a masked layer, tensors
            on the meta device (pointing to :func:`fx_sparsity.calibration.prepare_on_meta`);
            raised before anything is built.
        CaptureError: the model could not be captured.

    Example::

        >>> gm = prepare(nn.Sequential(nn.Linear(8, 8)), {"0": {"sparsity_level": 0.75}})
        >>> get_sparsifier(gm).step()
        >>> gm.get_buffer("0.weight_mask").mean().item()  # 1 = kept, in the weight's dtype
        0.25
    """
    if sparsifier is None:
        sparsifier = WeightNormSparsifier()
    elif not isinstance(sparsifier, BaseSparsifier):
        raise TypeError(
            f"sparsifier must be a BaseSparsifier instance such as WeightNormSparsifier(), got {type(sparsifier).__name__}"
        )
    return sparsifier.prepare(
        model,
        config,
        example_inputs=example_inputs,
        dynamic_shapes=dynamic_shapes,
        capture_method=capture_method,
        leaf_modules=leaf_modules,
        concrete_args=concrete_args,
        mask_dtype=mask_dtype,
    )
