"""Sparse linear kernels as custom operators (namespace ``fx_sparsity``).

Each operator takes the weight as plain strided tensors (index tensors and a
values tensor, a bit mask and values, or a packed 2:4 tensor and its metadata)
and builds what it needs inside the kernel. Modules hold only strided buffers, so
``torch.export`` (with ``run_decompositions``, ``save``/``load``), AOTInductor and
``torch.compile(fullgraph=True)`` see an ordinary operator with a fake (meta)
implementation and never a sparse-layout tensor.

* ``fx_sparsity::bitmask_linear(x, mask, values, row_offsets, bias)``
* ``fx_sparsity::nm_linear(x, mask, values, bias)`` (N:M, fixed row stride)
* ``fx_sparsity::csr_linear(x, crow_indices, col_indices, values, bias)``
  (int16 column indices read as unsigned, or int32)
* ``fx_sparsity::bsr_linear(x, crow_indices, col_indices, values, bias)``
  (``values`` is ``[nnz_blocks, block_rows, block_cols]``)
* ``fx_sparsity::semi_structured_linear(x, packed, meta, bias)`` (2:4, CUTLASS layout)
* quantized weights (:mod:`passes.lowering.quantized`), one operator per layout of
  :data:`~passes.lowering.quantized.QUANT_LAYOUTS`:
  ``fx_sparsity::bitmask_int8_linear(x, mask, values, row_offsets, scales, bias)`` (and ``bitmask_int4``),
  ``nm_int8_linear(x, mask, values, scales, bias)`` (``nm_int4``),
  ``csr_int8_linear(x, crow_indices, col_indices, values, scales, bias)`` (``csr_int4``),
  ``dense_int8_linear(x, values, scales, bias)`` and ``dense_int4_linear(x, values, scales, zeros, bias)``.
  Their C++ kernels take float32, bfloat16 or float16 activations, decode the int8/int4 codes with
  the sparse decode (no dense weight), accumulate in float32 (a group's partial sum times its
  scale) and return the activation dtype; the reference dequantizes to float32 and calls
  ``F.linear`` in float32 (float64 for float64 inputs).

All compute ``F.linear(x, W, bias)`` for ``x`` of shape ``[..., in_features]``
and return a contiguous ``[..., out_features]`` tensor. The formats are packed
by :mod:`passes.lowering.formats`.

On CPU, bitmask, nm and csr run our C++ kernels (:mod:`passes.lowering.native`;
float32, bfloat16 and float16 with float32 accumulation, AVX-512 / AVX2 /
portable, multithreaded over output rows with torch's intra-op pool). Without
them (no compiler, ``FX_SPARSITY_NO_NATIVE=1``, another device, float64),
bitmask and nm unpack to dense and call ``F.linear`` (the reference the kernels
are tested against), and csr and bsr run ``torch.sparse.mm(W, x.T).T``
(``addmm`` with a bias) on MKL (cuSPARSE on CUDA). The 2:4 kernel is CUTLASS on
CUDA; on other devices it unpacks to dense (a reference, so that a program
lowered on a GPU still runs anywhere).
Autograd reaches the input and the bias (so a lowered module runs under
``torch.compile`` with trainable biases, and gradients flow to earlier layers);
the weight components get none: fine-tune before lowering.

A program exported with these operators needs them registered before
``torch.export.load``: ``import fx_sparsity`` (or ``import passes``) is enough.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.sparse._semi_structured_conversions import (
    sparse_semi_structured_from_dense_cutlass,
    sparse_semi_structured_to_dense_cutlass,
)

from passes.lowering.formats import (
    bitmask_to_dense,
    csr_to_dense,
    nm_to_dense,
    sparse_beta_silenced,
    to_narrow_csr_components,
)
from passes.lowering.native import native_ops
from passes.lowering.quantized import QUANT_COMPONENT_NAMES, QUANT_LAYOUTS, quantized_to_dense

__all__ = [
    "bitmask_linear",
    "nm_linear",
    "csr_linear",
    "bsr_linear",
    "semi_structured_linear",
    "QUANT_OPS",
    "sparse_linear_grad_input",
    "to_csr_components",
    "to_bsr_components",
    "to_semi_structured_components",
    "SEMI_STRUCTURED_MIN_SHAPE",
    "NATIVE_DTYPES",
    "eager_native_linear",
]

# Value dtypes our C++ kernels take (accumulating in float32).
NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Smallest weight (rows, cols), and the multiple both must be, that the CUTLASS
# 2:4 kernel takes for fp16/bf16 (torch.sparse.SparseSemiStructuredTensorCUTLASS).
SEMI_STRUCTURED_MIN_SHAPE = (32, 64)
# The dense operand's rows and columns must be multiples of this.
_SEMI_STRUCTURED_DENSE_MULTIPLE = 8


def _as_rows(x: Tensor) -> Tensor:
    """``x`` as ``[rows, features]`` (``reshape(-1, 0)`` is ambiguous when there are no features)."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def _sparse_mm_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, weight, bias)`` for a sparse-layout ``weight``, computed as ``(W @ x.T).T``.

    A single CSR row vector goes through ``mv`` instead: on MKL that is about 1.5x
    faster than ``mm`` for a 4096x4096 weight at 90% (for BSR it is slower).
    """
    x2 = _as_rows(x)
    if x2.shape[0] == 1 and weight.layout == torch.sparse_csr:
        out = torch.mv(weight, x2[0])
        out = out if bias is None else out + bias
        return out.view(*x.shape[:-1], weight.shape[0])
    if bias is None:
        out_t = torch.sparse.mm(weight, x2.t())
    else:
        out_t = torch.addmm(bias.unsqueeze(1), weight, x2.t())
    return out_t.t().contiguous().view(*x.shape[:-1], weight.shape[0])


def _linear_fake(x: Tensor, out_features: int) -> Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


def _out_features(crow_indices: Tensor, values: Tensor) -> int:
    """Rows of a CSR (1-D ``values``) or BSR (``[nnz_blocks, rows, cols]`` values) weight."""
    block_rows = values.shape[1] if values.dim() == 3 else 1
    return (crow_indices.shape[0] - 1) * block_rows


def _sparse_weight(crow_indices: Tensor, col_indices: Tensor, values: Tensor, in_features: int) -> Tensor:
    """The CSR or BSR view of the components (no copy for int32 indices); BSR when ``values`` holds blocks."""
    shape = (_out_features(crow_indices, values), in_features)
    if col_indices.dtype == torch.int16:  # unsigned 16-bit, widened for torch.sparse
        col_indices = (col_indices.to(torch.int32) & 0xFFFF).to(crow_indices.dtype)
    build = torch.sparse_bsr_tensor if values.dim() == 3 else torch.sparse_csr_tensor
    with sparse_beta_silenced():  # a few microseconds, on the MKL paths only
        return build(crow_indices, col_indices, values, shape, check_invariants=False)


def _native_for(x: Tensor, values: Tensor) -> object | None:
    """The C++ operators when they can run this call (CPU, a dtype they take), else ``None``."""
    if x.device.type != "cpu" or values.dtype not in NATIVE_DTYPES or x.dtype != values.dtype:
        return None
    return native_ops()


def _dense_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(x, weight.to(x.dtype), bias).contiguous()


@torch.library.custom_op("fx_sparsity::bitmask_linear", mutates_args=())
def bitmask_linear(x: Tensor, mask: Tensor, values: Tensor, row_offsets: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, W, bias)`` with ``W`` given by its bitmask components (see :func:`to_bitmask_components`)."""
    native = _native_for(x, values)
    if native is not None:
        return native.bitmask_linear(x, mask, values, row_offsets, bias)
    return _dense_linear(x, bitmask_to_dense(mask, values, row_offsets, x.shape[-1]), bias)


