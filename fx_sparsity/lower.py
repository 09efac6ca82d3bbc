"""``lower``: turn a prepared (masked) GraphModule into one without masks, ready for ``torch.export``.

Backends, chosen for all layers at once or per layer in the FQN-keyed form of
the sparsity config (layers no entry selects are fused)::

    lower(gm, "csr")
    lower(gm, {"fc*": "csr", "head": {"backend": "bsr", "blocksize": (32, 32)}})
    lower(gm, [{"tensor_fqn": "fc.weight", "backend": "auto"}], example_inputs=(x,))

* ``"fuse"``: the weight becomes ``weight * mask`` and the op a plain dense
  linear/conv (a ``call_module`` again where the model was traced that way).
* ``"csr"`` / ``"bsr"``: Linear and 1x1 Conv ops (strided too) call the ``fx_sparsity::csr_linear``
  / ``bsr_linear`` operators (:mod:`passes.sparse_ops`); other convs are fused.
  On CPU these run on MKL, which takes float32/float64 and square blocks only.
* ``"semi_structured"``: 2:4 weights in fp16/bf16 on a CUDA GPU (CUTLASS).
* ``"auto"``: per layer, times every backend the layer can take on its own
  input from ``example_inputs`` and keeps a sparse kernel only when it beats the
  fused dense op by :data:`AUTO_MIN_SPEEDUP`.

The prepared module and the user's model are not modified. The returned
module's ``meta["fx_sparsity.lowering"]`` holds one :class:`LayerLowering` per
weight; :func:`fx_sparsity.lowering_table` prints them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor, fx

from passes import find_masked_weights, fuse_masks, masked_targets, select_weights
from passes.lower_sparse import COMPONENT_NAMES, LAYOUTS, SparseFormat, lower_sparse, lowering_blocker, unsupported_reason

from .config import parse_config
from .layer_timing import LayerTimer, record_op_calls
from .progress import progress
from .sparsifier.base import SPARSIFIER_META_KEY, _clone_without_sparsifier

__all__ = ["lower", "LayerLowering", "get_lowering", "BACKENDS", "AUTO_MIN_SPEEDUP", "LOWERING_META_KEY"]

BACKENDS = ("fuse", *LAYOUTS, "auto")
LOWERING_META_KEY = "fx_sparsity.lowering"
# "auto" keeps a sparse kernel only when it is this many times faster than the fused dense op,
# so that timing noise never leaves a layer slower than dense.
AUTO_MIN_SPEEDUP = 1.1

BackendConfig = Union[str, Sequence[Mapping[str, Any]], Mapping[str, Union[str, Mapping[str, Any]]]]



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
            lowered layer on its input from ``example_inputs`` (medians); ``None`` without them.
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


def get_lowering(gm: fx.GraphModule) -> tuple[LayerLowering, ...]:
    """The per-layer records :func:`lower` stored on the module it returned."""
    records = getattr(gm, "meta", {}).get(LOWERING_META_KEY)
    if records is None:
        raise ValueError("this module was not returned by fx_sparsity.lower(); it has no lowering records")
    return records


def _check_backend(value: object, where: str) -> str:
    if value not in BACKENDS:
        raise ValueError(f"{where} must be one of {', '.join(map(repr, BACKENDS))}, got {value!r}")
    return value


def _blocksize(value: object, where: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if not (isinstance(value, Sequence) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value
    )):
        raise ValueError(f"{where} must be a positive int or a (rows, cols) pair, got {value!r}")
    return tuple(value)


def _requests(gm: fx.GraphModule, backend: BackendConfig) -> dict[str, dict[str, Any]]:
    """tensor FQN -> {"backend", "blocksize"} for every masked weight."""
    matches = find_masked_weights(gm)
    if isinstance(backend, str):
        _check_backend(backend, "backend")
        return {m.tensor_fqn: {"backend": backend, "blocksize": None} for m in matches}
    if isinstance(backend, Mapping):
        for key, value in backend.items():
            if not isinstance(value, (str, Mapping)):
                raise TypeError(
                    f"backend[{key!r}] must be a backend name or a dict like "
                    f"{{'backend': 'bsr', 'blocksize': 32}}, got {type(value).__name__}"
                )
        backend = {k: {"backend": v} if isinstance(v, str) else v for k, v in backend.items()}
    elif not isinstance(backend, Sequence):
        raise TypeError(
            f"backend must be a string like 'csr' or a per-layer config like {{'fc': 'csr'}}, "
            f"got {type(backend).__name__}"
        )
    requests = {m.tensor_fqn: {"backend": "fuse", "blocksize": None} for m in matches}
    for match, overrides in select_weights(gm, matches, parse_config(backend)):
        extra = set(overrides) - {"backend", "blocksize"}
        if extra:
            raise ValueError(
                f"backend entry for {match.tensor_fqn} sets {sorted(extra)}; only 'backend' and 'blocksize' apply"
            )
        name = _check_backend(overrides.get("backend", "fuse"), f"backend for {match.tensor_fqn}")
        size = _blocksize(overrides.get("blocksize"), f"blocksize for {match.tensor_fqn}")
        requests[match.tensor_fqn] = {"backend": name, "blocksize": size}
    return requests


def _default_blocksize(gm: fx.GraphModule, tensor_fqn: str) -> tuple[int, int] | None:
    sparsifier = getattr(gm, "meta", {}).get(SPARSIFIER_META_KEY)
    for group in getattr(sparsifier, "groups", ()):
        if group["tensor_fqn"] == tensor_fqn and "sparse_block_shape" in group:
            return tuple(group["sparse_block_shape"])
    return None


def _choose(fused_seconds: float, sparse_seconds: Mapping[str, float]) -> tuple[str, str]:
    """``auto``'s pick and its note: the fastest sparse backend if it beats fused by AUTO_MIN_SPEEDUP."""
    if not sparse_seconds:
        return "fuse", "auto: no sparse kernel fits this layer"
    timings = ", ".join(f"{k} {fused_seconds / v:.2f}x" for k, v in sparse_seconds.items())
    best = min(sparse_seconds, key=sparse_seconds.get)
    if sparse_seconds[best] * AUTO_MIN_SPEEDUP <= fused_seconds:
        return best, f"auto: {timings} vs fused"
    return "fuse", f"auto: fused ({timings})"


