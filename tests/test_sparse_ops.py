"""The fx_sparsity::*_linear custom operators against dense F.linear, and their packing helpers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from passes.lowering import (
    bsr_linear,
    csr_linear,
    semi_structured_linear,
    to_bsr_components,
    to_csr_components,
    to_semi_structured_components,
)

INPUT_SHAPES = [(64,), (5, 64), (2, 3, 64), (0, 64)]


def sparse_weight(rows: int, cols: int, density: float, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=g) * (torch.rand(rows, cols, generator=g) < density)).to(dtype)


def two_four_weight(rows: int, cols: int, dtype=torch.float16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    drop = torch.rand(rows, cols // 4, 4, generator=g).argsort(-1)[..., :2]
    keep = torch.ones(rows, cols // 4, 4, dtype=torch.bool).scatter_(-1, drop, False).view(rows, cols)
    return (torch.randn(rows, cols, generator=g) * keep).to(dtype)


@pytest.mark.parametrize("shape", INPUT_SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_csr_linear_matches_dense(shape, with_bias, dtype):
    """csr_linear(x, CSR(W), b) equals F.linear(x, W, b) for 1-D, 2-D, 3-D and empty inputs; output contiguous."""
    weight = sparse_weight(48, 64, 0.2, dtype)
    bias = torch.randn(48, dtype=dtype) if with_bias else None
    x = torch.randn(shape, dtype=dtype)
    out = csr_linear(x, *to_csr_components(weight), bias)
    assert out.shape == (*shape[:-1], 48) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, weight, bias))


@pytest.mark.parametrize("shape", INPUT_SHAPES)
@pytest.mark.parametrize("blocksize", [(16, 16), (8, 8), (1, 1)])
def test_bsr_linear_matches_dense(shape, blocksize):
    """bsr_linear equals F.linear for block-sparse and unstructured weights, any input rank."""
    g = torch.Generator().manual_seed(1)
    blocks = torch.rand(48 // blocksize[0], 64 // blocksize[1], generator=g) < 0.3
    weight = torch.randn(48, 64, generator=g) * blocks.repeat_interleave(blocksize[0], 0).repeat_interleave(blocksize[1], 1)
    bias = torch.randn(48)
    x = torch.randn(shape)
    crow, col, values = to_bsr_components(weight, blocksize)
    assert values.shape == (int(blocks.sum()), *blocksize)
    torch.testing.assert_close(bsr_linear(x, crow, col, values, bias), F.linear(x, weight, bias))


def test_all_zero_weight():
    """A fully pruned weight stores no values and returns the bias alone."""
    weight, bias, x = torch.zeros(8, 16), torch.randn(8), torch.randn(3, 16)
    crow, col, values = to_csr_components(weight)
    assert values.numel() == 0 and col.numel() == 0
    torch.testing.assert_close(csr_linear(x, crow, col, values, bias), bias.expand(3, 8))


def test_components_are_plain_narrow_and_strided():
    """Row pointers are int32, csr column indices int16 (bsr int32), every component is a strided tensor
    with no sparse base (exportable buffers)."""
    weight = sparse_weight(32, 32, 0.1)
    for parts, col_dtype in ((to_csr_components(weight), torch.int16), (to_bsr_components(weight, (8, 8)), torch.int32)):
        crow, col, values = parts
        assert crow.dtype == torch.int32 and col.dtype == col_dtype
        for t in parts:
            assert t.layout == torch.strided and t._base is None and t.is_contiguous()
    assert to_csr_components(weight)[2].numel() == int(torch.count_nonzero(weight))


def test_semi_structured_pack_round_trip_and_reference_kernel():
    """2:4 packing keeps every value (packed is half the width) and the CPU kernel equals F.linear."""
    weight = two_four_weight(64, 128)
    packed, meta = to_semi_structured_components(weight)
    assert packed.shape == (64, 64)
    x = torch.randn(3, 5, 128, dtype=torch.float16)
    bias = torch.randn(64, dtype=torch.float16)
    torch.testing.assert_close(semi_structured_linear(x, packed, meta, bias), F.linear(x, weight, bias))


def test_semi_structured_rejects_bad_weights():
    """Not 2:4 (names the row and columns) or a shape off the kernel's multiples: ValueError."""
    weight = two_four_weight(64, 128)
    weight[3, 4:8] = 1.0
    with pytest.raises(ValueError, match=r"not 2:4 sparse: row 3, columns 4..7 hold 4 nonzeros"):
        to_semi_structured_components(weight)
    with pytest.raises(ValueError, match=r"multiple of \(32, 64\)"):
        to_semi_structured_components(two_four_weight(48, 128))


