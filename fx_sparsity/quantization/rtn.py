"""Round-to-nearest quantization and the grid math GPTQ and SparseGPT's joint mode share: pure tensor code.

A row (int8) or group of columns (int4) gets its scale from the values it holds, pruned entries
counting as zero (so a pruned weight's scale is that of its kept entries, and 0 is always on the grid):

* symmetric: ``scale = max|w| / qmax`` (``qmax`` = 127 or 7), ``q = clamp(round(w / scale), -qmax, qmax)``;
* zero point (int4): the range ``[min(w, 0), max(w, 0)]``, ``scale = (max - min) / 15``,
  ``zero = round(-min / scale)``, ``q = clamp(round(w / scale) + zero, 0, 15)``, ``w ~ scale * (q - zero)``;

as IST-DASLab/gptq's ``Quantizer`` does (its symmetric int4 grid is ``2 max|w| / 15`` over ``[-8, 7]``;
ours is restricted to ``[-7, 7]``, see :mod:`.spec`). Rules for the edges: a row or group that is all
zero gets ``scale = 1`` (and ``zero = 0``), its values 0; a scale that would underflow float32's
smallest normal number (``max|w| < 127 * 1.2e-38``) is clamped to it, which still holds every value
of the row on the grid; scales are computed in float64 and stored in float32 (a finite float32
weight never overflows them). Non-finite weights are refused.
"""

from __future__ import annotations

import math

import torch

from fx_sparsity.quantization.spec import QuantizedWeight, QuantSpec, SpecLike, as_spec, check_fits

__all__ = ["quantize_weight", "dequantize", "grid_params", "round_to_grid", "from_grid", "weight_matrix", "keep_matrix"]

_TINY = torch.finfo(torch.float32).tiny


