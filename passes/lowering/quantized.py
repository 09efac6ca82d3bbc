"""Packing quantized weights (int8 and int4 values) into the formats of our C++ kernels, and back.

Plain tensor code (no FX, no C++), testable alone. The input is a quantized weight as the
quantization code produces it (:class:`QuantizedComponents`, or any object with ``values``,
``scales`` and ``zeros`` attributes, such as ``fx_sparsity.quantization``'s ``QuantizedWeight``):

* ``values``: int8 ``[out, in]``, one integer per weight: in ``[-127, 127]`` (int8), ``[-7, 7]``
  (symmetric int4) or ``[0, 15]`` (int4 with zero points);
* ``scales``: float32, ``[out]`` (int8: one per output row) or ``[out, in // group_size]`` (int4:
  group ``g`` of row ``r`` covers columns ``g * group_size`` to ``(g + 1) * group_size``, with
  ``group_size`` in :data:`QUANT_GROUP_SIZES`);
* ``zeros``: int8 of ``scales``' shape in ``[0, 15]`` (int4 with zero points), else ``None``.

The weight they stand for is ``scale * value`` (symmetric) or ``scale * (value - zero)``, in
float32 (:func:`dequantize`). A pruned entry is value 0 of a symmetric format.

Formats (:data:`QUANT_LAYOUTS`; components in the kernels' order):

* ``bitmask-int8`` / ``bitmask-int4``: ``(bitmask, values, row_offsets, scales)``, the bitmask
  layout of :mod:`passes.lowering.formats` with the kept values as codes;
* ``nm-int8`` / ``nm-int4``: ``(bitmask, values, scales)``, N:M with ``[out, kept]`` codes;
* ``csr-int8`` / ``csr-int4``: ``(crow_indices, col_indices, values, scales)``, narrow-index CSR;
* ``dense-int8``: ``(values, scales)``; ``dense-int4``: ``(values, scales, zeros)``.

Codes: int8 values are stored as they are (int8). int4 values are stored as unsigned 4-bit codes
``u``, two per byte of a uint8 stream, **low nibble first** (code ``k`` is bits ``4 * (k % 2)`` to
``4 * (k % 2) + 3`` of byte ``k // 2``); the weight is ``scale * (u - zero)`` with ``zero = 8`` for
the symmetric formats (``u = value + 8``, in ``[1, 15]``). bitmask and csr keep one stream for the
whole weight (``row_offsets`` counts codes, so a row may start in the middle of a byte); nm
rows are padded to whole bytes (``[out, ceil(kept / 2)]``, the pad code 8 decodes to 0).
``dense-int4`` stores ``[out, in / 2]`` bytes and always has zero points: ``u = value`` and the
given ``zeros``, or ``u = value + 8`` and zeros of 8 for a symmetric weight.

What cannot be held is refused with a ``ValueError`` (:func:`check_quantized`): values or
scales out of range or of the wrong dtype or shape, int4 on ``in_features`` not divisible by
the group (no padding rule: pad the layer or choose a group size that divides it), zero points
with a sparse format (a pruned entry must decode to exactly 0 and an asymmetric code 0 does
not; the sparse formats drop zeros, so they are symmetric only).

Example::

    >>> values = torch.tensor([[0, 3, 0, -2]], dtype=torch.int8)
    >>> q = QuantizedComponents(values, torch.tensor([0.5]))
    >>> parts = to_quantized_components("bitmask-int8", q)
    >>> [p.tolist() for p in parts[1:]]
    [[3, -2], [0, 2], [0.5]]
    >>> quantized_to_dense("bitmask-int8", parts, 4).tolist()
    [[0.0, 1.5, 0.0, -1.0]]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from passes.lowering.formats import (
    bitmask_to_dense,
    csr_to_dense,
    detect_nm,
    nm_to_dense,
    to_bitmask_components,
    to_narrow_csr_components,
    to_nm_components,
)

__all__ = [
    "QUANT_LAYOUTS",
    "QUANT_COMPONENT_NAMES",
    "QUANT_GROUP_SIZES",
    "QuantizedComponents",
    "as_quantized",
    "check_quantized",
    "dequantize",
    "pack_int4",
    "unpack_int4",
    "to_quantized_components",
    "quantized_to_dense",
    "quant_bits",
]

QUANT_GROUP_SIZES = (32, 64, 128)
QUANT_COMPONENT_NAMES = {
    "bitmask-int8": ("bitmask", "values", "row_offsets", "scales"),
    "bitmask-int4": ("bitmask", "values", "row_offsets", "scales"),
    "nm-int8": ("bitmask", "values", "scales"),
    "nm-int4": ("bitmask", "values", "scales"),
    "csr-int8": ("crow_indices", "col_indices", "values", "scales"),
    "csr-int4": ("crow_indices", "col_indices", "values", "scales"),
    "dense-int8": ("values", "scales"),
    "dense-int4": ("values", "scales", "zeros"),
}
QUANT_LAYOUTS = tuple(QUANT_COMPONENT_NAMES)
_INT4_ZERO = 8  # the zero point of the symmetric int4 codes


@dataclass(frozen=True)
class QuantizedComponents:
    """A quantized ``[out, in]`` weight: ``values`` (int8), ``scales`` (float32) and ``zeros`` (int8 or
    ``None``), as described in the module docstring. Validated by :func:`check_quantized`, not here."""

    values: Tensor
    scales: Tensor
    zeros: Tensor | None = None


def as_quantized(quantized: object, name: str = "quantized") -> QuantizedComponents:
    """``quantized`` as :class:`QuantizedComponents`: an object with ``values``/``scales``/``zeros``
    attributes (``zeros`` optional) or a mapping with those keys.

    Raises:
        TypeError: ``quantized`` is neither (``name`` says which argument it was).

    Example::

        >>> as_quantized({"values": torch.zeros(1, 2, dtype=torch.int8), "scales": torch.ones(1)}).zeros is None
        True
    """
    if isinstance(quantized, QuantizedComponents):
        return quantized
    if isinstance(quantized, Mapping) and "values" in quantized and "scales" in quantized:
        return QuantizedComponents(quantized["values"], quantized["scales"], quantized.get("zeros"))
    if hasattr(quantized, "values") and hasattr(quantized, "scales") and not isinstance(quantized, Mapping):
        return QuantizedComponents(quantized.values, quantized.scales, getattr(quantized, "zeros", None))
    raise TypeError(
        f"{name} must hold values, scales and zeros (a QuantizedWeight, QuantizedComponents or a mapping with "
        f"those keys), got {type(quantized).__name__}"
    )


def quant_bits(layout: str) -> int:
    """8 or 4: the value width of a quantized layout (``"csr-int4"`` -> 4)."""
    if layout not in QUANT_COMPONENT_NAMES:
        raise ValueError(f"layout must be one of {', '.join(QUANT_LAYOUTS)}, got {layout!r}")
    return int(layout.rsplit("int", 1)[1])


def check_quantized(q: QuantizedComponents, bits: int, sparse: bool = False) -> int:
    """Check that ``q`` is a weight the ``bits``-wide formats hold; return its group size (int8: the row).

    Args:
        q: the quantized weight.
        bits: 8 or 4.
        sparse: the format drops zeros (bitmask, nm, csr): zero points are refused.

    Returns:
        The number of columns one scale covers.

    Raises:
        ValueError: naming the component, what it is and what it must be.

    Example::

        >>> check_quantized(QuantizedComponents(torch.zeros(2, 64, dtype=torch.int8), torch.ones(2, 2)), 4)
        32
    """
    values, scales, zeros = q.values, q.scales, q.zeros
    if not isinstance(values, Tensor) or values.dtype != torch.int8 or values.dim() != 2:
        got = f"{values.dtype} {tuple(values.shape)}" if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(f"values must be a 2-D torch.int8 tensor [out_features, in_features], got {got}")
    rows, cols = values.shape
    if not isinstance(scales, Tensor) or scales.dtype != torch.float32:
        got = scales.dtype if isinstance(scales, Tensor) else type(scales).__name__
        raise ValueError(f"scales must be a torch.float32 tensor, got {got}")
    if bits == 8:
        if tuple(scales.shape) != (rows,):
            raise ValueError(f"int8 scales must be one per output row, shape ({rows},), got {tuple(scales.shape)}")
        if zeros is not None:
            raise ValueError("int8 formats are symmetric: zeros must be None (zero points are for int4 only)")
        lo, hi, group = -127, 127, cols
    elif bits == 4:
        if scales.dim() != 2 or scales.shape[0] != rows or scales.shape[1] < 1:
            raise ValueError(f"int4 scales must be [out_features, groups] = [{rows}, in_features // group_size], "
                             f"got {tuple(scales.shape)}")
        groups = scales.shape[1]
        group = cols // groups
        if cols % groups or group not in QUANT_GROUP_SIZES:
            raise ValueError(
                f"int4 scales of {groups} groups per row do not split in_features={cols} into groups of "
                f"{' / '.join(map(str, QUANT_GROUP_SIZES))} columns; in_features must be a multiple of the group size "
                "(pad the layer's inputs, or quantize with a group size that divides it)"
            )
        if zeros is None:
            lo, hi = -7, 7
        else:
            if sparse:
                raise ValueError(
                    "zero points cannot be held by a sparse format: it drops the zeros, and a pruned entry must "
                    "decode to exactly 0; quantize symmetrically (zeros=None) or use dense-int4"
                )
            if not isinstance(zeros, Tensor) or zeros.dtype != torch.int8 or zeros.shape != scales.shape:
                got = f"{zeros.dtype} {tuple(zeros.shape)}" if isinstance(zeros, Tensor) else type(zeros).__name__
                raise ValueError(f"zeros must be a torch.int8 tensor of scales' shape {tuple(scales.shape)}, got {got}")
            if zeros.numel() and (int(zeros.min()) < 0 or int(zeros.max()) > 15):
                raise ValueError(f"zeros must be integers in [0, 15], got {int(zeros.min())}..{int(zeros.max())}")
            lo, hi = 0, 15
    else:
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    if values.numel() and (int(values.min()) < lo or int(values.max()) > hi):
        raise ValueError(f"{'int8' if bits == 8 else 'int4'} values must be integers in [{lo}, {hi}], got "
                         f"{int(values.min())}..{int(values.max())}; quantize to that range")
    if scales.numel():
        bad = ~(torch.isfinite(scales) & (scales > 0))
        if bool(bad.any()):
            index = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(f"scales must be finite and > 0, got {float(scales[index])} at {index} "
                             "(an all-zero row or group takes scale 1)")
        if not bool(torch.isfinite(scales * max(abs(lo), hi)).all()):
            raise ValueError(f"a scale times the largest value ({max(abs(lo), hi)}) overflows float32: "
                             f"max scale {float(scales.max())}")
    return group


def dequantize(values: Tensor, scales: Tensor, zeros: Tensor | None = None) -> Tensor:
    """The float32 ``[out, in]`` weight a quantized weight stands for: ``scale * (value - zero)``.

    Example::

        >>> dequantize(torch.tensor([[2, -1]], dtype=torch.int8), torch.tensor([0.5])).tolist()
        [[1.0, -0.5]]
    """
    rows, cols = values.shape
    s = scales.reshape(rows, -1)
    group = cols // s.shape[1] if s.shape[1] else cols
    v = values.to(torch.float32)
    if zeros is not None:
        v = v - zeros.reshape(rows, -1).to(torch.float32).repeat_interleave(group, dim=1)
    return v * s.repeat_interleave(group, dim=1)


def pack_int4(codes: Tensor) -> Tensor:
    """Unsigned 4-bit ``codes`` (any integer dtype, values in ``[0, 15]``, packed along the last dim) as
    uint8, two per byte, low nibble first; an odd last dim is padded with code 8 (a symmetric zero).

    Example::

        >>> pack_int4(torch.tensor([1, 2, 3])).tolist()
        [33, 131]
    """
    c = codes.to(torch.uint8)
    if c.shape[-1] % 2:
        c = torch.cat([c, c.new_full((*c.shape[:-1], 1), _INT4_ZERO)], dim=-1)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: Tensor, count: int) -> Tensor:
    """The first ``count`` codes (uint8, along the last dim) of :func:`pack_int4`'s output."""
    p = packed.to(torch.uint8)
    codes = torch.stack([p & 15, p >> 4], dim=-1).flatten(-2)
    return codes[..., :count]


