"""``quantize``: put the masked weights of a prepared module on a quantization grid, keeping their masks.

For masks that are already chosen (Wanda, magnitude, N:M, a loaded state dict, ...): every weight
the module's sparsifier masks is quantized as ``weight * mask``, by round-to-nearest
(:func:`~fx_sparsity.quantization.quantize_weight`) or by GPTQ
(:func:`~fx_sparsity.quantization.gptq_quantize`: error compensation from the input Hessians, the
masked entries held at exactly zero). The masks do not change; the prepared module's weights become
new tensors holding the dequantized values (the user's model keeps its own); a
:class:`fx_sparsity.meta.QuantRecord` per weight records the grid values and scales for lowering
(:func:`fx_sparsity.meta.get_quantization`).

GPTQ's Hessians come from the calibration machinery as they are: a stand-in for the sparsifier
speaks its calibration protocol (``calibration_observer`` / ``calibration_statistic`` /
``calibration_key``: :class:`passes.calibration.InputHessianObserver` in front of every masked op,
as SparseGPT asks) on a clone of the module sharing its tensors, and :func:`fx_sparsity.calibrate`
(or, with ``sequential=True``, :func:`fx_sparsity.prune_sequential`, whose ``step`` of a stage
quantizes that stage's weights, so later blocks are calibrated on the outputs of the quantized ones,
as GPTQ's reference does) runs it, token masks and the ``torch.distributed`` all-reduce included.
Nothing of the prepared module changes until every weight is quantized: a failure leaves it as it was.

To prune and quantize in one pass with SparseGPT, use ``SparseGPTSparsifier(quantization=...)`` instead.
"""

from __future__ import annotations

import difflib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import fx, nn

from fx_sparsity.calibration.sequential import prune_sequential
from fx_sparsity.calibration.statistics import calibrate
from fx_sparsity.meta import (
    QuantRecord,
    clone_without_sparsifier,
    get_quantization,
    get_sparsifier,
    set_quantization,
    set_sparsifier,
)
from fx_sparsity.quantization.gptq import check_dampening, check_quant_block_size, gptq_quantize
from fx_sparsity.quantization.rtn import dequantize, quantize_weight
from fx_sparsity.quantization.spec import QuantizedWeight, QuantSpec, SpecLike, as_spec, check_fits
from fx_sparsity.utils.running import TokenMask
from passes import SparseTarget, get_sparse_target
from passes.calibration import InputHessianObserver
from passes.masking import LSTM_KIND
from passes.utils import fqns_read, set_tensor, tensor_aliases

__all__ = ["quantize", "METHODS"]

METHODS = ("gptq", "rtn")
# Where the stand-in keeps each weight's Hessian: the key SparseGPT's statistics have.
_HESSIAN_KEY = "input_hessian"


