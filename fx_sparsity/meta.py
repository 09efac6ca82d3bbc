"""The records fx_sparsity keeps in ``gm.meta`` of the modules it returns: one key per record, read and written here only.

=============================  =======================================================  ==========================
key                            record                                                   written by
=============================  =======================================================  ==========================
``"fx_sparsity.sparsifier"``   the :class:`~fx_sparsity.sparsifier.BaseSparsifier`       ``prepare`` (attach)
                               stepping the module's masks
``"fx_sparsity.unmatched"``    ``tuple[UnmatchedWeight, ...]``: weights left dense      ``prepare``
``"fx_sparsity.source_model"`` :class:`SourceModel`: the user's model (not pickled)     ``prepare``
``"fx_sparsity.lowering"``     ``tuple[LayerLowering, ...]``: how each weight lowered   ``lower``
``"fx_sparsity.shrink"``       :class:`ShrinkRecord`: the shrink report and the         ``shrink``
                               pruner's example inputs
``"fx_sparsity.quantization"`` ``tuple[QuantRecord, ...]``: the grid values and         ``SparseGPTSparsifier``
                               scales of each quantized weight                          (``quantization=...``),
                                                                                        ``quantization.quantize``
=============================  =======================================================  ==========================

Copies of a module (``clone_sharing_tensors``, ``copy.deepcopy``) copy ``gm.meta``: the
sparsifier is bound to one module, so :func:`clone_without_sparsifier` leaves it out, and a
:class:`SourceModel` is shared, never copied. Modules saved by fx_sparsity 0.1.0 kept the shrink
report and inputs under two keys; :func:`get_shrink` reads those too.

This module imports nothing else of fx_sparsity, so every stage can read the records of the
others without importing them. (The capture's own record, ``capture`` method and dynamic batch,
is the passes' business: :func:`passes.meta.get_capture`.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import fx, nn

from passes import clone_sharing_tensors

if TYPE_CHECKING:
    from fx_sparsity.lowering.recipe import LayerLowering
    from fx_sparsity.quantization.spec import QuantizedWeight
    from fx_sparsity.sparsifier.base import BaseSparsifier
    from passes.matching import UnmatchedWeight
    from passes.shrink import ShrinkReport

__all__ = [
    "SPARSIFIER_KEY",
    "UNMATCHED_KEY",
    "SOURCE_MODEL_KEY",
    "LOWERING_KEY",
    "SHRINK_KEY",
    "SourceModel",
    "ShrinkRecord",
    "get_sparsifier",
    "find_sparsifier",
    "set_sparsifier",
    "clone_without_sparsifier",
    "get_unmatched",
    "set_unmatched",
    "get_source_model",
    "set_source_model",
    "get_lowering",
    "set_lowering",
    "get_shrink",
    "set_shrink",
    "shrink_report",
    "QUANT_KEY",
    "QuantRecord",
    "get_quantization",
    "set_quantization",
]

SPARSIFIER_KEY = "fx_sparsity.sparsifier"
UNMATCHED_KEY = "fx_sparsity.unmatched"
SOURCE_MODEL_KEY = "fx_sparsity.source_model"
LOWERING_KEY = "fx_sparsity.lowering"
SHRINK_KEY = "fx_sparsity.shrink"
QUANT_KEY = "fx_sparsity.quantization"
# fx_sparsity 0.1.0 kept the shrink report and the pruner's example inputs under two keys.
_LEGACY_SHRINK_REPORT_KEY = "fx_sparsity.shrink_report"
_LEGACY_SHRINK_INPUTS_KEY = "fx_sparsity.shrink_inputs"


def _meta(gm: Any) -> dict:
    return getattr(gm, "meta", None) or {}


class SourceModel:
    """The user's model, as ``prepare`` keeps it in ``gm.meta``.

    Copies of the prepared module refer to the same model (``copy.deepcopy`` of
    ``gm.meta`` must not copy the user's model), and pickling keeps no model: a
    saved prepared module would otherwise carry a second copy of every weight
    pruning changed, and a model whose class does not pickle could not be saved.
    """

    def __init__(self, model: nn.Module | None) -> None:
        self.model = model

    def __copy__(self) -> SourceModel:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> SourceModel:
        return self

    def __reduce__(self) -> tuple:
        return (SourceModel, (None,))

    def __repr__(self) -> str:
        return f"SourceModel({type(self.model).__name__ if self.model is not None else None})"


@dataclass(frozen=True)
class ShrinkRecord:
    """What :func:`fx_sparsity.shrink` keeps on the module it returns.

    Attributes:
        report: parameters and MACs before and after, what is inexact (a
            :class:`~fx_sparsity.lowering.TimedShrinkReport` with latencies after ``lower(gm, "shrink")``).
        example_inputs: the inputs the pruner was prepared with, on which :func:`fx_sparsity.to_model`
            checks the user's class with the shrunk layers swapped in.
    """

    report: ShrinkReport
    example_inputs: Any


@dataclass(frozen=True)
class QuantRecord:
    """How one weight of a prepared module was quantized: what lowering reads to store its grid values.

    The prepared module's weight is ``dequantize(record.quantized)`` (in the weight's dtype: exactly for
    float32 weights; bf16 and fp16 weights hold it rounded to their precision), in the stored layout;
    the module computes ``weight * mask``, and the values are 0 (or the zero point) wherever the mask
    was 0 when they were computed, so ``values`` taken where the mask keeps are the weight's.

    Attributes:
        tensor_fqn: the weight's FQN in the prepared module.
        quantized: the :class:`~fx_sparsity.quantization.QuantizedWeight` (values, scales, zero points,
            spec), in the weight's ``[out, in, *kernel]`` view (a weight stored ``[in, out]``, transformers'
            ``Conv1D``, transposed).
        method: ``"rtn"``, ``"gptq"`` (:func:`fx_sparsity.quantization.quantize`) or ``"sparsegpt"``
            (pruned and quantized in one pass by ``SparseGPTSparsifier(quantization=...)``).
    """

    tensor_fqn: str
    quantized: QuantizedWeight
    method: str


# --------------------------------------------------------------------------------------------- the sparsifier
def find_sparsifier(gm: Any) -> BaseSparsifier | None:
    """The sparsifier bound to ``gm``, or ``None``."""
    return _meta(gm).get(SPARSIFIER_KEY)


def get_sparsifier(gm: fx.GraphModule) -> BaseSparsifier:
    """The sparsifier that prepared ``gm`` (``fx_sparsity.prepare`` makes one when given none).

    Raises:
        ValueError: ``gm`` was not returned by a ``prepare`` call.

    Example::

        >>> gm = fx_sparsity.prepare(nn.Sequential(nn.Linear(4, 4)))
        >>> type(get_sparsifier(gm)).__name__
        'WeightNormSparsifier'
    """
    sparsifier = find_sparsifier(gm)
    if sparsifier is None:
        raise ValueError(
            f"{type(gm).__name__} was not prepared by fx_sparsity: call fx_sparsity.prepare(model) first"
        )
    return sparsifier


def set_sparsifier(gm: fx.GraphModule, sparsifier: BaseSparsifier) -> None:
    gm.meta[SPARSIFIER_KEY] = sparsifier


def clone_without_sparsifier(gm: fx.GraphModule) -> fx.GraphModule:
    """A clone of ``gm`` sharing its tensors, without the sparsifier of ``gm`` (which stays bound to ``gm``)."""
    sparsifier = gm.meta.pop(SPARSIFIER_KEY, None)
    try:
        return clone_sharing_tensors(gm)
    finally:
        if sparsifier is not None:
            gm.meta[SPARSIFIER_KEY] = sparsifier


# -------------------------------------------------------------------------------------- what prepare recorded
def get_unmatched(gm: fx.GraphModule) -> tuple[UnmatchedWeight, ...]:
    """The Linear/Conv-like weights of the user's model that ``prepare`` found no op for (they stay dense).

    Example::

        >>> gm = fx_sparsity.prepare(nn.Sequential(nn.Linear(4, 4)))
        >>> get_unmatched(gm)
        ()
    """
    return tuple(_meta(gm).get(UNMATCHED_KEY, ()))


def set_unmatched(gm: fx.GraphModule, unmatched: Sequence[UnmatchedWeight]) -> None:
    gm.meta[UNMATCHED_KEY] = tuple(unmatched)


def get_source_model(gm: fx.GraphModule) -> SourceModel | None:
    """The :class:`SourceModel` ``prepare`` kept (its ``model`` is ``None`` after a pickle round trip), or ``None``."""
    return _meta(gm).get(SOURCE_MODEL_KEY)


def set_source_model(gm: fx.GraphModule, model: nn.Module) -> None:
    gm.meta[SOURCE_MODEL_KEY] = SourceModel(model)


# ------------------------------------------------------------------------------------------ lowering, shrinking
def get_lowering(gm: fx.GraphModule) -> tuple[LayerLowering, ...]:
    """The per-layer records :func:`fx_sparsity.lower` stored on the module it returned.

    Raises:
        ValueError: ``gm`` was not returned by ``lower``.
    """
    records = _meta(gm).get(LOWERING_KEY)
    if records is None:
        raise ValueError("this module was not returned by fx_sparsity.lower(); it has no lowering records")
    return records


def set_lowering(gm: fx.GraphModule, records: Sequence[LayerLowering]) -> None:
    gm.meta[LOWERING_KEY] = tuple(records)


def get_shrink(gm: Any) -> ShrinkRecord | None:
    """The :class:`ShrinkRecord` of a module returned by :func:`fx_sparsity.shrink`, or ``None``."""
    meta = _meta(gm)
    record = meta.get(SHRINK_KEY)
    if record is None and _LEGACY_SHRINK_REPORT_KEY in meta:
        record = ShrinkRecord(meta[_LEGACY_SHRINK_REPORT_KEY], meta.get(_LEGACY_SHRINK_INPUTS_KEY))
    return record


def set_shrink(gm: fx.GraphModule, record: ShrinkRecord) -> None:
    gm.meta[SHRINK_KEY] = record
    gm.meta.pop(_LEGACY_SHRINK_REPORT_KEY, None)
    gm.meta.pop(_LEGACY_SHRINK_INPUTS_KEY, None)


def shrink_report(gm: fx.GraphModule) -> ShrinkReport:
    """The :class:`passes.shrink.ShrinkReport` of a module returned by :func:`fx_sparsity.shrink`
    (a :class:`~fx_sparsity.lowering.TimedShrinkReport` for ``lower(gm, "shrink")``).

    Raises:
        ValueError: ``gm`` was not returned by ``shrink`` or ``lower(gm, "shrink")``.
    """
    record = get_shrink(gm)
    if record is None:
        raise ValueError(f"{type(gm).__name__} was not returned by fx_sparsity.shrink")
    return record.report


# ------------------------------------------------------------------------------------------------ quantization
def get_quantization(gm: Any) -> dict[str, QuantRecord]:
    """The :class:`QuantRecord` of each quantized weight of ``gm``, by tensor FQN (empty when none is).

    A record is written when a weight is quantized (``SparseGPTSparsifier(quantization=...)``'s step,
    :func:`fx_sparsity.quantization.quantize`) and dropped when the weight is replaced by another step
    that does not quantize it (``SparseGPTSparsifier`` without ``quantization``); stepping a sparsifier
    that only changes masks keeps it (the weight is unchanged: lowering reads the values where the mask keeps).

    Example::

        >>> sparsifier = fx_sparsity.SparseGPTSparsifier(0.5, quantization="int4-g32")
        >>> gm = fx_sparsity.prepare(nn.Sequential(nn.Linear(64, 8)), sparsifier=sparsifier)
        >>> _ = fx_sparsity.calibrate(gm, [torch.randn(16, 64)], progress_bar=False)
        >>> sparsifier.step()
        >>> record = get_quantization(gm)["0.weight"]
        >>> str(record.quantized.spec), tuple(record.quantized.scales.shape), record.method
        ('int4-g32', (8, 2), 'sparsegpt')
    """
    return {r.tensor_fqn: r for r in _meta(gm).get(QUANT_KEY, ())}


def set_quantization(gm: fx.GraphModule, records: Sequence[QuantRecord]) -> None:
    """Make ``records`` (one per weight) the quantization records of ``gm``; none removes the key."""
    records = tuple(records)
    if records:
        gm.meta[QUANT_KEY] = records
    else:
        gm.meta.pop(QUANT_KEY, None)