@bitmask_linear.register_fake
def _(x, mask, values, row_offsets, bias):
    return _linear_fake(x, row_offsets.shape[0] - 1)


@torch.library.custom_op("fx_sparsity::nm_linear", mutates_args=())
def nm_linear(x: Tensor, mask: Tensor, values: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, W, bias)`` with an N:M ``W`` given by its components (see :func:`to_nm_components`)."""
    native = _native_for(x, values)
    if native is not None:
        return native.nm_linear(x, mask, values, bias)
    return _dense_linear(x, nm_to_dense(mask, values, x.shape[-1]), bias)


@nm_linear.register_fake
def _(x, mask, values, bias):
    return _linear_fake(x, values.shape[0])


@torch.library.custom_op("fx_sparsity::csr_linear", mutates_args=())
def csr_linear(x: Tensor, crow_indices: Tensor, col_indices: Tensor, values: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, W, bias)`` with ``W`` given by its CSR components (see :func:`to_csr_components`).

    Our C++ kernel where it runs; else MKL (float32/float64), else a dense reference.
    """
    native = _native_for(x, values)
    if native is not None:
        return native.csr_linear(x, crow_indices, col_indices, values, bias)
    if x.device.type == "cpu" and values.dtype not in (torch.float32, torch.float64):
        return _dense_linear(x, csr_to_dense(crow_indices, col_indices, values, x.shape[-1]), bias)
    return _sparse_mm_linear(x, _sparse_weight(crow_indices, col_indices, values, x.shape[-1]), bias)