def quantize(
    gm: fx.GraphModule,
    spec: SpecLike,
    *,
    method: str = "gptq",
    batches: Iterable[Any] | None = None,
    tensor_fqns: Iterable[str] | None = None,
    sequential: bool = False,
    blocks: Sequence[str] | None = None,
    block_size: int = 128,
    dampening: float = 0.01,
    token_mask: TokenMask = "attention_mask",
    distributed: Any = None,
    progress_bar: bool = True,
) -> dict[str, QuantRecord]:
    """Quantize the masked weights of the prepared ``gm`` to ``spec``'s grid, keeping their masks exactly.

    Args:
        gm: a module returned by ``prepare`` (its masks as they should stay: step the sparsifier first).
        spec: a :class:`~fx_sparsity.quantization.QuantSpec` or its name: ``"int8"`` (per output
            channel), ``"int4"``/``"int4-g64"``/``"int4-g32"`` (symmetric, per group of columns),
            ``"int4-g128-zp"`` (with zero points).
        method: ``"gptq"`` (error compensation from input Hessians; needs ``batches``) or ``"rtn"``
            (round-to-nearest; no data).
        batches: GPTQ's calibration inputs, as :func:`fx_sparsity.calibrate` takes them.
        tensor_fqns: the weights to quantize (default: every weight the sparsifier masks, but
            ``nn.LSTM`` parameters, which have no input of their own to calibrate on).
        sequential: GPTQ only: calibrate and quantize one block at a time, each block on the outputs
            of the quantized blocks before it (:func:`fx_sparsity.prune_sequential`); else every
            Hessian is calibrated on the module as it is (:func:`fx_sparsity.calibrate`).
        blocks: with ``sequential``: the block modules, as ``prune_sequential`` takes them.
        block_size: GPTQ's columns per block of lazy updates (a multiple of the int4 group size).
        dampening: GPTQ's Hessian dampening, a fraction of the mean of its diagonal.
        token_mask, distributed, progress_bar: as :func:`fx_sparsity.calibrate`: padded positions
            enter no Hessian; under ``torch.distributed`` each process calibrates on its share of the
            batches and the Hessians are all-reduced, so every process quantizes alike.

    Returns:
        tensor FQN -> the :class:`~fx_sparsity.meta.QuantRecord` written (also in
        :func:`~fx_sparsity.meta.get_quantization`, which keeps the records of weights quantized before).

    Raises:
        TypeError: a bad ``spec``, ``tensor_fqns`` or ``batches`` (as ``calibrate`` checks them).
        ValueError: ``gm`` was not prepared, an unknown ``method``, ``batches`` missing for GPTQ or given
            for RTN, ``sequential`` without GPTQ, an unknown or LSTM weight in ``tensor_fqns``, a weight
            whose columns the int4 groups do not tile, a weight unmasked ops also read (a tied
            weight), meta tensors, a bad ``block_size``/``dampening``, and what ``calibrate`` or
            ``prune_sequential`` refuse. All before ``gm`` changes.
        RuntimeError: as ``calibrate`` (an op never ran, another process failed); ``gm`` is unchanged.

    Example::

        >>> from fx_sparsity.quantization import dequantize, quantize
        >>> gm = fx_sparsity.prepare(model, sparsifier=fx_sparsity.WandaSparsifier(0.5))
        >>> _ = fx_sparsity.calibrate(gm, batches, progress_bar=False)
        >>> fx_sparsity.get_sparsifier(gm).step()
        >>> mask = gm.get_buffer("0.weight_mask").clone()
        >>> records = quantize(gm, "int4-g32", batches=batches, progress_bar=False)
        >>> torch.equal(gm.get_buffer("0.weight_mask"), mask)                # masks kept
        True
        >>> torch.equal(gm.get_parameter("0.weight"), dequantize(records["0.weight"].quantized))
        True
        >>> bool((gm.get_parameter("0.weight")[mask == 0] == 0).all())    # zero where masked
        True
    """
    sparsifier = get_sparsifier(gm)
    spec = as_spec(spec, "spec")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "rtn" and batches is not None:
        raise ValueError("method='rtn' rounds each weight on its own and takes no batches: pass batches=None, or "
                         "method='gptq' to use them")
    if method == "gptq" and batches is None:
        raise ValueError("method='gptq' needs calibration batches for the input Hessians: pass batches=[...] "
                         "(as fx_sparsity.calibrate takes them), or method='rtn'")
    if not isinstance(sequential, bool):
        raise TypeError(f"sequential must be True or False, got {sequential!r}")
    if method == "rtn" and (sequential or blocks is not None):
        raise ValueError("sequential and blocks are GPTQ's (calibration one block at a time): drop them for method='rtn'")
    if blocks is not None and not sequential:
        raise ValueError("blocks names the blocks of sequential calibration: pass sequential=True with it")
    groups = _select(sparsifier.groups, tensor_fqns)
    for group in groups:
        check_fits(spec, group.record.view_shape, group.record.tensor_fqn)
        weight = getattr(group.module, group.record.tensor_name)
        if weight.is_meta:
            raise ValueError(
                f"{group.record.tensor_fqn} is on the meta device (a module from prepare_on_meta): quantize needs "
                "its values in memory"
            )
    aliases = {g.record.tensor_fqn: _weight_aliases(gm, g.record) for g in groups}
    if method == "rtn":
        quantized = {}
        for group in groups:
            weight, mask = _masked(group.module, group.record)
            quantized[group.record.tensor_fqn] = quantize_weight(weight, spec, mask)
    else:
        check_quant_block_size(block_size, spec)
        dampening = check_dampening(dampening)
        quantized = _gptq(gm, groups, spec, batches, sequential, blocks, block_size, dampening,
                          dict(token_mask=token_mask, distributed=distributed, progress_bar=progress_bar))
    records = {}
    for group in groups:
        fqn = group.record.tensor_fqn
        _write(gm, group.module, group.record, aliases[fqn], quantized[fqn])
        records[fqn] = QuantRecord(fqn, quantized[fqn], method)
    set_quantization(gm, list({**get_quantization(gm), **records}.values()))
    return records


