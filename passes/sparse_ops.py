"""Sparse linear kernels as custom operators (namespace ``fx_sparsity``).

Each operator takes the weight as plain strided tensors (int32 index tensors and
a values tensor, or a packed 2:4 tensor and its metadata) and builds the sparse
view inside the kernel. Modules hold only strided buffers, so
``torch.export`` (with ``run_decompositions``, ``save``/``load``), AOTInductor and
``torch.compile(fullgraph=True)`` see an ordinary operator with a fake (meta)
implementation and never a sparse-layout tensor.

* ``fx_sparsity::csr_linear(x, crow_indices, col_indices, values, bias)``
* ``fx_sparsity::bsr_linear(x, crow_indices, col_indices, values, bias)``
  (``values`` is ``[nnz_blocks, block_rows, block_cols]``)
* ``fx_sparsity::semi_structured_linear(x, packed, meta, bias)`` (2:4, CUTLASS layout)

All compute ``F.linear(x, W, bias)`` for ``x`` of shape ``[..., in_features]``
and return a contiguous ``[..., out_features]`` tensor. CSR and BSR run
``torch.sparse.mm(W, x.T).T`` (``addmm`` with a bias), several times faster than
``F.linear(x, W_sparse)`` on MKL at batch > 1; on CUDA the same call runs
cuSPARSE. The 2:4 kernel is CUTLASS on CUDA; on other devices it unpacks to
dense (a reference, so that a program lowered on a GPU still runs anywhere).
Autograd reaches the input and the bias (so a lowered module runs under
``torch.compile`` with trainable biases, and gradients flow to earlier layers);
the weight components get none: fine-tune before lowering.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.sparse._semi_structured_conversions import (
    sparse_semi_structured_from_dense_cutlass,
    sparse_semi_structured_to_dense_cutlass,
)

__all__ = [
    "csr_linear",
    "bsr_linear",
    "semi_structured_linear",
    "sparse_linear_grad_input",
    "to_csr_components",
    "to_bsr_components",
    "to_semi_structured_components",
    "SEMI_STRUCTURED_MIN_SHAPE",
]

# Smallest weight (rows, cols), and the multiple both must be, that the CUTLASS
# 2:4 kernel takes for fp16/bf16 (torch.sparse.SparseSemiStructuredTensorCUTLASS).
SEMI_STRUCTURED_MIN_SHAPE = (32, 64)
# The dense operand's rows and columns must be multiples of this.
_SEMI_STRUCTURED_DENSE_MULTIPLE = 8


# torch warns once per process that sparse CSR support is in beta. Users of these
# operators never build a sparse tensor themselves: spend that one warning here,
# silenced, rather than filter warnings on every call.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    torch.sparse_csr_tensor(
        torch.tensor([0, 0]), torch.tensor([], dtype=torch.int64), torch.tensor([]), (1, 1), check_invariants=False
    )


def _sparse_mm_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, weight, bias)`` for a sparse-layout ``weight``, computed as ``(W @ x.T).T``.

    A single CSR row vector goes through ``mv`` instead: on MKL that is about 1.5x
    faster than ``mm`` for a 4096x4096 weight at 90% (for BSR it is slower).
    """
    x2 = x.reshape(-1, x.shape[-1])
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
    """The CSR or BSR view (no copy) of the components; BSR when ``values`` holds blocks."""
    shape = (_out_features(crow_indices, values), in_features)
    build = torch.sparse_bsr_tensor if values.dim() == 3 else torch.sparse_csr_tensor
    return build(crow_indices, col_indices, values, shape, check_invariants=False)


@torch.library.custom_op("fx_sparsity::csr_linear", mutates_args=())
def csr_linear(x: Tensor, crow_indices: Tensor, col_indices: Tensor, values: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, W, bias)`` with ``W`` given by its CSR components (see :func:`to_csr_components`)."""
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
    x2 = x.reshape(-1, x.shape[-1])
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
    grad2 = grad.reshape(-1, grad.shape[-1])
    if layout == "csr":  # CSR transposed is CSC, which MKL multiplies directly
        out = torch.sparse.mm(_sparse_weight(*components, in_features).t(), grad2.t()).t()
    elif layout == "bsr":  # MKL has no BSC product on CPU
        out = grad2 @ _sparse_weight(*components, in_features).to_dense()
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
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, *([None] * len(components)), grad_bias

    op.register_autograd(backward, setup_context=setup_context)


_register_autograd(csr_linear, "csr")
_register_autograd(bsr_linear, "bsr")
_register_autograd(semi_structured_linear, "semi_structured")


def _check_2d(weight: Tensor) -> None:
    if weight.dim() != 2 or weight.layout != torch.strided:
        raise ValueError(f"expected a 2-D strided weight, got shape {tuple(weight.shape)} and layout {weight.layout}")


def _int32(indices: Tensor) -> Tensor:
    if indices.numel() and int(indices.max()) > torch.iinfo(torch.int32).max:
        raise ValueError("the weight has too many nonzeros for int32 indices")
    return indices.to(torch.int32, copy=True)


def to_csr_components(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(crow_indices, col_indices, values)`` of a dense 2-D weight, indices as int32.

    Example::

        >>> crow, col, values = to_csr_components(torch.eye(3))
        >>> crow.tolist(), col.tolist(), values.tolist()
        ([0, 1, 2, 3], [0, 1, 2], [1.0, 1.0, 1.0])
    """
    _check_2d(weight)
    csr = weight.detach().to_sparse_csr()
    return _int32(csr.crow_indices()), _int32(csr.col_indices()), csr.values().clone()


def to_bsr_components(weight: Tensor, blocksize: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """``(crow_indices, col_indices, values)`` of a dense 2-D weight in blocks of ``blocksize``.

    A block is stored when any of its entries is nonzero; ``values`` has shape
    ``[nnz_blocks, *blocksize]``. Both weight dimensions must be multiples of ``blocksize``.
    """
    _check_2d(weight)
    rows, cols = weight.shape
    if rows % blocksize[0] or cols % blocksize[1]:
        raise ValueError(f"blocksize {tuple(blocksize)} does not divide the weight shape {tuple(weight.shape)}")
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