@csr_linear.register_fake
def _(x, crow_indices, col_indices, values, bias):
    return _linear_fake(x, _out_features(crow_indices, values))


@torch.library.custom_op("fx_sparsity::bsr_linear", mutates_args=())
def bsr_linear(x: Tensor, crow_indices: Tensor, col_indices: Tensor, values: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, W, bias)`` with ``W`` given by its BSR components (see :func:`to_bsr_components`)."""
    return _sparse_mm_linear(x, _sparse_weight(crow_indices, col_indices, values, x.shape[-1]), bias)


@bsr_linear.register_fake
def _(x, crow_indices, col_indices, values, bias):
    return _linear_fake(x, _out_features(crow_indices, values))


@torch.library.custom_op("fx_sparsity::semi_structured_linear", mutates_args=())
def semi_structured_linear(x: Tensor, packed: Tensor, meta: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, W, bias)`` with a 2:4 ``W`` given as CUTLASS ``packed`` values and ``meta``."""
    x2 = _as_rows(x)
    out_features = packed.shape[0]
    if not x.is_cuda:
        weight = sparse_semi_structured_to_dense_cutlass(packed, meta)
        return F.linear(x2, weight, bias).view(*x.shape[:-1], out_features)
    rows = x2.shape[0]
    pad = (-rows) % _SEMI_STRUCTURED_DENSE_MULTIPLE
    dense_t = F.pad(x2, (0, 0, 0, pad)).t()
    if bias is None:
        out_t = torch._sparse_semi_structured_mm(packed, meta, dense_t)
    else:
        out_t = torch._sparse_semi_structured_addmm(bias, packed, meta, dense_t)
    return out_t[:, :rows].t().contiguous().view(*x.shape[:-1], out_features)


@semi_structured_linear.register_fake
def _(x, packed, meta, bias):
    return _linear_fake(x, packed.shape[0])


@torch.library.custom_op("fx_sparsity::sparse_linear_grad_input", mutates_args=())
def sparse_linear_grad_input(grad: Tensor, layout: str, components: list[Tensor], in_features: int) -> Tensor:
    """``grad @ W``: the input gradient of the ``<layout>_linear`` operator whose weight is ``components``."""
    grad2 = _as_rows(grad)
    if layout == "bitmask":
        out = grad2 @ bitmask_to_dense(*components, in_features).to(grad.dtype)
    elif layout == "nm":
        out = grad2 @ nm_to_dense(*components, in_features).to(grad.dtype)
    elif layout == "csr" and components[2].dtype not in (torch.float32, torch.float64):
        out = grad2 @ csr_to_dense(*components, in_features).to(grad.dtype)
    elif layout == "csr":  # CSR transposed is CSC, which MKL multiplies directly
        out = torch.sparse.mm(_sparse_weight(*components, in_features).t(), grad2.t()).t()
    elif layout == "bsr":  # MKL has no BSC product on CPU
        out = grad2 @ _sparse_weight(*components, in_features).to_dense()
    elif layout in QUANT_COMPONENT_NAMES:
        out = grad2 @ quantized_to_dense(layout, components, in_features).to(grad.dtype)
    else:
        out = grad2 @ sparse_semi_structured_to_dense_cutlass(*components)
    return out.to(grad.dtype).contiguous().view(*grad.shape[:-1], in_features)


@sparse_linear_grad_input.register_fake
def _(grad, layout, components, in_features):
    return grad.new_empty(*grad.shape[:-1], in_features)