def _select(views: Sequence[Any], tensor_fqns: Iterable[str] | None) -> list[Any]:
    """The sparsifier's groups to quantize: all but LSTM parameters, or those ``tensor_fqns`` names."""
    if tensor_fqns is None:
        return [v for v in views if v.record.kind != LSTM_KIND]
    if isinstance(tensor_fqns, str) or not isinstance(tensor_fqns, Iterable):
        raise TypeError(f"tensor_fqns must be a list of weight FQNs, got {tensor_fqns!r}")
    tensor_fqns = list(tensor_fqns)
    if not all(isinstance(f, str) for f in tensor_fqns):
        raise TypeError(f"tensor_fqns must be a list of weight FQNs, got {tensor_fqns!r}")
    by_fqn = {v.record.tensor_fqn: v for v in views}
    for fqn in tensor_fqns:
        if fqn not in by_fqn:
            close = difflib.get_close_matches(fqn, list(by_fqn), n=3)
            hint = f"; did you mean {close}?" if close else f"; the masked weights: {sorted(by_fqn)}"
            raise ValueError(f"tensor_fqns names {fqn!r}, which the sparsifier does not mask{hint}")
        if by_fqn[fqn].record.kind == LSTM_KIND:
            raise ValueError(f"tensor_fqns names {fqn!r}, an nn.LSTM parameter: quantize covers Linear and Conv weights")
    wanted = set(tensor_fqns)
    return [v for v in views if v.record.tensor_fqn in wanted]


def _masked(module: nn.Module, record: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight * mask, mask)`` of ``record``'s weight in ``module``, in the ``[out, in]`` view."""
    weight = getattr(module, record.tensor_name)
    mask = getattr(module, f"{record.tensor_name}_mask")
    masked = (weight * mask).detach()
    return (masked.t(), mask.t()) if record.transposed else (masked, mask)


def _weight_aliases(gm: fx.GraphModule, record: Any) -> list[str]:
    """Every FQN of ``record``'s weight in ``gm``; refuses a weight that unmasked ops read too."""
    weight = getattr(gm.get_submodule(record.module_fqn), record.tensor_name)
    aliases = tensor_aliases(gm)[id(weight)]
    mul = next(
        n for n in gm.graph.nodes
        if (t := get_sparse_target(n)) is not None and t.role == "mask_mul" and t.tensor_fqn == record.tensor_fqn
    )
    unmasked = fqns_read(gm, aliases, skip=mul.all_input_nodes)
    if unmasked:
        raise ValueError(
            f"quantizing would change {record.tensor_fqn}, which unmasked ops also read as {sorted(unmasked)} "
            "(a tied weight): leave it out with tensor_fqns=[...] or mask every use"
        )
    return aliases