def test_bsr_rejects_blocksize_that_does_not_divide():
    """A blocksize that does not divide the weight: ValueError naming both."""
    with pytest.raises(ValueError, match=r"blocksize \(16, 16\) does not divide the weight shape \(40, 64\)"):
        to_bsr_components(torch.zeros(40, 64), (16, 16))


@pytest.mark.parametrize("name", ["csr", "bsr", "semi"])
def test_opcheck(name):
    """torch.library.opcheck: schema, fake (meta) kernel, dynamic shapes and the autograd formula
    (input and bias require grad) agree."""
    dtype = torch.float16 if name == "semi" else torch.float32
    x = torch.randn(6, 64, dtype=dtype, requires_grad=True)
    bias = torch.randn(32, dtype=dtype, requires_grad=True)
    if name == "semi":
        args = (x, *to_semi_structured_components(two_four_weight(32, 64)), bias)
        op = torch.ops.fx_sparsity.semi_structured_linear.default
    elif name == "csr":
        args = (x, *to_csr_components(sparse_weight(32, 64, 0.2)), bias)
        op = torch.ops.fx_sparsity.csr_linear.default
    else:
        args = (x, *to_bsr_components(sparse_weight(32, 64, 0.2), (16, 16)), None)
        op = torch.ops.fx_sparsity.bsr_linear.default
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("layout", ["csr", "bsr"])
def test_input_and_bias_gradients_match_dense(layout):
    """Backward through the operators gives F.linear's input and bias gradients; the weight components get
    none, and asking for one is an error. float64, so that summation order does not matter."""
    weight = sparse_weight(32, 64, 0.3, torch.float64)
    components = to_csr_components(weight) if layout == "csr" else to_bsr_components(weight, (16, 16))
    op = csr_linear if layout == "csr" else bsr_linear
    x = torch.randn(2, 5, 64, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(32, dtype=torch.float64, requires_grad=True)
    grads = torch.autograd.grad(op(x, *components, bias).square().sum(), (x, bias))
    expected = torch.autograd.grad(F.linear(x, weight, bias).square().sum(), (x, bias))
    torch.testing.assert_close(grads, expected)
    values = components[2].clone().requires_grad_()
    with pytest.raises(RuntimeError, match="no gradient for its weight components"):
        op(x, components[0], components[1], values, bias).sum().backward()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_kernels_match_cpu_reference():
    """On CUDA: csr via cuSPARSE and 2:4 via CUTLASS equal the dense result (fp32 / fp16)."""
    weight = sparse_weight(256, 256, 0.1).cuda()
    x = torch.randn(17, 256, device="cuda")
    torch.testing.assert_close(csr_linear(x, *to_csr_components(weight), None), F.linear(x, weight))
    if torch.cuda.get_device_capability() >= (8, 0):
        weight = two_four_weight(128, 256).cuda()
        x = torch.randn(17, 256, dtype=torch.float16, device="cuda")
        bias = torch.randn(128, dtype=torch.float16, device="cuda")
        out = semi_structured_linear(x, *to_semi_structured_components(weight), bias)
        torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1e-2, atol=1e-2)


def test_importing_leaves_torch_sparse_warnings_to_the_user():
    """Importing fx_sparsity neither filters warnings for the process nor spends torch's one-time "Sparse CSR
    tensor support is in beta" warning: the user's own first CSR tensor still shows it."""
    import subprocess
    import sys

    code = (
        "import warnings, torch, fx_sparsity\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    torch.sparse_csr_tensor(torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([1.0]), (1, 1))\n"
        "print(any('in beta' in str(w.message) for w in caught))\n"
        "print(any('beta' in str(f[1].pattern if hasattr(f[1], 'pattern') else f[1]) for f in warnings.filters))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.split() == ["True", "False"], result.stderr
