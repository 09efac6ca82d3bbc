"""Sparse layers for the user's own model class: a Linear or 1x1 Conv whose weight is stored packed.

:class:`SparseLinear` and :class:`SparseConv1d` / :class:`SparseConv2d` / :class:`SparseConv3d` hold one
layer's weight in one of the formats :func:`fx_sparsity.lower` knows (``passes.lowering.LAYOUTS``: bitmask, nm,
csr, bsr, semi_structured; and the quantized ``passes.lowering.QUANT_LAYOUTS``: bitmask, nm, csr and dense with
int8 or int4 values, see :mod:`passes.lowering.quantized`), as the buffers a lowered graph registers
(``weight_<component>``, names from ``passes.lowering.COMPONENT_NAMES``), and the layer's bias. ``forward`` calls the same
``torch.ops.fx_sparsity.*_linear`` operator, with the same strided slice and channel moves for a conv
(:func:`passes.lowering.sparse_layer_forward`), so a model holding these modules computes what the lowered
graph computes, eagerly, under ``torch.compile`` and through ``torch.export``. ``"fuse"`` needs no module of
its own: it is the plain ``nn.Linear``/``nn.Conv`` with the masked weight.

They are for inference. The packed weight is a set of buffers and gets no gradient (the operators give none);
the input and the bias do, in either mode, so a module in training mode runs, but only its bias trains:
fine-tune before packing. ``state_dict()`` holds the components and the bias; ``load_state_dict`` takes the
components of another weight of the same shape (their sizes depend on the weight's zeros, so the module's
buffers take the incoming sizes and index dtypes; values keep the module's dtype, as a Linear's weight does).

The layers have no ``weight`` attribute (reading it raises ``AttributeError`` saying why):
:meth:`dense_weight` rebuilds it, and :func:`fx_sparsity.deploy.densify_model` gives a model of plain layers.

Example::

    >>> layer = SparseLinear.from_dense(nn.Linear(64, 32), "csr")
    >>> layer.layout, [name for name, _ in layer.named_buffers()]
    ('csr', ['weight_crow_indices', 'weight_col_indices', 'weight_values'])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.sparse._semi_structured_conversions import sparse_semi_structured_to_dense_cutlass

from passes.lowering import (
    COMPONENT_NAMES,
    LAYOUTS,
    QUANT_GROUP_SIZES,
    QUANT_LAYOUTS,
    SparseFormat,
    bitmask_to_dense,
    csr_to_dense,
    mask_bytes_per_row,
    nm_to_dense,
    quantized_to_dense,
    sparse_layer_forward,
)

__all__ = [
    "SparseLinear",
    "SparseConv1d",
    "SparseConv2d",
    "SparseConv3d",
    "SPARSE_MODULES",
    "sparse_module_for",
    "check_components",
]

_INDEX_DTYPES = {
    "crow_indices": (torch.int32, torch.int64),
    "col_indices": (torch.int16, torch.int32, torch.int64),
    "row_offsets": (torch.int64,),
    "bitmask": (torch.uint8,),
}


def _shape(tensor: Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def check_components(layout: str, out_features: int, in_features: int, components: Sequence[Tensor]) -> None:
    """Raise ``ValueError`` unless ``components`` are the buffers of a ``[out_features, in_features]`` weight in
    ``layout`` (their count, ranks, dtypes and the shapes that follow from the weight's shape; sizes that depend
    on the number of nonzeros are checked against each other). Reads no data: works on the meta device."""
    if layout not in LAYOUTS and layout not in QUANT_LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, (*LAYOUTS, *QUANT_LAYOUTS)))}, got {layout!r}")
    names = COMPONENT_NAMES[layout]
    if not isinstance(components, Sequence) or len(components) != len(names):
        got = len(components) if isinstance(components, Sequence) else type(components).__name__
        raise ValueError(f"a {layout} weight has {len(names)} components ({', '.join(names)}), got {got}")
    parts = dict(zip(names, components))
    quantized = layout in QUANT_LAYOUTS
    for name, tensor in parts.items():
        if not isinstance(tensor, Tensor) or tensor.layout != torch.strided:
            raise ValueError(f"component {name} must be a strided tensor, got {type(tensor).__name__}")
        allowed = _INDEX_DTYPES.get(name)
        if quantized and allowed is None:
            allowed = {"values": (torch.int8 if layout.endswith("int8") else torch.uint8,), "scales": (torch.float32,),
                       "zeros": (torch.int8,)}[name]
        if allowed is not None and tensor.dtype not in allowed:
            raise ValueError(f"component {name} of a {layout} weight must be {' or '.join(map(str, allowed))}, "
                             f"got {tensor.dtype}")
        if allowed is None and layout != "semi_structured" and not tensor.is_floating_point():
            raise ValueError(f"component {name} of a {layout} weight must be floating point, got {tensor.dtype}")

    def expect(name: str, shape: tuple[int, ...]) -> None:
        if _shape(parts[name]) != shape:
            raise ValueError(f"component {name} of a {layout} weight of shape ({out_features}, {in_features}) must "
                             f"have shape {shape}, got {_shape(parts[name])}")

    if quantized:
        _check_quantized_shapes(layout, out_features, in_features, parts, expect)
    elif layout == "csr":
        expect("crow_indices", (out_features + 1,))
        nnz = parts["values"].shape[0] if parts["values"].dim() == 1 else -1
        expect("values", (nnz,))
        expect("col_indices", (nnz,))
    elif layout == "bsr":
        values = parts["values"]
        if values.dim() != 3 or values.shape[1] < 1 or values.shape[2] < 1:
            raise ValueError(f"component values of a bsr weight must be [blocks, block_rows, block_cols], "
                             f"got {_shape(values)}")
        rows, cols = values.shape[1:]
        if out_features % rows or in_features % cols:
            raise ValueError(f"bsr blocks of {rows}x{cols} do not divide the weight shape ({out_features}, "
                             f"{in_features})")
        expect("crow_indices", (out_features // rows + 1,))
        expect("col_indices", (values.shape[0],))
    elif layout == "bitmask":
        expect("bitmask", (out_features, mask_bytes_per_row(in_features)))
        expect("row_offsets", (out_features + 1,))
        if parts["values"].dim() != 1:
            raise ValueError(f"component values of a bitmask weight must be 1-D, got {_shape(parts['values'])}")
    elif layout == "nm":
        expect("bitmask", (out_features, mask_bytes_per_row(in_features)))
        values = parts["values"]
        if values.dim() != 2 or values.shape[0] != out_features or not 0 < values.shape[1] <= in_features:
            raise ValueError(f"component values of an nm weight of shape ({out_features}, {in_features}) must be "
                             f"[{out_features}, kept per row], got {_shape(values)}")
    else:
        packed = parts["packed"]
        if packed.dim() != 2 or packed.shape[0] != out_features:
            raise ValueError(f"component packed of a semi_structured weight must be [{out_features}, ...], "
                             f"got {_shape(packed)}")


def _check_quantized_shapes(layout: str, out_features: int, in_features: int, parts: dict, expect) -> None:
    """The shapes of a quantized layout's components (int4: two codes per byte of ``values``)."""
    family, int4 = layout.split("-")[0], layout.endswith("int4")
    scales, values = parts["scales"], parts["values"]
    if int4:
        groups = scales.shape[1] if scales.dim() == 2 else 0
        if scales.dim() != 2 or scales.shape[0] != out_features or not groups or in_features % groups or \
                in_features // groups not in QUANT_GROUP_SIZES:
            raise ValueError(f"component scales of a {layout} weight of shape ({out_features}, {in_features}) must be "
                             f"[{out_features}, {in_features} // group_size] with group_size in {QUANT_GROUP_SIZES}, "
                             f"got {_shape(scales)}")
    else:
        expect("scales", (out_features,))
    if "zeros" in parts:
        expect("zeros", _shape(scales))
    if family in ("bitmask", "nm"):
        expect("bitmask", (out_features, mask_bytes_per_row(in_features)))
    if family == "bitmask":
        expect("row_offsets", (out_features + 1,))
        if values.dim() != 1:
            raise ValueError(f"component values of a {layout} weight must be 1-D, got {_shape(values)}")
    elif family == "nm":
        width = (in_features + 1) // 2 if int4 else in_features
        if values.dim() != 2 or values.shape[0] != out_features or not 0 < values.shape[1] <= width:
            raise ValueError(f"component values of an {layout} weight of shape ({out_features}, {in_features}) must "
                             f"be [{out_features}, kept per row{' / 2' if int4 else ''}], got {_shape(values)}")
    elif family == "csr":
        expect("crow_indices", (out_features + 1,))
        nnz = parts["col_indices"].shape[0] if parts["col_indices"].dim() == 1 else -1
        expect("values", ((nnz + 1) // 2 if int4 else nnz,))
    else:
        expect("values", (out_features, (in_features + 1) // 2 if int4 else in_features))


class _SparseLayer(nn.Module):
    """What every sparse layer shares: the components, the bias, their checks, state-dict loading, repr."""

    kind = "linear"

    def __init__(self, out_features: int, in_features: int, layout: str, components: Sequence[Tensor],
                 bias: Tensor | None) -> None:
        super().__init__()
        for name, value in (("out_features", out_features), ("in_features", in_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        check_components(layout, out_features, in_features, components)
        if bias is not None and (not isinstance(bias, Tensor) or _shape(bias) != (out_features,)):
            got = _shape(bias) if isinstance(bias, Tensor) else type(bias).__name__
            raise ValueError(f"bias must be a tensor of shape ({out_features},) or None, got {got}")
        self.layout = layout
        self._out, self._in = out_features, in_features
        self.component_names = tuple(f"weight_{part}" for part in COMPONENT_NAMES[layout])
        for name, tensor in zip(self.component_names, components):
            self.register_buffer(name, tensor.detach() if tensor.requires_grad else tensor)  # shared ones stay shared
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias.detach(), requires_grad=False)

    def _apply(self, fn, recurse=True):
        # A quantized weight's scales are float32 by its format (what the kernels read): a model-wide cast
        # (model.to(torch.bfloat16), .half()) moves them to the new device but keeps their dtype, as it keeps
        # the integer codes'.
        if not self.quantized:
            return super()._apply(fn, recurse)
        scales = self._buffers["weight_scales"]
        result = super()._apply(fn, recurse)
        if self._buffers["weight_scales"].dtype != scales.dtype:
            self._buffers["weight_scales"] = scales.to(device=self._buffers["weight_scales"].device)
        return result

    # -- the packed weight
    @property
    def components(self) -> tuple[Tensor, ...]:
        """The packed buffers, in the operator's order."""
        return tuple(self._buffers[name] for name in self.component_names)

    @property
    def blocksize(self) -> tuple[int, int] | None:
        """The bsr block shape, else ``None``."""
        return tuple(self.weight_values.shape[1:]) if self.layout == "bsr" else None

    @property
    def format(self) -> SparseFormat:
        """The :class:`passes.lowering.SparseFormat` of the packed weight."""
        return SparseFormat(self.layout, self.blocksize)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The dense weight's shape (a conv's includes its 1x1 kernel)."""
        return (self._out, self._in)

    @property
    def quantized(self) -> bool:
        """Whether the weight is held quantized (int8 or int4 values, ``passes.lowering.QUANT_LAYOUTS``)."""
        return self.layout in QUANT_LAYOUTS

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype of the packed values (the weight's dtype); float32 for a quantized weight (the dtype it is
        dequantized to; its values are int8 codes, or int4 codes two per uint8)."""
        return torch.float32 if self.quantized else self._values().dtype

    def _values(self) -> Tensor:
        return self._buffers["weight_packed" if self.layout == "semi_structured" else "weight_values"]

    def __getattr__(self, name: str) -> object:
        if name == "weight":
            raise AttributeError(
                f"{type(self).__name__} stores its weight packed ({self.layout}) and has no dense weight attribute: "
                "dense_weight() rebuilds it, fx_sparsity.deploy.densify_model(model) gives a model of plain layers"
            )
        return super().__getattr__(name)

    def stored_bytes(self) -> int:
        """Bytes of the packed weight's buffers (the bias not included)."""
        return sum(t.numel() * t.element_size() for t in self.components)

    def dense_bytes(self) -> int:
        """Bytes the dense weight would take in the values' dtype."""
        return math.prod(self.weight_shape) * self.weight_dtype.itemsize

    def nonzeros(self) -> int:
        """Nonzero weights stored (padding zeros of nm and bsr not counted); reads the values."""
        if self.quantized:
            return int(torch.count_nonzero(self.dense_weight()))
        return int(torch.count_nonzero(self._values()))

    @property
    def sparsity(self) -> float:
        """Fraction of the weight's entries that are zero."""
        return 1.0 - self.nonzeros() / (self._out * self._in)

    def dense_weight(self) -> Tensor:
        """The dense weight, rebuilt from the components (exactly the weight that was packed; a quantized one
        dequantized to float32: ``scale * (value - zero)``)."""
        parts = dict(zip(COMPONENT_NAMES[self.layout], self.components))
        if self.quantized:
            dense = quantized_to_dense(self.layout, self.components, self._in)
        elif self.layout == "csr":
            dense = csr_to_dense(parts["crow_indices"], parts["col_indices"], parts["values"], self._in)
        elif self.layout == "bitmask":
            dense = bitmask_to_dense(parts["bitmask"], parts["values"], parts["row_offsets"], self._in)
        elif self.layout == "nm":
            dense = nm_to_dense(parts["bitmask"], parts["values"], self._in)
        elif self.layout == "bsr":
            crow, col, values = parts["crow_indices"], parts["col_indices"], parts["values"]
            dense = torch.sparse_bsr_tensor(crow.to(torch.int64), col.to(torch.int64), values,
                                            (self._out, self._in), check_invariants=False).to_dense()
        else:
            dense = sparse_semi_structured_to_dense_cutlass(parts["packed"], parts["meta"])
        return dense.reshape(self.weight_shape)

    # -- state dicts: the packed sizes depend on the weight's zeros
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        incoming = [state_dict.get(prefix + name) for name in self.component_names]
        if all(isinstance(t, Tensor) for t in incoming):
            try:
                check_components(self.layout, self._out, self._in, incoming)
            except ValueError as e:
                error_msgs.append(f"{type(self).__name__} {prefix.rstrip('.') or '<root>'}: {e}")
                return
            for name, value in zip(self.component_names, incoming):
                own = self._buffers[name]
                dtype = own.dtype if own.is_floating_point() else value.dtype
                if own.shape != value.shape or own.dtype != dtype:
                    self._buffers[name] = torch.empty(value.shape, dtype=dtype, device=own.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _shape_repr(self) -> str:
        return f"in_features={self._in}, out_features={self._out}"

    def extra_repr(self) -> str:
        try:
            sparsity = f"{self.sparsity:.1%}"
        except (NotImplementedError, RuntimeError):  # meta tensors hold no values
            sparsity = "?"
        return (f"{self._shape_repr()}, bias={self.bias is not None}, format={self.layout}"
                f"{'' if self.blocksize is None else f' {self.blocksize[0]}x{self.blocksize[1]}'}, "
                f"dtype={str(self.weight_dtype).removeprefix('torch.')}, sparsity={sparsity}, "
                f"bytes={self.stored_bytes():,} (dense {self.dense_bytes():,})")


class SparseLinear(_SparseLayer):
    """``F.linear(x, W, bias)`` with ``W`` stored packed: the operator a lowered graph calls, in an ``nn.Module``.

    Args:
        in_features, out_features: the weight's shape is ``(out_features, in_features)``.
        layout: one of ``passes.lowering.LAYOUTS``.
        components: the packed weight, as :meth:`passes.lowering.SparseFormat.components` returns it
            (registered as buffers ``weight_<component>``).
        bias: ``(out_features,)`` or ``None``; a parameter (kept as given when it is one).

    Raises:
        ValueError: an unknown layout, components of the wrong count, dtype or shape, a bias of the wrong shape.

    Example::

        >>> linear = nn.Linear(64, 32)
        >>> with torch.no_grad():
        ...     linear.weight[:, ::2] = 0
        >>> sparse = SparseLinear.from_dense(linear, "bitmask")
        >>> x = torch.randn(4, 64)
        >>> torch.testing.assert_close(sparse(x), linear(x))
        >>> sparse.sparsity
        0.5
    """

    def __init__(self, in_features: int, out_features: int, layout: str, components: Sequence[Tensor],
                 bias: Tensor | None = None) -> None:
        super().__init__(out_features, in_features, layout, components, bias)

    @property
    def in_features(self) -> int:
        return self._in

    @property
    def out_features(self) -> int:
        return self._out

    @classmethod
    def from_dense(cls, linear: nn.Linear, layout: str, *, blocksize: tuple[int, int] | None = None,
                   nm: tuple[int, int] | None = None) -> SparseLinear:
        """Pack ``linear``'s weight (its zeros dropped) as ``layout``; the bias is shared with ``linear``.

        Raises:
            TypeError: ``linear`` is not an ``nn.Linear``.
            ValueError: the weight does not fit the layout (a weight that is not N:M for ``"nm"``, say).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        components = SparseFormat(layout, blocksize, nm).components(linear.weight.detach())
        return cls(linear.in_features, linear.out_features, layout, components, linear.bias)

    @classmethod
    def from_quantized(cls, linear: nn.Linear, layout: str, quantized: object, *,
                       nm: tuple[int, int] | None = None) -> SparseLinear:
        """Pack the quantized weight of ``linear`` (its ``values``/``scales``/``zeros``: a ``QuantizedWeight``,
        :class:`passes.lowering.QuantizedComponents` or a mapping) as quantized ``layout``; the bias is shared
        with ``linear``. ``linear.weight`` gives only the shape the values must have.

        Raises:
            TypeError: ``linear`` is not an ``nn.Linear``.
            ValueError: ``layout`` is not quantized, or the quantized weight cannot be held
                (:func:`passes.lowering.check_quantized`) or is of another shape.

        Example::

            >>> linear = nn.Linear(64, 16)
            >>> scales = linear.weight.detach().abs().amax(1) / 127
            >>> values = torch.round(linear.weight.detach() / scales[:, None]).to(torch.int8)
            >>> layer = SparseLinear.from_quantized(linear, "dense-int8", {"values": values, "scales": scales})
            >>> x = torch.randn(2, 64)
            >>> torch.testing.assert_close(layer(x), F.linear(x, dequantize(values, scales), linear.bias))
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        components = _quantized_components(layout, linear.weight.detach(), quantized, nm)
        return cls(linear.in_features, linear.out_features, layout, components, linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return sparse_layer_forward(self.layout, x, self.components, self.bias, None)


def _quantized_components(layout: str, weight: Tensor, quantized: object, nm: tuple[int, int] | None):
    if layout not in QUANT_LAYOUTS:
        raise ValueError(f"layout must be a quantized one ({', '.join(QUANT_LAYOUTS)}), got {layout!r}; "
                         "from_dense packs the float layouts")
    return SparseFormat(layout, nm=nm).components(weight, quantized)


class _SparseConvNd(_SparseLayer):
    """A 1x1 conv (no padding, one group) with its weight packed: a linear over channels, strided-sliced."""

    _dims = 2
    _dense_class: type[nn.Module] = nn.Conv2d

    def __init__(self, in_channels: int, out_channels: int, layout: str, components: Sequence[Tensor],
                 bias: Tensor | None = None, stride: int | tuple[int, ...] = 1) -> None:
        super().__init__(out_channels, in_channels, layout, components, bias)
        strides = (stride,) * self._dims if isinstance(stride, int) and not isinstance(stride, bool) else stride
        if not (isinstance(strides, Sequence) and len(strides) == self._dims and all(
                isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in strides)):
            raise ValueError(f"stride must be a positive int or {self._dims} of them, got {stride!r}")
        self.stride = tuple(strides)

    @property
    def in_channels(self) -> int:
        return self._in

    @property
    def out_channels(self) -> int:
        return self._out

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self._out, self._in, *(1,) * self._dims)

    @classmethod
    def from_dense(cls, conv: nn.Module, layout: str, *, blocksize: tuple[int, int] | None = None,
                   nm: tuple[int, int] | None = None) -> _SparseConvNd:
        """Pack a 1x1 ``conv``'s weight (no padding, one group) as ``layout``; the bias is shared with ``conv``.

        Raises:
            TypeError: ``conv`` is not an ``nn.Conv{1,2,3}d`` of this module's dimensions.
            ValueError: ``conv`` is not 1x1, is padded or grouped, or its weight does not fit the layout.
        """
        if not isinstance(conv, cls._dense_class):
            raise TypeError(f"conv must be an {cls._dense_class.__name__}, got {type(conv).__name__}")
        reason = _conv_blocker(conv)
        if reason is not None:
            raise ValueError(f"{cls.__name__} holds 1x1 convs only: {reason}")
        weight = conv.weight.detach().reshape(conv.out_channels, conv.in_channels)
        components = SparseFormat(layout, blocksize, nm).components(weight)
        return cls(conv.in_channels, conv.out_channels, layout, components, conv.bias, conv.stride)

    @classmethod
    def from_quantized(cls, conv: nn.Module, layout: str, quantized: object, *,
                       nm: tuple[int, int] | None = None) -> _SparseConvNd:
        """Pack the quantized ``[out_channels, in_channels]`` weight of a 1x1 ``conv`` as quantized ``layout``
        (see :meth:`SparseLinear.from_quantized`); the bias is shared with ``conv``.

        Raises:
            TypeError: ``conv`` is not an ``nn.Conv{1,2,3}d`` of this module's dimensions.
            ValueError: ``conv`` is not 1x1, is padded or grouped, or the quantized weight cannot be held.
        """
        if not isinstance(conv, cls._dense_class):
            raise TypeError(f"conv must be an {cls._dense_class.__name__}, got {type(conv).__name__}")
        reason = _conv_blocker(conv)
        if reason is not None:
            raise ValueError(f"{cls.__name__} holds 1x1 convs only: {reason}")
        weight = conv.weight.detach().reshape(conv.out_channels, conv.in_channels)
        components = _quantized_components(layout, weight, quantized, nm)
        return cls(conv.in_channels, conv.out_channels, layout, components, conv.bias, conv.stride)

    def forward(self, x: Tensor) -> Tensor:
        return sparse_layer_forward(self.layout, x, self.components, self.bias, self.stride)

    def _shape_repr(self) -> str:
        return f"in_channels={self._in}, out_channels={self._out}, stride={self.stride}"


class SparseConv1d(_SparseConvNd):
    """A 1x1 ``nn.Conv1d`` (no padding, one group, any stride) with its weight packed; see :class:`SparseConv2d`."""

    _dims = 1
    _dense_class = nn.Conv1d


class SparseConv2d(_SparseConvNd):
    """A 1x1 ``nn.Conv2d`` (no padding, one group, any stride) with its weight packed.

    It computes as a lowered graph does: the input strided-sliced, channels moved last, the sparse linear
    operator, channels moved back (contiguous). Args as :class:`SparseLinear`, with ``in_channels``,
    ``out_channels`` and ``stride``; the components pack the ``[out_channels, in_channels]`` weight.

    Example::

        >>> conv = nn.Conv2d(16, 8, 1, stride=2)
        >>> sparse = SparseConv2d.from_dense(conv, "csr")
        >>> x = torch.randn(2, 16, 6, 6)
        >>> torch.testing.assert_close(sparse(x), conv(x))
    """

    _dims = 2
    _dense_class = nn.Conv2d


class SparseConv3d(_SparseConvNd):
    """A 1x1 ``nn.Conv3d`` (no padding, one group, any stride) with its weight packed; see :class:`SparseConv2d`."""

    _dims = 3
    _dense_class = nn.Conv3d


# The sparse module of each dense module class it replaces.
SPARSE_MODULES: dict[type[nn.Module], type[_SparseLayer]] = {
    nn.Linear: SparseLinear,
    nn.Conv1d: SparseConv1d,
    nn.Conv2d: SparseConv2d,
    nn.Conv3d: SparseConv3d,
}


def _conv_blocker(conv: nn.Module) -> str | None:
    """Why a conv module cannot run as a sparse linear over channels; ``None`` when it can."""
    if any(k != 1 for k in conv.kernel_size):
        return f"kernel {'x'.join(map(str, conv.kernel_size))}"
    padding = conv.padding
    if padding not in ("valid", "same") and any(p != 0 for p in padding):
        return f"padding {padding}"
    if conv.groups != 1:
        return f"groups={conv.groups}"
    return None


def sparse_module_for(module: nn.Module) -> type[_SparseLayer] | str:
    """The sparse class that can replace ``module`` (a plain ``nn.Linear``, or a 1x1 unpadded ungrouped
    ``nn.Conv{1,2,3}d``, whose class keeps torch's ``forward``), or a string saying why none can.

    Example::

        >>> sparse_module_for(nn.Linear(4, 4)).__name__, sparse_module_for(nn.Conv2d(4, 4, 3))
        ('SparseLinear', 'a 3x3 Conv2d: only 1x1 convs run as sparse linears')
    """
    for dense, sparse in SPARSE_MODULES.items():
        if not isinstance(module, dense):
            continue
        if type(module).forward is not dense.forward:
            return (f"a {type(module).__name__} (a subclass of {dense.__name__} with its own forward, which a "
                    "sparse layer cannot run)")
        if dense is nn.Linear:
            return sparse
        reason = _conv_blocker(module)
        if reason is None:
            return sparse
        if reason.startswith("kernel"):
            return f"a {reason.removeprefix('kernel ')} {type(module).__name__}: only 1x1 convs run as sparse linears"
        return f"a {type(module).__name__} with {reason}: only unpadded, ungrouped convs run as sparse linears"
    return f"a {type(module).__name__}, not an nn.Linear or nn.Conv1d/2d/3d"