def to_quantized_components(layout: str, quantized: object, nm: tuple[int, int] | None = None) -> tuple[Tensor, ...]:
    """The strided tensors the operator of quantized ``layout`` takes for a quantized weight.

    Args:
        layout: one of :data:`QUANT_LAYOUTS`.
        quantized: values/scales/zeros (see :func:`as_quantized`), checked by :func:`check_quantized`.
        nm: the ``(n, m)`` pattern of an ``nm-*`` layout; ``None`` detects it in the nonzero values.

    Returns:
        The components, named by :data:`QUANT_COMPONENT_NAMES` ``[layout]``.

    Raises:
        ValueError: the weight cannot be held (see :func:`check_quantized`), or is not N:M for ``nm-*``.

    Example::

        >>> q = QuantizedComponents(torch.tensor([[1, 0, 0, -7]], dtype=torch.int8), torch.tensor([1.0]))
        >>> mask, values, scales = to_quantized_components("nm-int8", q)
        >>> values.tolist()
        [[1, -7]]
    """
    bits = quant_bits(layout)
    q = as_quantized(quantized)
    family = layout.split("-")[0]
    check_quantized(q, bits, sparse=family != "dense")
    values, scales = q.values.detach().cpu(), q.scales.detach().cpu().contiguous()
    rows, cols = values.shape
    device = q.values.device

    def out(*parts: Tensor) -> tuple[Tensor, ...]:
        return tuple(p.contiguous().to(device) for p in parts)

    if family == "dense":
        if bits == 8:
            return out(values, scales)
        zeros = torch.full_like(scales, _INT4_ZERO, dtype=torch.int8) if q.zeros is None else q.zeros.detach().cpu()
        codes = values + (_INT4_ZERO if q.zeros is None else 0)
        return out(pack_int4(codes), scales, zeros)
    if family == "bitmask":
        mask, kept, offsets = to_bitmask_components(values)
        return out(mask, kept if bits == 8 else pack_int4(kept + _INT4_ZERO), offsets, scales)
    if family == "csr":
        crow, col, kept = to_narrow_csr_components(values)
        return out(crow, col, kept if bits == 8 else pack_int4(kept + _INT4_ZERO), scales)
    pattern = nm or detect_nm(values)
    if pattern is None:
        raise ValueError(
            "the quantized values are not N:M sparse (no group of 4, 8 or 16 columns bounds the nonzeros per "
            "group to half or less); use a bitmask format or prune with an N:M sparsifier"
        )
    mask, kept = to_nm_components(values, *pattern)
    return out(mask, kept if bits == 8 else pack_int4(kept + _INT4_ZERO), scales)