def _register_autograd(op, layout: str) -> None:
    """Gradients for ``x`` and ``bias``; none for the weight components."""

    def setup_context(ctx, inputs, output):
        x, *components, bias = inputs
        ctx.save_for_backward(*components)
        ctx.in_features = x.shape[-1]
        ctx.has_bias = bias is not None

    def backward(ctx, grad):
        components = ctx.saved_tensors
        if any(ctx.needs_input_grad[1:-1]):
            raise RuntimeError(
                f"fx_sparsity::{layout}_linear gives no gradient for its weight components; "
                "fine-tune the weights before lowering"
            )
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = sparse_linear_grad_input(grad, layout, list(components), ctx.in_features)
        if ctx.has_bias and ctx.needs_input_grad[-1]:
            grad_bias = _as_rows(grad).sum(0)
        return grad_x, *([None] * len(components)), grad_bias

    op.register_autograd(backward, setup_context=setup_context)


_register_autograd(bitmask_linear, "bitmask")
_register_autograd(nm_linear, "nm")
_register_autograd(csr_linear, "csr")
_register_autograd(bsr_linear, "bsr")
_register_autograd(semi_structured_linear, "semi_structured")

# ---- quantized weights: one operator per layout, "bitmask-int8" -> fx_sparsity::bitmask_int8_linear ----

_QUANT_ARGS = {
    "bitmask": "Tensor mask, Tensor values, Tensor row_offsets, Tensor scales",
    "nm": "Tensor mask, Tensor values, Tensor scales",
    "csr": "Tensor crow_indices, Tensor col_indices, Tensor values, Tensor scales",
    "dense-int8": "Tensor values, Tensor scales",
    "dense-int4": "Tensor values, Tensor scales, Tensor zeros",
}


def _dequantized_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear`` on the dequantized float32 weight, computed in float32 (float64 for float64 ``x``) as the
    kernels accumulate, returned in ``x``'s dtype."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    return out.to(x.dtype).contiguous()


def _native_quant(native: object, layout: str, x: Tensor, components: list[Tensor], bias: Tensor | None) -> Tensor:
    family = layout.split("-")[0]
    if family == "bitmask":
        return native.quant_bitmask_linear(x, *components, bias)
    if family == "nm":
        return native.quant_nm_linear(x, *components, bias)
    if family == "csr":
        return native.quant_csr_linear(x, *components, bias)
    values, scales, *zeros = components
    return native.quant_dense_linear(x, values, scales, zeros[0] if zeros else None, bias)


def _define_quant_op(layout: str):
    family = layout.split("-")[0]
    schema = f"(Tensor x, {_QUANT_ARGS.get(layout, _QUANT_ARGS.get(family))}, Tensor? bias) -> Tensor"

    def quant_linear(x: Tensor, *args: Tensor | None) -> Tensor:
        *components, bias = args
        native = native_ops() if x.device.type == "cpu" and x.dtype in NATIVE_DTYPES else None
        if native is not None:
            return _native_quant(native, layout, x, components, bias)
        return _dequantized_linear(x, quantized_to_dense(layout, components, x.shape[-1]), bias)

    quant_linear.__name__ = f"{layout.replace('-', '_')}_linear"
    quant_linear.__doc__ = (f"``F.linear(x, W, bias)`` with ``W`` given by its {layout} components "
                            "(see :func:`passes.lowering.quantized.to_quantized_components`).")
    op = torch.library.custom_op(f"fx_sparsity::{quant_linear.__name__}", quant_linear, mutates_args=(), schema=schema)

    @op.register_fake
    def _(x, *args):
        return _linear_fake(x, args[-2].shape[0])  # the last component (scales or zeros) is [out_features, ...]

    _register_autograd(op, layout)
    return op


# Quantized layout -> its operator (torch.ops.fx_sparsity.<layout>_linear).
QUANT_OPS = {layout: _define_quant_op(layout) for layout in QUANT_LAYOUTS}


# Float layout -> (its C++ operator, the position of its values among the components).
_FLOAT_NATIVE = {"bitmask": ("bitmask_linear", 1), "nm": ("nm_linear", 1), "csr": ("csr_linear", 2)}