def _write(gm: fx.GraphModule, module: nn.Module, record: Any, aliases: list[str], quantized: QuantizedWeight) -> None:
    """Register the dequantized weight, a new tensor, under every name the old one had in ``gm``."""
    old = getattr(module, record.tensor_name)
    new = dequantize(quantized)
    new = (new.t() if record.transposed else new).to(old.dtype).contiguous()
    if isinstance(old, nn.Parameter):
        new = nn.Parameter(new, requires_grad=old.requires_grad)
    set_tensor(gm, aliases, new)


def _gptq(
    gm: fx.GraphModule,
    groups: list[Any],
    spec: QuantSpec,
    batches: Iterable[Any],
    sequential: bool,
    blocks: Sequence[str] | None,
    block_size: int,
    dampening: float,
    options: dict[str, Any],
) -> dict[str, QuantizedWeight]:
    """GPTQ of every group, the Hessians calibrated on a clone of ``gm`` (which ``gm``'s changes never reach)."""
    view = clone_without_sparsifier(gm)
    request = _HessianRequest(view, groups, spec, block_size, dampening)
    set_sparsifier(view, request)
    if sequential:
        prune_sequential(view, batches, blocks=blocks, **options)
    else:
        calibrate(view, batches, **options)
        request.step()
    missing = [g.record.tensor_fqn for g in groups if g.record.tensor_fqn not in request.quantized]
    assert not missing, missing  # calibrate and prune_sequential observe every masked op, or raise
    return request.quantized


class _HessianRequest:
    """What ``calibrate`` and ``prune_sequential`` ask of a sparsifier, for GPTQ on the clone ``view``.

    The calibration protocol asks for input Hessians (as ``SparseGPTSparsifier`` does); ``step`` (all
    groups, or a stage's) quantizes each group from its Hessian and writes the dequantized weight into
    ``view``, so a later stage of ``prune_sequential`` runs on it.
    """

    calibration_key = _HESSIAN_KEY

    def __init__(self, view: fx.GraphModule, groups: list[Any], spec: QuantSpec, block_size: int, dampening: float):
        self.view, self.groups, self.spec = view, groups, spec
        self.block_size, self.dampening = block_size, dampening
        self.state: dict[str, dict[str, Any]] = defaultdict(dict)
        self.quantized: dict[str, QuantizedWeight] = {}

    def calibration_observer(self, group: Any, target: SparseTarget, ops: list[dict[str, Any]]) -> nn.Module:
        return InputHessianObserver.for_target(target, ops)

    def calibration_statistic(self, group: Any, observer: nn.Module) -> torch.Tensor:
        return observer.hessian()

    def step(self, tensor_fqns: Iterable[str] | None = None, *, release_statistics: bool = False) -> None:
        """GPTQ for each group (of ``tensor_fqns``); with ``release_statistics`` each Hessian leaves ``state``
        as its group is quantized and is factorised in its own memory (as ``BaseSparsifier.step``)."""
        wanted = None if tensor_fqns is None else set(tensor_fqns)
        for group in self.groups:
            record = group.record
            if wanted is not None and record.tensor_fqn not in wanted:
                continue
            module = self.view.get_submodule(record.module_fqn)
            weight, mask = _masked(module, record)
            hessian = self.state[record.tensor_fqn][_HESSIAN_KEY]
            if release_statistics:
                del self.state[record.tensor_fqn][_HESSIAN_KEY]
            try:
                quantized = gptq_quantize(
                    weight, hessian.to(weight.device), self.spec, mask, self.block_size, self.dampening,
                    overwrite_hessian=release_statistics,
                )
            except ValueError as e:
                raise ValueError(f"GPTQ cannot quantize {record.tensor_fqn}: {e}") from e
            self.quantized[record.tensor_fqn] = quantized
            _write(self.view, module, record, _weight_aliases(self.view, record), quantized)