def _resolve(gm: fx.GraphModule, layer: LayerTimer, request: dict[str, Any], timed: bool) -> tuple[SparseFormat | None, str, float | None]:
    """The format a layer gets (``None``: fuse), the note, and its lowered time when measured."""
    fqn, wanted = layer.target.tensor_fqn, request["backend"]
    blocksize = request["blocksize"] or _default_blocksize(gm, fqn)
    fused = layer.fused()
    if wanted == "fuse":
        return None, "", layer.time_dense(fused) if timed else None
    blocker = lowering_blocker(gm, fqn)
    if blocker is not None:
        return None, f"fused: {blocker}", layer.time_dense(fused) if timed else None
    if wanted != "auto":
        reason = unsupported_reason(wanted, fused, blocksize)
        if reason is not None:
            raise ValueError(f"cannot lower {fqn} with backend {wanted!r}: {reason}; use 'fuse' or 'auto'")
        fmt = SparseFormat(wanted, blocksize if wanted == "bsr" else None)
        if not timed:
            return fmt, "", None
        try:
            components = fmt.components(fused.reshape(fused.shape[0], -1))
        except ValueError as e:
            raise ValueError(f"cannot lower {fqn} to {wanted}: {e}") from None
        return fmt, "", layer.time_sparse(fmt, components)
    candidates = {}
    for layout in LAYOUTS:
        if unsupported_reason(layout, fused, blocksize) is not None:
            continue
        if layout == "bsr" and blocksize[0] * blocksize[1] == 1:
            continue  # 1x1 blocks are CSR with extra overhead
        fmt = SparseFormat(layout, blocksize if layout == "bsr" else None)
        try:
            components = fmt.components(fused.reshape(fused.shape[0], -1))
        except ValueError:  # not 2:4, say
            continue
        candidates[layout] = (fmt, layer.time_sparse(fmt, components))
    dense_seconds = layer.time_dense(fused)
    choice, note = _choose(dense_seconds, {k: v[1] for k, v in candidates.items()})
    if choice == "fuse":
        return None, note, dense_seconds
    return candidates[choice][0], note, candidates[choice][1]


