"""Models on the meta device (no weight memory), prepared for streaming: :func:`prepare_on_meta`.

A model built under ``torch.device("meta")`` costs nothing, but capture needs tensors: a copy gets fake tensors
(shapes without data) in place of its meta ones, is captured and prepared as :func:`fx_sparsity.prepare` would
(symbolic tracing, or ``torch.export`` on ``example_inputs``: a transformers model), and the prepared module's
tensors go back to the meta device for :class:`fx_sparsity.calibration.streaming.WeightStreamer` to fill block by
block from a checkpoint. Non-persistent buffers, which no checkpoint holds (rotary embeddings' ``inv_freq``), are
computed on the copy with the model's own init (:func:`compute_buffers`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from fx_sparsity.preparation import prepare
from fx_sparsity.sparsifier.base import BaseSparsifier
from passes.utils import get_tensor, set_tensor, tensor_aliases

__all__ = ["compute_buffers", "meta_like", "prepare_on_meta"]


def meta_like(tensor: torch.Tensor) -> torch.Tensor:
    """A meta tensor of ``tensor``'s shape and dtype (a ``Parameter`` for a parameter, keeping ``requires_grad``)."""
    meta = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
    return nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta


def _unset_like(tensor: torch.Tensor) -> torch.Tensor | None:
    """A CPU tensor of ``tensor``'s shape and dtype holding a value no init computes (NaN, the dtype's minimum), or
    ``None`` for a dtype without one (bool)."""
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex:
        return torch.full(tensor.shape, float("nan"), dtype=tensor.dtype)
    if tensor.dtype == torch.bool:
        return None
    return torch.full(tensor.shape, torch.iinfo(tensor.dtype).min, dtype=tensor.dtype)


def _is_set(tensor: torch.Tensor) -> bool:
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex:
        return not bool(tensor.isnan().any())
    return not bool((tensor == torch.iinfo(tensor.dtype).min).all())


def compute_buffers(model: nn.Module) -> list[str]:
    """Compute, on the CPU, the non-persistent buffers of ``model`` that are on the meta device, with the model's own
    init: transformers' ``model._init_weights(module)`` (what ``from_pretrained`` runs for the buffers no checkpoint
    holds, such as rotary embeddings' ``inv_freq``, computed from the config). Modules holding real parameters are
    left alone (their init would overwrite them). Call it on a copy: ``model``'s buffers are replaced.

    Returns:
        The FQNs of the non-persistent meta buffers it could not compute (no such init, or one that left them unset).

    Example::

        >>> class Rotary(nn.Module):  # as transformers' rotary embeddings: a buffer computed, never saved
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.register_buffer("inv_freq", 1 / 2 ** torch.arange(4.0), persistent=False)
        ...     def _init_weights(self, module):
        ...         module.inv_freq.copy_(1 / 2 ** torch.arange(4.0))
        >>> with torch.device("meta"):
        ...     rotary = Rotary()
        >>> compute_buffers(rotary), rotary.inv_freq
        ([], tensor([1.0000, 0.5000, 0.2500, 0.1250]))
    """
    init = getattr(model, "_init_weights", None)
    left = []
    for fqn, module in model.named_modules():
        names = [n for n in sorted(module._non_persistent_buffers_set)
                 if isinstance(module._buffers.get(n), torch.Tensor) and module._buffers[n].is_meta]
        if not names:
            continue
        prefix = f"{fqn}." if fqn else ""
        saved = {n: module._buffers[n] for n in names}
        unset = {n: _unset_like(t) for n, t in saved.items()}
        if not callable(init) or not all(p.is_meta for p in module.parameters(recurse=False)):
            left += [prefix + n for n in names]
            continue
        for n, tensor in unset.items():
            if tensor is not None:
                module._buffers[n] = tensor
        try:
            with torch.no_grad():
                init(module)
        except Exception:  # not an init this module knows: the buffers stay for the user to set
            pass
        for n in names:
            if unset[n] is None or not _is_set(module._buffers[n]):
                module._buffers[n] = saved[n]
                left.append(prefix + n)
    return left


def prepare_on_meta(
    model: nn.Module, config: Any = None, *, sparsifier: BaseSparsifier | None = None, example_inputs: Any = None,
    **kwargs: Any
) -> fx.GraphModule:
    """``prepare`` for a model whose parameters are on the meta device (no weight memory).

    Capture refuses meta tensors, so a copy of ``model`` (meta tensors cost nothing to copy) gets fake
    tensors in their place (``torch._subclasses.FakeTensorMode``: shapes without data) and is captured as
    ``prepare`` would: by symbolic tracing, or with ``example_inputs`` by ``torch.export`` when tracing fails
    (a transformers model; ``capture_method="export"`` asks for it), with the same dynamic batch and sequence
    dimensions, keyword inputs and cache handling (see :func:`passes.capture`); neither runs a real forward. The
    prepared module's tensors, masks included, are then put on the meta device. Tensors already real in
    ``model`` (a non-persistent buffer the user materialised) stay shared, and the non-persistent buffers no
    checkpoint holds (rotary ``inv_freq``) are computed on the copy with the model's own init where it has one
    (:func:`compute_buffers`: transformers' ``_init_weights``). Give the result to ``prune_sequential(...,
    weights=SafetensorsWeights(...))``.

    Args:
        model: the module, built under ``torch.device("meta")`` (it is not modified).
        config, sparsifier: as for :func:`fx_sparsity.prepare`.
        example_inputs: real (small) example inputs for the export capture, as for :func:`fx_sparsity.prepare`: a
            tensor, a tuple, or a dict of keyword inputs (``{"input_ids": ..., "attention_mask": ...}``); the
            prepared module then takes the same form.
        kwargs: the other arguments of :func:`fx_sparsity.prepare`; ``mask_dtype`` defaults to ``torch.bool``
            here: streamed masks are transient, one byte per weight.

    Returns:
        The prepared ``GraphModule``, its weights and masks on the meta device (the computed buffers on the CPU).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``model`` has no meta tensor.
        CaptureError: the model could not be captured (as for :func:`fx_sparsity.prepare`).

    Example::

        >>> with torch.device("meta"):
        ...     big = nn.Sequential(nn.Linear(8192, 8192), nn.ReLU(), nn.Linear(8192, 8192))  # 512 MiB, none used
        >>> gm = prepare_on_meta(big, sparsifier=fx_sparsity.WandaSparsifier(0.5))
        >>> gm.get_parameter("0.weight").is_meta, gm.get_buffer("0.weight_mask").is_meta
        (True, True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be an nn.Module built under torch.device('meta'), got {type(model).__name__} "
            f"{str(model)[:60]!r}: build it with `with torch.device('meta'): model = MyModel(config)`"
        )
    if not any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise ValueError("model has no tensor on the meta device: use fx_sparsity.prepare")
    clone = copy.deepcopy(model)
    compute_buffers(clone)
    mode = FakeTensorMode()
    for aliases in tensor_aliases(clone).values():
        tensor = get_tensor(clone, aliases[0])
        if tensor.is_meta:
            with mode:
                fake = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
            set_tensor(clone, aliases, nn.Parameter(fake, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else fake)
    kwargs.setdefault("mask_dtype", torch.bool)
    gm = prepare(clone, config, sparsifier=sparsifier, example_inputs=example_inputs, **kwargs)
    for aliases in tensor_aliases(gm).values():
        tensor = get_tensor(gm, aliases[0])
        if isinstance(tensor, FakeTensor):
            set_tensor(gm, aliases, meta_like(tensor))
    return gm
