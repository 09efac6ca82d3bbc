"""Decide each layer's format: the requested one, or for ``"auto"`` the fastest measured.

For a requested sparse backend, :func:`resolve_layer` checks that the layer and
this machine can run it (:func:`passes.lowering.rewrite.unsupported_reason`) and
raises otherwise. For ``"auto"`` it times the fused dense op and every format
the layer can take on the layer's own recorded input, interleaved (see
:mod:`fx_sparsity.lowering.timing`), and keeps a sparse format only when it beats
fused by :data:`AUTO_MIN_SPEEDUP`. With a :class:`~fx_sparsity.lowering.decisions.Decisions` file, a layer
of a kind decided before on this machine takes that pick instead of being timed against the others.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping

from fx_sparsity.lowering.backends import LayerRequest
from fx_sparsity.lowering.decisions import Decisions, layer_key
from fx_sparsity.lowering.timing import LayerTimer
from passes.lowering import LAYOUTS, QUANT_LAYOUTS, SparseFormat, unsupported_reason

__all__ = ["AUTO_MIN_SPEEDUP", "LayerChoice", "choose_backend", "resolve_layer"]

# "auto" keeps a sparse kernel only when it is this many times faster than the fused dense op,
# so that timing noise never leaves a layer slower than dense.
AUTO_MIN_SPEEDUP = 1.1

# (format or None for fused, note, seconds before, seconds after)
LayerChoice = tuple[SparseFormat | None, str, float | None, float | None]


def choose_backend(fused_seconds: float, sparse_seconds: Mapping[str, float]) -> tuple[str, str]:
    """``auto``'s pick and its note: the fastest sparse backend if it beats fused by :data:`AUTO_MIN_SPEEDUP`.

    Example::

        >>> choose_backend(1.0, {"csr": 0.5, "bsr": 0.4})
        ('bsr', 'auto: csr 2.00x, bsr 2.50x vs fused')
    """
    if not sparse_seconds:
        return "fuse", "auto: no sparse kernel fits this layer"
    timings = ", ".join(f"{k} {fused_seconds / v:.2f}x" for k, v in sparse_seconds.items())
    best = min(sparse_seconds, key=sparse_seconds.get)
    if sparse_seconds[best] * AUTO_MIN_SPEEDUP <= fused_seconds:
        return best, f"auto: {timings} vs fused"
    return "fuse", f"auto: fused ({timings})"


def _format(layout: str, blocksize: tuple[int, int] | None) -> SparseFormat:
    return SparseFormat(layout, blocksize if layout == "bsr" else None)


def resolve_layer(
    layer: LayerTimer, request: LayerRequest, blocksize: tuple[int, int] | None, blocker: str | None, timed: bool,
    quantized: object | None = None, record_bits: int | None = None, decisions: Decisions | None = None,
) -> LayerChoice:
    """The format a layer gets (``None``: fuse), the note, and its times before/after when ``timed``.

    ``blocker`` is why the layer's ops cannot run as a sparse linear at all
    (:func:`passes.lowering.lowering_blockers`), ``None`` when they can. ``quantized`` is the layer's
    quantized weight for a quantized layout; ``record_bits`` the bits of the weight's quantization record,
    with which ``auto`` also times the quantized layouts of those bits (without a record it stays with the
    float formats: quantizing changes the numbers, so it is never chosen for the user). ``decisions``: ``auto``'s
    earlier picks on this machine (see :mod:`fx_sparsity.lowering.decisions`); a layer of a kind found there
    gets that pick, timed against the masked form only for the report, and a new pick is added to it.

    Raises:
        ValueError: an explicitly requested backend cannot run this layer here.
    """
    fqn, wanted = layer.target.tensor_fqn, request.backend
    fused = layer.fused()
    variants = {"masked": layer.masked_fn(), "fuse": layer.dense_fn(fused)} if timed else {}
    if wanted == "fuse" or blocker is not None:
        times = layer.time(variants) if timed else {}
        note = f"fused: {blocker}" if wanted != "fuse" and blocker else ""
        return None, note, times.get("masked"), times.get("fuse")
    if wanted != "auto":
        reason = unsupported_reason(wanted, fused, blocksize)
        if reason is not None:
            raise ValueError(f"cannot lower {fqn} with backend {wanted!r}: {reason}; use 'fuse' or 'auto'")
        fmt = _format(wanted, blocksize)
        if not timed:
            return fmt, "", None, None
        try:
            variants[wanted] = layer.sparse_fn(fmt, fmt.components(fused.reshape(fused.shape[0], -1), quantized))
        except ValueError as e:
            raise ValueError(f"cannot lower {fqn} to {wanted}: {e}") from None
        times = layer.time(variants)
        return fmt, "", times["masked"], times[wanted]
    formats = {}
    quant = [q for q in QUANT_LAYOUTS if record_bits is not None and q.endswith(f"int{record_bits}")]
    for layout in (*LAYOUTS, *quant):
        if unsupported_reason(layout, fused, blocksize) is not None:
            continue
        if layout == "bsr" and blocksize[0] * blocksize[1] == 1:
            continue  # 1x1 blocks are CSR with extra overhead
        fmt = _format(layout, blocksize)
        try:
            components = fmt.components(fused.reshape(fused.shape[0], -1), quantized if layout in quant else None)
        except ValueError:  # not 2:4, say
            continue
        formats[layout] = fmt
        variants[layout] = layer.sparse_fn(fmt, components)
    key = layer_key(layer, formats, blocksize, record_bits) if decisions is not None else None
    decided = decisions.get(key) if decisions is not None else None
    if decided is not None and (decided == "fuse" or decided in formats):
        times = layer.time({k: v for k, v in variants.items() if k in ("masked", decided)})
        if times[decided] is not None:
            note = f"auto: {decided}, decided before on this machine ({decisions.path.name})"
            return formats.get(decided), note, times["masked"], times[decided]
    samples = layer.samples(variants)
    if samples["fuse"] is None:
        return None, "auto: the layer did not run on example_inputs; fused", None, None
    # The pick compares each variant's fastest round: the least disturbed one, so that a machine whose load
    # changes between runs (a co-tenant's bursts) still gets the same picks; the report keeps the medians.
    fastest = {k: min(s) for k, s in samples.items()}
    choice, note = choose_backend(fastest["fuse"], {k: fastest[k] for k in formats})
    if decisions is not None:
        decisions.put(key, choice, note)
    times = {k: statistics.median(s) for k, s in samples.items()}
    return formats.get(choice), note, times["masked"], times[choice]