def _stored_bytes(gm: fx.GraphModule, tensor_fqn: str) -> int:
    module_fqn, _, name = tensor_fqn.rpartition(".")
    owner = gm.get_submodule(module_fqn)
    parts = dict.fromkeys(p for layout_parts in COMPONENT_NAMES.values() for p in layout_parts)
    names = [name] + [f"{name}_{p}" for p in parts]
    tensors = [getattr(owner, n) for n in names if isinstance(getattr(owner, n, None), Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def lower(
    gm: fx.GraphModule,
    backend: BackendConfig = "fuse",
    *,
    example_inputs: Any = None,
    repeats: int = 5,
    progress_bar: bool = True,
) -> fx.GraphModule:
    """Return a new module computing ``gm`` with no mask nodes or mask buffers.

    Args:
        gm: a module returned by :func:`fx_sparsity.prepare` (masks still in place).
        backend: one of :data:`BACKENDS` for every layer, or a per-layer config
            (FQN-keyed dict or list of dicts with ``"backend"`` and, for bsr,
            ``"blocksize"``); layers it does not select are fused.
        example_inputs: a tensor or tuple of positional inputs; required by
            ``"auto"``, and with it each layer's time before and after is measured.
        repeats: timed samples per measurement (the median is used).
        progress_bar: show a progress bar on stderr while layers are timed.

    Returns:
        The lowered ``GraphModule``; :func:`get_lowering` gives its per-layer records.

    Raises:
        ValueError: ``gm`` has no masks, a backend or blocksize is invalid, or an
            explicit backend cannot hold a layer on this machine (the message says
            why; ``"auto"`` falls back to fusing instead).

    Example::

        >>> gm = fx_sparsity.prepare(nn.Sequential(nn.Linear(64, 64)), sparsifier=WeightNormSparsifier(0.9))
        >>> fx_sparsity.get_sparsifier(gm).step()
        >>> lowered = fx_sparsity.lower(gm, "csr")
        >>> torch.export.export(lowered, (torch.randn(2, 64),))  # doctest: +SKIP
    """
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"gm must be the GraphModule prepare() returned, got {type(gm).__name__}")
    if not masked_targets(gm):
        raise ValueError(
            "gm has no mask nodes: lower() takes the module prepare() returned, before squash_mask()"
        )
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    requests = _requests(gm, backend)
    timed = example_inputs is not None
    if not timed and any(r["backend"] == "auto" for r in requests.values()):
        raise ValueError("backend 'auto' times each layer on its input: pass example_inputs=(x,)")
    calls = record_op_calls(gm, example_inputs) if timed else {}

    formats, records = {}, []
    targets = masked_targets(gm)
    for target in progress(targets, progress_bar and timed, "lower: timing layers", len(targets)):
        fqn, request = target.tensor_fqn, requests[target.tensor_fqn]
        layer = LayerTimer(gm, target, calls.get(fqn, []), repeats)
        fmt, note, seconds_after = _resolve(gm, layer, request, timed)
        if fmt is not None:
            formats[fqn] = fmt
        records.append((layer, request, fmt, note, layer.time_masked() if timed else None, seconds_after))

    lowered = _clone_without_sparsifier(gm)
    lower_sparse(lowered, formats)
    fuse_masks(lowered)
    lowered.meta[LOWERING_META_KEY] = tuple(
        LayerLowering(
            tensor_fqn=layer.target.tensor_fqn,
            kind=layer.target.kind,
            weight_shape=layer.target.weight_shape,
            requested=request["backend"],
            backend="fuse" if fmt is None else fmt.layout,
            blocksize=None if fmt is None else fmt.blocksize,
            note=note,
            sparsity=1.0 - int(torch.count_nonzero(layer.mask)) / layer.mask.numel(),
            dense_bytes=layer.weight.numel() * layer.weight.element_size(),
            lowered_bytes=_stored_bytes(lowered, layer.target.tensor_fqn),
            time_before=before,
            time_after=after,
        )
        for layer, request, fmt, note, before, after in records
    )
    return lowered