def grid_params(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The scale (and zero point) of each row of ``w`` (``[..., k]``: the values one scale covers).

    Returns:
        ``(scale, zero)``: float32 ``[...]``; ``zero`` holds integers in ``[0, 15]``, or is ``None``
        for a symmetric grid.

    Example::

        >>> from fx_sparsity.quantization import QuantSpec
        >>> from fx_sparsity.quantization.rtn import grid_params
        >>> scale, zero = grid_params(torch.tensor([[-1.0, 2.0], [0.0, 0.0]]), QuantSpec(4, zero_point=True))
        >>> scale.tolist(), zero.tolist()
        ([0.20000000298023224, 1.0], [5.0, 0.0])
    """
    w = w.detach().double()
    if spec.zero_point:
        low, high = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
        span = high - low
        scale = torch.where(span == 0, 1.0, span / spec.qmax).clamp(min=_TINY).float()
        zero = torch.round((0.0 - low).float() / scale).clamp(0, spec.qmax)  # 0 - low: never -0.0
        return scale, zero
    amax = w.abs().amax(-1)
    return torch.where(amax == 0, 1.0, amax / spec.qmax).clamp(min=_TINY).float(), None


def round_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """The grid values (float32 integers in ``[spec.qmin, spec.qmax]``) nearest to ``w``, for ``scale``/``zero``
    broadcasting against it."""
    q = torch.round(w.float() / scale)
    if zero is not None:
        return (q + zero).clamp(0, spec.qmax)
    return q.clamp(-spec.qmax, spec.qmax)


def from_grid(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """The weights grid values ``q`` stand for: ``scale * q`` or ``scale * (q - zero)`` (float32)."""
    return scale * (q.float() - zero) if zero is not None else scale * q.float()


def quantize_weight(weight: torch.Tensor, spec: SpecLike, mask: torch.Tensor | None = None) -> QuantizedWeight:
    """Round ``weight`` to the nearest point of ``spec``'s grid (round-to-nearest, RTN).

    Args:
        weight: ``[out, in]`` or a conv weight ``[out, in / groups, *kernel]`` (its ``[out, in * kernel]``
            view's rows get the scales); any floating dtype.
        spec: a :class:`QuantSpec` or its name (``"int8"``, ``"int4-g128"``, ...).
        mask: optional, of ``weight``'s shape, nonzero/``True`` = kept: the other entries are
            quantized as zeros (values 0, or the zero point), and the scales are those of the kept entries.

    Returns:
        The :class:`QuantizedWeight`; :func:`dequantize` gives the weight it stands for.

    Raises:
        TypeError: ``weight`` is not a floating tensor, or ``spec`` is not a spec.
        ValueError: a bad spec name, non-finite weights, a mask of another shape, or columns the
            int4 groups do not tile.

    Example::

        >>> from fx_sparsity.quantization import dequantize, quantize_weight
        >>> w = torch.tensor([[0.5, -1.0, 0.0, 0.25]])
        >>> q = quantize_weight(w, "int8")
        >>> q.values.tolist(), bool((dequantize(q) - w).abs().max() <= q.scales.max() / 2)
        ([[64, -127, 0, 32]], True)
    """
    spec = as_spec(spec)
    matrix = weight_matrix(weight, "weight")
    check_fits(spec, tuple(weight.shape), "weight")
    if mask is not None:
        matrix = torch.where(keep_matrix(mask, weight), matrix, 0.0)
    rows, columns = matrix.shape
    size = spec.group_columns(columns)
    groups = matrix.view(rows, columns // size, size)
    scale, zero = grid_params(groups, spec)
    q = round_to_grid(groups, scale[..., None], None if zero is None else zero[..., None], spec)
    return QuantizedWeight(
        q.to(torch.int8).reshape(weight.shape),
        scale if spec.group_size is not None else scale[:, 0],
        None if zero is None else zero.to(torch.int8),
        spec,
    )


def dequantize(quantized: QuantizedWeight) -> torch.Tensor:
    """The float32 weight a :class:`QuantizedWeight` stands for: ``scale * q`` or ``scale * (q - zero)``.

    Example::

        >>> from fx_sparsity.quantization import dequantize, quantize_weight
        >>> w = torch.tensor([[1.0, 0.0, -0.5] * 32])
        >>> dequantize(quantize_weight(w, "int4-g32-zp"))[0, :3].tolist()
        [1.0, 0.0, -0.5]
    """
    if not isinstance(quantized, QuantizedWeight):
        raise TypeError(f"dequantize takes a QuantizedWeight, got {type(quantized).__name__}")
    values = quantized.values
    rows, columns = values.shape[0], math.prod(values.shape[1:])
    size = quantized.spec.group_columns(columns)
    scale = quantized.scales.reshape(rows, columns // size, 1)
    zero = None if quantized.zeros is None else quantized.zeros.reshape(rows, columns // size, 1).float()
    return from_grid(values.reshape(rows, columns // size, size), scale, zero).reshape(values.shape)


def weight_matrix(weight: object, name: str) -> torch.Tensor:
    """``weight``'s float32 ``[out, in * kernel]`` view (a copy when the dtype changes), checked: a floating tensor
    of >= 2 dims with finite entries, else a ``TypeError``/``ValueError`` naming ``name``."""
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        got = getattr(weight, "dtype", type(weight).__name__)
        raise TypeError(f"{name} must be a floating-point tensor, got {got}")
    if weight.dim() < 2:
        raise ValueError(f"{name} must be [out, in, ...], got shape {tuple(weight.shape)}")
    matrix = weight.detach().reshape(weight.shape[0], -1).float()
    if not torch.isfinite(matrix).all():
        raise ValueError(f"{name} has non-finite entries (inf or NaN): they have no place on a quantization grid")
    return matrix


def keep_matrix(mask: object, weight: torch.Tensor) -> torch.Tensor:
    """``mask`` (nonzero = kept) as a boolean ``[out, in * kernel]`` matrix; a ``ValueError`` unless it has
    ``weight``'s shape."""
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(weight.shape):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a tensor of the weight's shape {tuple(weight.shape)}, got {shape}")
    return mask.detach().reshape(weight.shape[0], -1).to(weight.device) != 0