def quantized_to_dense(layout: str, components: Sequence[Tensor], in_features: int) -> Tensor:
    """The float32 dense ``[out, in_features]`` weight of quantized components (the kernels' reference).

    Example::

        >>> q = QuantizedComponents(torch.tensor([[0, 5, 0, 0]], dtype=torch.int8), torch.tensor([2.0]))
        >>> quantized_to_dense("csr-int8", to_quantized_components("csr-int8", q), 4).tolist()
        [[0.0, 10.0, 0.0, 0.0]]
    """
    bits = quant_bits(layout)
    family = layout.split("-")[0]
    parts = dict(zip(QUANT_COMPONENT_NAMES[layout], components))
    values, scales = parts["values"], parts["scales"]
    rows = scales.shape[0]

    def codes(stream: Tensor, count: int) -> Tensor:
        """The int8 values of the stored codes (int4: unpacked, the symmetric zero removed)."""
        if bits == 8:
            return stream[:count]
        return unpack_int4(stream, count).to(torch.int8) - _INT4_ZERO

    if family == "dense":
        if bits == 8:
            return dequantize(values, scales)
        return dequantize(unpack_int4(values, in_features).to(torch.int8), scales, parts["zeros"])
    if family == "bitmask":
        count = int(parts["row_offsets"][-1])
        q = bitmask_to_dense(parts["bitmask"], codes(values.reshape(-1), count), parts["row_offsets"], in_features)
    elif family == "csr":
        count = parts["col_indices"].numel()
        q = csr_to_dense(parts["crow_indices"], parts["col_indices"], codes(values.reshape(-1), count), in_features)
    else:  # every row keeps the same number of entries; an odd row's pad code is dropped
        kept = _kept_per_row(parts["bitmask"], in_features) if rows else 0
        q = nm_to_dense(parts["bitmask"], codes(values, kept) if bits == 4 else values, in_features)
    return dequantize(q.reshape(rows, in_features), scales)


def _kept_per_row(mask: Tensor, cols: int) -> int:
    """Set bits in the first row of a packed bit mask (an N:M mask keeps as many in every row)."""
    bits = (mask[0].to(torch.int32).unsqueeze(-1) >> torch.arange(8, dtype=torch.int32, device=mask.device)) & 1
    return int(bits.flatten()[:cols].sum())