def eager_native_linear(layout: str, x: Tensor, components: list[Tensor] | tuple[Tensor, ...],
                        bias: Tensor | None) -> Tensor | None:
    """The ``layout`` operator's result computed by its C++ kernel called directly, or ``None``.

    In eager mode an operator call goes through the dispatcher's Python layers (the custom op, its autograd
    wrapper, the Python kernel): about 15 us a call on a 2-core Zen 3 (51 against 36 us for a 16x128 layer),
    a few percent of a decode step. Where that wrapper could only end in the same kernel call this
    returns its result: a CPU tensor of a dtype the kernel takes, no tracing or compiling (``torch.compile``,
    ``torch.export``), no tensor subclass (fake, functional, proxies), no dispatch or function mode, and no
    gradient to record. Otherwise (or without the kernels, or for bsr and 2:4) ``None``: call the operator.
    """
    if (x.device.type != "cpu" or x.dtype not in NATIVE_DTYPES or torch.compiler.is_compiling()
            or type(x) is not Tensor or not all(type(c) is Tensor for c in components)
            or torch._C._is_torch_function_mode_enabled() or torch._C._len_torch_dispatch_stack()):
        return None
    if bias is not None and (type(bias) not in (Tensor, torch.nn.Parameter) or bias.device.type != "cpu"):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return None
    if layout in QUANT_COMPONENT_NAMES:
        native = native_ops()
        return None if native is None else _native_quant(native, layout, x, list(components), bias)
    if layout not in _FLOAT_NATIVE:
        return None
    name, values = _FLOAT_NATIVE[layout]
    native = _native_for(x, components[values])  # the operators' own test
    return None if native is None else getattr(native, name)(x, *components, bias)


def _check_2d(weight: Tensor) -> None:
    if weight.dim() != 2 or weight.layout != torch.strided:
        raise ValueError(f"expected a 2-D strided weight, got shape {tuple(weight.shape)} and layout {weight.layout}")


def _int32(indices: Tensor) -> Tensor:
    if indices.numel() and int(indices.max()) > torch.iinfo(torch.int32).max:
        raise ValueError("the weight has too many nonzeros for int32 indices")
    return indices.to(torch.int32, copy=True)


def to_csr_components(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(crow_indices, col_indices, values)`` of a dense 2-D weight: int32 row pointers and the
    narrowest column index that fits (int16, read as unsigned, up to 65536 columns; else int32).

    Example::

        >>> crow, col, values = to_csr_components(torch.eye(3))
        >>> crow.tolist(), col.tolist(), col.dtype, values.tolist()
        ([0, 1, 2, 3], [0, 1, 2], torch.int16, [1.0, 1.0, 1.0])
    """
    _check_2d(weight)
    return to_narrow_csr_components(weight)


def to_bsr_components(weight: Tensor, blocksize: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """``(crow_indices, col_indices, values)`` of a dense 2-D weight in blocks of ``blocksize``.

    A block is stored when any of its entries is nonzero; ``values`` has shape
    ``[nnz_blocks, *blocksize]``. Both weight dimensions must be multiples of ``blocksize``.
    """
    _check_2d(weight)
    rows, cols = weight.shape
    if rows % blocksize[0] or cols % blocksize[1]:
        raise ValueError(f"blocksize {tuple(blocksize)} does not divide the weight shape {tuple(weight.shape)}")
    with sparse_beta_silenced():
        bsr = weight.detach().to_sparse_bsr(tuple(blocksize))
    return _int32(bsr.crow_indices()), _int32(bsr.col_indices()), bsr.values().clone()


def to_semi_structured_components(weight: Tensor) -> tuple[Tensor, Tensor]:
    """``(packed, meta)`` of a 2:4 weight (at most 2 nonzeros in every 4 along a row), CUTLASS layout.

    Raises:
        ValueError: the weight is not 2:4 sparse, or its shape is not a multiple
            of :data:`SEMI_STRUCTURED_MIN_SHAPE`.
    """
    _check_2d(weight)
    rows, cols = weight.shape
    min_rows, min_cols = SEMI_STRUCTURED_MIN_SHAPE
    if rows % min_rows or cols % min_cols:
        raise ValueError(
            f"2:4 kernels need a weight shape that is a multiple of {SEMI_STRUCTURED_MIN_SHAPE}, "
            f"got {tuple(weight.shape)}"
        )
    per_group = (weight != 0).view(rows, cols // 4, 4).sum(-1)
    if bool((per_group > 2).any()):
        row, group = divmod(int((per_group > 2).flatten().nonzero()[0]), cols // 4)
        raise ValueError(
            f"the weight is not 2:4 sparse: row {row}, columns {4 * group}..{4 * group + 3} "
            f"hold {int(per_group[row, group])} nonzeros"
        )
    packed, meta = sparse_semi_structured_from_dense_cutlass(weight.detach().contiguous())
    return packed, meta
