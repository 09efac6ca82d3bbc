"""What a weight is quantized to (:class:`QuantSpec`) and what quantizing it gives (:class:`QuantizedWeight`).

Two grids, weight-only (activations stay fp32 or bf16, products accumulate in fp32):

* **int8**: symmetric, one scale per output channel (row of the weight's ``[out, in * kernel]`` view);
  values in ``[-127, 127]``, ``w ~ scale * q``.
* **int4**: one scale per group of ``group_size`` (32, 64 or 128) consecutive columns of that view
  (along ``in_features``; for a conv, along ``in * kernel`` in the weight's own order), either
  symmetric (values in ``[-7, 7]``, ``w ~ scale * q``) or with a zero point per group (values in
  ``[0, 15]``, ``w ~ scale * (q - zero)``).

Values are stored one per ``int8`` element whatever the bit width (packing two int4 values per byte
is the sparse formats' business). The symmetric grids are *restricted* (``-128`` and ``-8`` are never
produced): ``scale = max|w| / 127`` (or ``/ 7``) maps the largest weight of a row or group exactly, of
either sign, and negating a weight negates its value. Every grid holds 0 exactly (a zero point is an
integer in ``[0, 15]`` and the asymmetric range always includes 0), so a pruned weight dequantizes to
exactly 0 and a sparsity mask survives quantization.

A weight whose columns are not a multiple of the int4 group size is refused (:func:`check_fits`),
naming the weight: padding would put groups in the record that straddle nothing real, and the sparse
formats tile groups exactly; leave such a weight out or give it int8.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Union

import torch

__all__ = ["QuantSpec", "QuantizedWeight", "as_spec", "check_fits", "GROUP_SIZES"]

# The int4 group sizes the sparse formats tile.
GROUP_SIZES = (32, 64, 128)
_DEFAULT_GROUP = 128
_NAME = re.compile(r"^int(?P<bits>\d+)(?:-g(?P<group>\d+))?(?P<zp>-zp)?$")


@dataclass(frozen=True)
class QuantSpec:
    """A weight-only quantization grid: int8 per output channel, or int4 per group of columns.

    Attributes:
        bits: 8 (symmetric, one scale per output channel) or 4 (one scale per group of columns).
        group_size: int4's group of consecutive columns (``in_features`` direction): 32, 64 or 128
            (default 128); ``None`` for int8.
        zero_point: int4 only: a zero point per group (values ``[0, 15]``) instead of a symmetric grid
            (values ``[-7, 7]``).

    Raises:
        TypeError / ValueError: a field of the wrong type or outside its allowed values, naming it.

    Example::

        >>> from fx_sparsity.quantization import QuantSpec
        >>> QuantSpec.parse("int4-g64-zp")
        QuantSpec(bits=4, group_size=64, zero_point=True)
        >>> str(QuantSpec(4)), QuantSpec(8).qmin, QuantSpec(8).qmax
        ('int4-g128', -127, 127)
    """

    bits: int
    group_size: int | None = None
    zero_point: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise TypeError(f"QuantSpec.bits must be the int 8 or 4, got {self.bits!r}")
        if self.bits not in (8, 4):
            raise ValueError(f"QuantSpec.bits must be 8 or 4, got {self.bits}")
        if not isinstance(self.zero_point, bool):
            raise TypeError(f"QuantSpec.zero_point must be True or False, got {self.zero_point!r}")
        if self.bits == 8:
            if self.group_size is not None:
                raise ValueError(
                    "QuantSpec.group_size must be None for int8 (one scale per output channel), "
                    f"got {self.group_size!r}"
                )
            if self.zero_point:
                raise ValueError("QuantSpec.zero_point must be False for int8 (int8 is symmetric per output channel)")
            return
        if self.group_size is None:
            object.__setattr__(self, "group_size", _DEFAULT_GROUP)
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int):
            raise TypeError(f"QuantSpec.group_size must be one of {GROUP_SIZES} for int4, got {self.group_size!r}")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"QuantSpec.group_size must be one of {GROUP_SIZES} for int4, got {self.group_size}")

    @classmethod
    def parse(cls, name: str) -> QuantSpec:
        """The spec a short name gives: ``"int8"``, ``"int4"`` (groups of 128), ``"int4-g64"``, ``"int4-g128-zp"``.

        Raises:
            TypeError: ``name`` is not a string.
            ValueError: ``name`` is not of the form ``int<bits>[-g<group>][-zp]``, or a field is not allowed.
        """
        if not isinstance(name, str):
            raise TypeError(f"a quantization spec name must be a string like 'int8' or 'int4-g128', got {name!r:.80}")
        found = _NAME.match(name.strip().lower())
        if found is None:
            raise ValueError(
                f"quantization spec {name!r} is not of the form int<bits>[-g<group>][-zp]: use 'int8', 'int4', "
                "'int4-g64', 'int4-g128-zp', ..."
            )
        group = found["group"]
        try:
            return cls(int(found["bits"]), int(group) if group is not None else None, found["zp"] is not None)
        except (TypeError, ValueError) as e:
            raise type(e)(f"quantization spec {name!r}: {e}") from None

    def __str__(self) -> str:
        if self.bits == 8:
            return "int8"
        return f"int4-g{self.group_size}" + ("-zp" if self.zero_point else "")

    @property
    def qmin(self) -> int:
        """The smallest value: -127 (int8), -7 (symmetric int4) or 0 (int4 with zero points)."""
        return 0 if self.zero_point else -self.qmax

    @property
    def qmax(self) -> int:
        """The largest value: 127 (int8), 7 (symmetric int4) or 15 (int4 with zero points)."""
        if self.zero_point:
            return 2**self.bits - 1
        return 2 ** (self.bits - 1) - 1

    def group_columns(self, columns: int) -> int:
        """The columns one scale covers in a weight of ``columns`` columns: all of them (int8) or ``group_size``."""
        return columns if self.group_size is None else self.group_size


SpecLike = Union[QuantSpec, str]


def as_spec(spec: SpecLike, name: str = "spec") -> QuantSpec:
    """``spec`` as a :class:`QuantSpec` (a spec, or a name :meth:`QuantSpec.parse` reads).

    Raises:
        TypeError / ValueError: ``spec`` is neither, or a bad name; the message starts with ``name``.

    Example::

        >>> from fx_sparsity.quantization import as_spec
        >>> as_spec("int4").group_size
        128
    """
    if isinstance(spec, QuantSpec):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"{name} must be a QuantSpec or a name like 'int8' or 'int4-g128', got {spec!r:.80}")
    try:
        return QuantSpec.parse(spec)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{name}: {e}") from None


def check_fits(spec: QuantSpec, shape: tuple[int, ...], weight: str) -> None:
    """Refuse a weight (named ``weight``) of ``shape`` whose columns the spec's int4 groups do not tile.

    ``shape`` is the weight's ``[out, in, *kernel]`` view; its columns are ``in * kernel``.

    Raises:
        ValueError: fewer than 2 dims, or columns not a multiple of ``spec.group_size``; the message
            names the weight, its columns, and the group sizes that would fit.

    Example::

        >>> from fx_sparsity.quantization import QuantSpec, check_fits
        >>> check_fits(QuantSpec(4, 32), (8, 96), "fc.weight")   # 96 columns: 3 groups of 32
    """
    if len(shape) < 2:
        raise ValueError(f"{weight} of shape {tuple(shape)} has no columns to quantize: expected [out, in, ...]")
    columns = math.prod(shape[1:])
    group = spec.group_size
    if group is not None and columns % group:
        fitting = [g for g in GROUP_SIZES if columns % g == 0]
        hint = f"use a group size that divides it ({', '.join(f'int4-g{g}' for g in fitting)}), " if fitting else ""
        raise ValueError(
            f"{spec} cannot quantize {weight}: its {columns} columns (in_features * kernel) are not a multiple of "
            f"the group size {group}; {hint}give it int8, or leave it out"
        )


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight on a :class:`QuantSpec`'s grid: ``dequantize(q)`` is the weight it stands for.

    The layout (what lowering packs), for a weight whose ``[out, in, *kernel]`` view has ``rows = out``
    and ``columns = in * kernel`` (flattened in the weight's own order, as ``weight.reshape(out, -1)``):

    * ``values``: ``torch.int8``, the weight's ``[out, in, *kernel]`` shape, one value per element
      (int4 values too: packing two per byte is the formats' business): in ``[-127, 127]`` (int8),
      ``[-7, 7]`` (symmetric int4) or ``[0, 15]`` (int4 with zero points).
    * ``scales``: ``torch.float32``, ``[rows]`` (int8) or ``[rows, columns // group_size]`` (int4):
      group ``g`` of row ``r`` covers ``values.reshape(rows, -1)[r, g * group_size : (g + 1) * group_size]``.
    * ``zeros``: ``torch.int8`` of ``scales``' shape, integers in ``[0, 15]`` (int4 with zero points),
      else ``None``.
    * the weight: ``scale * value`` (symmetric) or ``scale * (value - zero)`` (zero points), in float32.

    Attributes:
        values, scales, zeros: as above, on one device.
        spec: the grid.

    Raises:
        TypeError: a part is not a tensor (``zeros`` may be ``None``), or ``spec`` is not a :class:`QuantSpec`.
        ValueError: tensors of the wrong dtype, of shapes that do not fit together and with ``spec``, or
            values, zero points or scales outside their range (scales must be finite and > 0).

    Example::

        >>> from fx_sparsity.quantization import QuantizedWeight, QuantSpec, dequantize
        >>> q = QuantizedWeight(torch.tensor([[2, -1]], dtype=torch.int8), torch.tensor([0.5]), None, QuantSpec(8))
        >>> dequantize(q).tolist()
        [[1.0, -0.5]]
    """

    values: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    spec: QuantSpec

    def __post_init__(self) -> None:
        spec = self.spec
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"QuantizedWeight.spec must be a QuantSpec, got {spec!r:.80}")
        for name in ("values", "scales") + (("zeros",) if self.zeros is not None else ()):
            if not isinstance(getattr(self, name), torch.Tensor):
                raise TypeError(f"QuantizedWeight.{name} must be a tensor, got {type(getattr(self, name)).__name__}")
        values = self.values
        if values.dtype != torch.int8 or values.dim() < 2:
            raise ValueError(
                f"QuantizedWeight.values must be int8 of >= 2 dims, got {values.dtype} {tuple(values.shape)}"
            )
        check_fits(spec, tuple(values.shape), "QuantizedWeight.values")
        rows, columns = values.shape[0], math.prod(values.shape[1:])
        expected = (rows,) if spec.group_size is None else (rows, columns // spec.group_size)
        if self.scales.dtype != torch.float32 or tuple(self.scales.shape) != expected:
            raise ValueError(
                f"QuantizedWeight.scales must be float32 of shape {expected}, got {self.scales.dtype} "
                f"{tuple(self.scales.shape)}"
            )
        if spec.zero_point != (self.zeros is not None):
            raise ValueError(f"QuantizedWeight.zeros must be {'given' if spec.zero_point else 'None'} for {spec}")
        if self.zeros is not None and (self.zeros.dtype != torch.int8 or tuple(self.zeros.shape) != expected):
            raise ValueError(
                f"QuantizedWeight.zeros must be int8 of shape {expected}, got {self.zeros.dtype} "
                f"{tuple(self.zeros.shape)}"
            )
        parts = [values, self.scales] + ([self.zeros] if self.zeros is not None else [])
        if len({t.device for t in parts}) > 1:
            raise ValueError(f"QuantizedWeight's tensors must be on one device, got {[str(t.device) for t in parts]}")
        if values.numel() and not (spec.qmin <= values.min().item() and values.max().item() <= spec.qmax):
            raise ValueError(f"QuantizedWeight.values must lie in [{spec.qmin}, {spec.qmax}] for {spec}")
        zeros = self.zeros
        if zeros is not None and zeros.numel() and not (0 <= zeros.min().item() and zeros.max().item() <= spec.qmax):
            raise ValueError(f"QuantizedWeight.zeros must lie in [0, {spec.qmax}] for {spec}")
        if not (torch.isfinite(self.scales).all() and (self.scales > 0).all()):
            raise ValueError("QuantizedWeight.scales must be finite and > 0")

    @property
    def shape(self) -> torch.Size:
        """The weight's shape (the ``[out, in, *kernel]`` view)."""
        return self.values.shape
