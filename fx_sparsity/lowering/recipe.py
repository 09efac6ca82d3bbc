"""``lower``: turn a prepared (masked) GraphModule into one without masks, ready for ``torch.export``.

Backends, chosen for all layers at once or per layer in the FQN-keyed form of
the sparsity config (layers no entry selects are fused)::

    lower(gm, "csr")
    lower(gm, {"fc*": "csr", "head": {"backend": "bsr", "blocksize": (32, 32)}})
    lower(gm, [{"tensor_fqn": "fc.weight", "backend": "auto"}], example_inputs=(x,))

* ``"fuse"``: the weight becomes ``weight * mask`` and the op a plain dense
  linear/conv (a ``call_module`` again where the model was traced that way).
* ``"csr"`` / ``"bsr"``: Linear and 1x1 Conv ops (strided too) call the ``fx_sparsity::csr_linear``
  / ``bsr_linear`` operators (:mod:`passes.lowering.operators`); other convs are fused.
  On CPU these run on MKL, which takes float32/float64 and square blocks only.
* ``"semi_structured"``: 2:4 weights in fp16/bf16 on a CUDA GPU (CUTLASS).
* ``"shrink"`` (whole model only): a module prepared by a
  :class:`~fx_sparsity.ChannelPruner` loses its masked channels physically
  (:func:`fx_sparsity.shrink`); one record per masked weight gives its shape before
  and after, and with ``example_inputs`` the report (:func:`fx_sparsity.shrink_report`)
  holds the model's latency before (masks fused, dense) and after, timed side by side.
* ``"auto"``: per layer, times every backend the layer can take on its own
  input from ``example_inputs`` and keeps a sparse kernel only when it beats the
  fused dense op by :data:`~fx_sparsity.lowering.autotune.AUTO_MIN_SPEEDUP`. When the
  model's weights exceed the last-level cache, each call is timed cold, as the
  layer runs in the model (see :mod:`fx_sparsity.lowering.timing`).

The prepared module and the user's model are not modified. The returned
module's ``meta["fx_sparsity.lowering"]`` holds one :class:`LayerLowering` per
weight; :func:`fx_sparsity.report.lowering_table` prints them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, fx

from fx_sparsity.lowering.autotune import resolve_layer
from fx_sparsity.lowering.backends import BACKENDS, MODEL_BACKENDS, BackendConfig, LayerRequest, parse_backends
from fx_sparsity.lowering.decisions import Decisions
from fx_sparsity.lowering.timing import LayerTimer, last_level_cache_bytes, record_op_calls, time_variants
from fx_sparsity.meta import (
    QuantRecord,
    ShrinkRecord,
    clone_without_sparsifier,
    find_sparsifier,
    get_quantization,
    get_sparsifier,
    set_lowering,
    set_shrink,
)
from fx_sparsity.quantization.rtn import quantize_weight
from fx_sparsity.quantization.spec import as_spec
from fx_sparsity.structured.pruner import ChannelPruner
from fx_sparsity.structured.shrinking import shrink_with_dense
from fx_sparsity.utils.progress import progress
from fx_sparsity.utils.running import ModelInputs, eval_mode, fit_inputs
from passes import get_sparse_target
from passes.lowering import COMPONENT_NAMES, QUANT_LAYOUTS, lower_sparse, lowering_blockers
from passes.masking import fuse_masks
from passes.matching import find_masked_weights
from passes.meta import mask_nodes
from passes.shrink import ShrinkReport
from passes.utils import get_tensor

__all__ = ["lower", "LayerLowering", "TimedShrinkReport", "BACKENDS", "MODEL_BACKENDS"]


@dataclass(frozen=True)
class LayerLowering:
    """How one weight was lowered.

    Attributes:
        tensor_fqn, kind, weight_shape: the weight and its op (``"linear"``, ``"conv2d"``...).
        requested: the backend asked for; ``backend``: the one used (never ``"auto"``).
        blocksize: BSR block shape, else ``None``.
        note: why the backend was used when it differs from the request, or auto's timings.
        sparsity: fraction of zeros in the mask.
        dense_bytes: bytes of the dense weight; ``lowered_bytes``: bytes the lowered
            module stores for it (index and value tensors, or the fused weight).
        time_before, time_after: seconds per call of the masked layer and of the
            lowered layer on its input from ``example_inputs`` (medians); ``None`` without them,
            and for ``"shrink"`` (whose latency is the whole model's, in :class:`TimedShrinkReport`).
    """

    tensor_fqn: str
    kind: str
    weight_shape: tuple[int, ...]
    requested: str
    backend: str
    blocksize: tuple[int, int] | None
    note: str
    sparsity: float
    dense_bytes: int
    lowered_bytes: int
    time_before: float | None = None
    time_after: float | None = None


@dataclass(frozen=True)
class TimedShrinkReport(ShrinkReport):
    """The :class:`passes.ShrinkReport` of ``lower(gm, "shrink")``, with the model's latency.

    Attributes:
        latency_before: seconds per call of the module before shrinking, masks fused (what the dense,
            unpruned model costs), median of interleaved rounds; ``None`` without ``example_inputs``.
        latency_after: the same for the shrunk module, timed in the same rounds.
    """

    latency_before: float | None = None
    latency_after: float | None = None

    @property
    def speedup(self) -> float | None:
        """``latency_before / latency_after``, or ``None`` when not timed."""
        if self.latency_before is None or self.latency_after is None:
            return None
        return self.latency_before / self.latency_after


def _default_blocksizes(gm: fx.GraphModule) -> dict[str, tuple[int, int]]:
    """Tensor FQN -> the sparsifier's ``sparse_block_shape``, for the weights whose group has one."""
    records = getattr(find_sparsifier(gm), "records", ())
    return {r.tensor_fqn: tuple(r.args["sparse_block_shape"]) for r in records if "sparse_block_shape" in r.args}


def _stored_bytes(gm: fx.GraphModule, tensor_fqn: str) -> int:
    module_fqn, _, name = tensor_fqn.rpartition(".")
    owner = gm.get_submodule(module_fqn)
    parts = dict.fromkeys(p for layout_parts in COMPONENT_NAMES.values() for p in layout_parts)
    names = [name] + [f"{name}_{p}" for p in parts]
    tensors = [getattr(owner, n) for n in names if isinstance(getattr(owner, n, None), Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _weights_exceed_cache(gm: fx.GraphModule) -> bool:
    tensors = {id(t): t for t in (*gm.parameters(), *gm.buffers())}.values()
    return sum(t.numel() * t.element_size() for t in tensors) > last_level_cache_bytes()


def _check_arguments(gm: Any, repeats: Any) -> dict[str, fx.Node]:
    """The mask nodes of ``gm`` (:func:`passes.meta.mask_nodes`: the one scan of the graph ``lower`` makes)."""
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"gm must be the GraphModule prepare() returned, got {type(gm).__name__}")
    muls = mask_nodes(gm)
    if not muls:
        raise ValueError(
            "gm has no mask nodes: lower() takes the module prepare() returned, before squash_mask()"
        )
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    return muls


def _record(
    layer: LayerTimer, request: LayerRequest, fmt, note: str, before, after, lowered: fx.GraphModule
) -> LayerLowering:
    return LayerLowering(
        tensor_fqn=layer.target.tensor_fqn,
        kind=layer.target.kind,
        weight_shape=layer.target.weight_shape,
        requested=request.backend,
        backend="fuse" if fmt is None else fmt.layout,
        blocksize=None if fmt is None else fmt.blocksize,
        note=note,
        sparsity=1.0 - int(torch.count_nonzero(layer.mask)) / layer.mask.numel(),
        dense_bytes=layer.weight.numel() * layer.weight.element_size(),
        lowered_bytes=_stored_bytes(lowered, layer.target.tensor_fqn),
        time_before=before,
        time_after=after,
    )


def lower(
    gm: fx.GraphModule,
    backend: BackendConfig = "fuse",
    *,
    example_inputs: Any = None,
    repeats: int = 7,
    progress_bar: bool = True,
    decisions: str | os.PathLike[str] | None = None,
) -> fx.GraphModule:
    """Return a new module computing ``gm`` with no mask nodes or mask buffers.

    Args:
        gm: a module returned by :func:`fx_sparsity.prepare` (masks still in place).
        backend: one of :data:`BACKENDS` for every layer, ``"shrink"`` for a module
            prepared by a ``ChannelPruner`` (whole model only), or a per-layer config
            (FQN-keyed dict or list of dicts with ``"backend"`` and, for bsr and
            auto, ``"blocksize"``); layers it does not select are fused.
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword
            inputs, which ``gm``'s forward must take (no more, no fewer); required by
            ``"auto"``, and with it each layer's time before and after is measured
            (the module runs once, in eval mode).
        repeats: timed rounds per layer (``auto`` compares each variant's fastest round; the report's times are
            medians).
        progress_bar: show a progress bar on stderr while layers are timed.
        decisions: a JSON file keeping ``auto``'s picks per layer kind and machine (created if missing): a layer
            of the same shape, dtypes, inputs, mask density (to 1%) and candidate formats as one decided before
            on a machine with the same CPU, kernel ISA, threads and versions gets the same format without being
            timed against the others, so that runs on a machine whose load changes lower alike; new picks are
            added (see :mod:`fx_sparsity.lowering.decisions`). ``None``: every ``auto`` layer is timed.

    Returns:
        The lowered ``GraphModule``; :func:`get_lowering` gives its per-layer records.

    Raises:
        TypeError / ValueError: ``gm`` has no masks, a backend, blocksize or
            ``example_inputs`` is invalid, or an explicit backend cannot hold a
            layer on this machine (the message says why; ``"auto"`` falls back
            to fusing instead), or ``"shrink"`` is asked per layer or of a module not
            prepared by a ``ChannelPruner``. Raised before anything is built.

    Example::

        >>> gm = fx_sparsity.prepare(nn.Sequential(nn.Linear(64, 64)), sparsifier=WeightNormSparsifier(0.9))
        >>> fx_sparsity.get_sparsifier(gm).step()
        >>> lowered = fx_sparsity.lower(gm, "csr")
        >>> [r.backend for r in fx_sparsity.get_lowering(lowered)]
        ['csr']
    """
    muls = _check_arguments(gm, repeats)
    inputs = _model_inputs(gm, example_inputs)
    picks = Decisions(decisions) if decisions is not None else None
    if isinstance(backend, str) and backend in MODEL_BACKENDS:
        return _lower_shrink(gm, muls, inputs, repeats)
    requests = parse_backends(gm, backend, find_masked_weights(gm, muls))
    timed = inputs is not None
    if not timed and any(r.backend == "auto" for r in requests.values()):
        raise ValueError("backend 'auto' times each layer on its input: pass example_inputs=(x,)")
    calls = record_op_calls(gm, *inputs) if timed else {}
    cold = timed and _weights_exceed_cache(gm)

    formats, choices, quantized = {}, [], {}
    records = get_quantization(gm)
    blockers, blocksizes = lowering_blockers(gm, muls), _default_blocksizes(gm)
    targets = [get_sparse_target(mul) for mul in muls.values()]
    for target in progress(targets, progress_bar and timed, "lower: timing layers", len(targets)):
        request = requests[target.tensor_fqn]
        layer = LayerTimer(gm, target, calls.get(target.tensor_fqn, []), repeats, cold)
        blocksize = request.blocksize or blocksizes.get(target.tensor_fqn)
        record = records.get(target.tensor_fqn)
        q = _quantized_weight(target.tensor_fqn, request, layer, record)
        fmt, note, before, after = resolve_layer(layer, request, blocksize, blockers[target.tensor_fqn], timed, q,
                                                 record.quantized.spec.bits if record is not None else None, picks)
        if fmt is not None:
            formats[target.tensor_fqn] = fmt
            if fmt.quantized:
                quantized[target.tensor_fqn] = q
        choices.append((layer, request, fmt, note, before, after))

    lowered = fuse_masks(lower_sparse(clone_without_sparsifier(gm), formats, quantized))
    set_lowering(lowered, [_record(*choice, lowered) for choice in choices])
    if picks is not None:
        picks.save()
    return lowered


def _quantized_weight(fqn: str, request: LayerRequest, layer: LayerTimer, record: QuantRecord | None) -> Any:
    """The quantized weight a layer's quantized layout packs: its quantization record's (checked against the
    layout's bits and the request's grid), else round-to-nearest of the masked weight on the request's grid.
    With ``auto``, the record's (``None`` without one). Raises ``ValueError`` naming the layer."""
    wanted = request.backend
    if wanted not in QUANT_LAYOUTS:
        return record.quantized if record is not None and wanted == "auto" else None
    bits = 8 if wanted.endswith("int8") else 4
    if record is not None:
        spec = record.quantized.spec
        if spec.bits != bits or (request.quantization is not None and as_spec(request.quantization) != spec):
            raise ValueError(
                f"cannot lower {fqn} to {wanted}: its weight was quantized to {spec} ({record.method}), which "
                f"{wanted}{' with quantization=' + repr(request.quantization) if request.quantization else ''} "
                "does not hold; lower it to a layout of those bits, or quantize it again"
            )
        return record.quantized
    spec = as_spec(request.quantization or f"int{bits}")
    weight = layer.fused()
    try:
        return quantize_weight(weight.reshape(weight.shape[0], -1), spec)
    except ValueError as e:
        raise ValueError(f"cannot lower {fqn} to {wanted}: {e}") from None


def _model_inputs(gm: fx.GraphModule, example_inputs: Any) -> ModelInputs | None:
    """``(args, kwargs)`` of ``example_inputs`` (``None`` without them), checked against ``gm``'s forward: an input it
    does not take would be dropped without a word by the interpreter that records the layers' calls."""
    if example_inputs is None:
        return None
    return fit_inputs(gm, example_inputs, "example_inputs")


def _lower_shrink(gm: fx.GraphModule, muls: dict[str, fx.Node], inputs: ModelInputs | None, repeats: int) -> fx.GraphModule:
    """``lower(gm, "shrink")``: :func:`fx_sparsity.shrink`, one record per masked weight, and the latency."""
    pruner = get_sparsifier(gm)
    if not isinstance(pruner, ChannelPruner):
        raise ValueError(
            f"backend 'shrink' removes the channels a ChannelPruner masked; gm was prepared by "
            f"{type(pruner).__name__}: use fx_sparsity.ChannelPruner().prepare(model, example_inputs=...), "
            "or another backend"
        )
    dense, small, report = shrink_with_dense(gm)
    records = []
    for mul in muls.values():
        target = get_sparse_target(mul)
        owner = gm.get_submodule(target.module_fqn)
        weight, mask = getattr(owner, target.tensor_name), getattr(owner, target.mask_name)
        after = get_tensor(small, target.tensor_fqn)
        records.append(LayerLowering(
            tensor_fqn=target.tensor_fqn,
            kind=target.kind,
            weight_shape=target.weight_shape,
            requested="shrink",
            backend="shrink",
            blocksize=None,
            note=f"-> {'x'.join(map(str, after.shape))}",
            sparsity=1.0 - int(torch.count_nonzero(mask)) / mask.numel(),
            dense_bytes=weight.numel() * weight.element_size(),
            lowered_bytes=after.numel() * after.element_size(),
        ))
    set_lowering(small, records)
    timed = {f.name: getattr(report, f.name) for f in fields(ShrinkReport)}
    if inputs is not None:
        timed["latency_before"], timed["latency_after"] = _time_models(dense, small, inputs, repeats)
    set_shrink(small, ShrinkRecord(TimedShrinkReport(**timed), pruner.example_inputs))
    return small


def _time_models(dense: fx.GraphModule, small: fx.GraphModule, inputs: Any, repeats: int) -> tuple[float, float]:
    """Median seconds per call of ``dense`` (the prepared module with its masks fused) and of ``small``, in
    interleaved rounds."""
    args, kwargs = inputs
    device = next(iter(small.parameters()), torch.empty(0)).device
    with torch.no_grad(), eval_mode(dense), eval_mode(small):
        times = time_variants({"dense": lambda: dense(*args, **kwargs), "shrunk": lambda: small(*args, **kwargs)},
                              repeats, device)
    return times["dense"], times["shrunk"]
