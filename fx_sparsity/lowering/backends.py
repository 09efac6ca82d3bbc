"""The backend argument of :func:`fx_sparsity.lower`, turned into one typed request per masked weight.

Accepted forms: one backend name for every layer (``"csr"``), or a per-layer
config in the sparsity config's forms, whose entries hold ``"backend"`` and, for
``"bsr"`` and ``"auto"``, ``"blocksize"``::

    {"fc*": "csr", "head": {"backend": "bsr", "blocksize": 32}}
    [{"tensor_fqn": "fc.weight", "backend": "auto"}]

Layers no entry selects are fused. Selection follows the sparsity config's
precedence (exact tensor FQN, then module FQN, then the first pattern).

The quantized layouts (``"bitmask-int8"``, ``"nm-int4"``, ``"dense-int8"``, ...; see
:mod:`passes.lowering.quantized`) pack a weight's int8/int4 values: those of its quantization
record (``SparseGPTSparsifier(quantization=...)``, :func:`fx_sparsity.quantization.quantize`), or,
without one, round-to-nearest on the masked weight, on the grid an entry's ``"quantization"`` names
(``{"*": {"backend": "nm-int4", "quantization": "int4-g64"}}``; default ``"int8"`` / ``"int4"``, groups of
128)::

    {"*.mlp.*": "bitmask-int8", "*": {"backend": "nm-int4", "quantization": "int4-g32"}}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

from torch import fx

from fx_sparsity.config import parse_config
from passes.lowering import LAYOUTS, QUANT_LAYOUTS
from passes.matching import WeightMatch, find_masked_weights, select_weights

__all__ = ["BACKENDS", "MODEL_BACKENDS", "BackendConfig", "LayerRequest", "parse_backends"]

BACKENDS = ("fuse", *LAYOUTS, *QUANT_LAYOUTS, "auto")
# Backends that rewrite the whole model at once (coupled layers change together): never per layer.
MODEL_BACKENDS = ("shrink",)
BackendConfig = Union[str, Sequence[Mapping[str, Any]], Mapping[str, Union[str, Mapping[str, Any]]]]
_TAKES_BLOCKSIZE = ("bsr", "auto")


def _check_backend(value: object, where: str) -> str:
    if value in MODEL_BACKENDS:
        raise ValueError(
            f"{where} is {value!r}, which removes channels from the whole model at once (coupled layers shrink "
            f"together): call lower(gm, {value!r}) with no per-layer entries"
        )
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


@dataclass(frozen=True)
class LayerRequest:
    """What one layer asks for: a backend of :data:`BACKENDS`; for bsr/auto, a block size (``None``: the
    sparsifier's square ``sparse_block_shape`` when it has one); for a quantized layout, the grid of its
    round-to-nearest values when the weight has no quantization record (``None``: int8, or int4 in groups of
    128)."""

    backend: str = "fuse"
    blocksize: tuple[int, int] | None = None
    quantization: str | None = None

    def __post_init__(self) -> None:
        _check_backend(self.backend, "LayerRequest.backend")
        object.__setattr__(self, "blocksize", _blocksize(self.blocksize, "LayerRequest.blocksize"))
        if self.blocksize is not None and self.backend not in _TAKES_BLOCKSIZE:
            raise ValueError(
                f"blocksize applies to the 'bsr' and 'auto' backends only, got blocksize={self.blocksize} "
                f"with backend {self.backend!r}: remove it or use backend 'bsr'"
            )
        _check_quantization(self.quantization, self.backend, "LayerRequest.quantization")


def _check_quantization(value: object, backend: str, where: str) -> None:
    if value is None:
        return
    if backend not in QUANT_LAYOUTS:
        raise ValueError(f"{where} applies to the quantized backends ({', '.join(QUANT_LAYOUTS)}), not {backend!r}: "
                         "remove it or choose one of those")
    from fx_sparsity.quantization.spec import as_spec

    spec = as_spec(value)  # raises naming the field and the allowed values
    bits = 8 if backend.endswith("int8") else 4
    if spec.bits != bits:
        raise ValueError(f"{where} is {value!r} ({spec.bits}-bit) but backend {backend!r} holds {bits}-bit values")


def _request(overrides: Mapping[str, Any], fqn: str) -> LayerRequest:
    extra = set(overrides) - {"backend", "blocksize", "quantization"}
    if extra:
        raise ValueError(f"backend entry for {fqn} sets {sorted(extra)}; only 'backend', 'blocksize' and "
                         "'quantization' apply")
    backend = _check_backend(overrides.get("backend", "fuse"), f"backend for {fqn}")
    size = _blocksize(overrides.get("blocksize"), f"blocksize for {fqn}")
    if size is not None and backend not in _TAKES_BLOCKSIZE:
        raise ValueError(
            f"blocksize for {fqn} applies to the 'bsr' and 'auto' backends only, got backend {backend!r}: "
            "remove it or use backend 'bsr'"
        )
    quantization = overrides.get("quantization")
    _check_quantization(quantization, backend, f"quantization for {fqn}")
    return LayerRequest(backend, size, quantization)


def parse_backends(
    gm: fx.GraphModule, backend: BackendConfig, matches: Sequence[WeightMatch] | None = None
) -> dict[str, LayerRequest]:
    """Tensor FQN -> :class:`LayerRequest` for every masked weight of ``gm``.

    ``matches`` are :func:`passes.matching.find_masked_weights` of ``gm``, when the caller has them.

    Raises:
        TypeError / ValueError: an unknown backend, a blocksize that does not
            apply, an entry selecting no masked weight, or a value of the wrong type.

    Example::

        >>> gm = fx_sparsity.prepare(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)))
        >>> requests = parse_backends(gm, {"1": {"backend": "bsr", "blocksize": 4}})
        >>> requests["0.weight"]
        LayerRequest(backend='fuse', blocksize=None, quantization=None)
        >>> requests["1.weight"]
        LayerRequest(backend='bsr', blocksize=(4, 4), quantization=None)
    """
    matches = find_masked_weights(gm) if matches is None else matches
    if isinstance(backend, str):
        request = LayerRequest(_check_backend(backend, "backend"))
        return {m.tensor_fqn: request for m in matches}
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
    requests = {m.tensor_fqn: LayerRequest() for m in matches}
    for match, overrides in select_weights(gm, matches, parse_config(backend)):
        requests[match.tensor_fqn] = _request(overrides, match.tensor_fqn)
    return requests
