"""Our C++ sparse kernels (bitmask, N:M, narrow-index CSR) and their packing, against F.linear.

Every kernel runs on each instruction set this CPU has (AVX-512 with and without the
AVX512-BF16 dot-product kernels for bf16, AVX2, portable) and on the pure-torch reference
path (``FX_SPARSITY_NO_NATIVE=1``). The expected
output is F.linear in float64 on the same (rounded) weights and inputs, rounded to
the output dtype; the tolerance is that of float32 accumulation over the input
features (float32) or one rounding step of the output dtype (bfloat16, float16).
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import forced_kernel_path, native_isas
from passes.lowering import (
    bitmask_linear,
    bitmask_to_dense,
    csr_linear,
    csr_to_dense,
    detect_nm,
    mask_bytes_per_row,
    native,
    nm_linear,
    nm_to_dense,
    to_bitmask_components,
    to_narrow_csr_components,
    to_nm_components,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OPS = {"bitmask": bitmask_linear, "nm": nm_linear, "csr": csr_linear}

ISAS = native_isas(("avx512-bf16", "avx512-lut-bf16", "avx512", "avx512-lut", "avx2", "generic"))
PATHS = [*ISAS, "reference"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Runs the test on one kernel path: an ISA of the C++ kernels, or the pure-torch reference."""
    yield from forced_kernel_path(request.param, monkeypatch)


def random_weight(rows, cols, density, dtype, seed=0, nm=None):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    if nm is None:
        keep = torch.rand(rows, cols, generator=g) < density
    else:
        n, m = nm
        scores = torch.rand(rows, cols // m, m, generator=g)
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(n, -1).indices, True)
        keep = keep.view(rows, cols) & (torch.rand(rows, cols, generator=g) < density)
    return (w * keep).to(dtype)


def components(layout, weight, nm=None):
    if layout == "bitmask":
        return to_bitmask_components(weight)
    if layout == "nm":
        return to_nm_components(weight, *nm)
    return to_narrow_csr_components(weight)


def expected(x, weight, bias):
    out = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    return out.to(x.dtype)


def assert_matches(out, x, weight, bias):
    """``out`` equals F.linear(x, weight, bias) up to float32 accumulation and one rounding of its dtype."""
    ref = expected(x, weight, bias)
    assert out.dtype == x.dtype and out.shape == ref.shape and out.is_contiguous()
    if x.dtype == torch.float32:
        scale = max(1.0, float(x.abs().amax()) if x.numel() else 1.0) * max(1, x.shape[-1]) ** 0.5
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6 * scale)
    else:
        eps = torch.finfo(x.dtype).eps
        torch.testing.assert_close(out.double(), ref.double(), rtol=eps, atol=1e-3)


CASES = [  # rows, cols, density, input shape prefix
    (37, 100, 0.5, (5,)),
    (33, 17, 0.3, (1,)),  # cols below one vector
    (16, 64, 1.0, (64,)),  # all nonzero
    (8, 48, 0.0, (3,)),  # all zero
    (130, 333, 0.1, (2, 7)),  # 3-D input, cols not a multiple of 16
    (20, 96, 0.6, (0,)),  # empty batch
    (64, 200, 0.4, (65,)),  # batch over one tile of 64
    (5, 0, 0.5, (3,)),  # no input features: the output is the bias
]


@pytest.mark.parametrize("layout", ["bitmask", "nm", "csr"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_kernels_match_linear(path, layout, dtype, with_bias):
    """Each kernel path equals F.linear for odd shapes, empty rows, all-zero and all-nonzero weights,
    batches 0/1/odd/64/65, 3-D inputs, each dtype, with and without bias."""
    for i, (rows, cols, density, prefix) in enumerate(CASES):
        nm = (2, 4) if cols % 4 == 0 else (1, cols)
        if layout == "nm" and cols == 0:
            continue  # N:M needs whole groups
        weight = random_weight(rows, cols, density, dtype, seed=i, nm=nm if layout == "nm" else None)
        weight[rows // 2] = 0  # an empty row
        bias = torch.randn(rows).to(dtype) if with_bias else None
        x = torch.randn(*prefix, cols).to(dtype)
        assert_matches(OPS[layout](x, *components(layout, weight, nm), bias), x, weight, bias)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 5])
def test_rows_near_the_end_of_values_agree_bit_for_bit(isa, dtype, batch):
    """The last rows of a bitmask weight (within one vector of the end of its values, decoded without reading
    past it) and the same row earlier (decoded by whole-vector reads, on AVX2 by byte shuffles for bf16) sum
    in the same order: their outputs are bit for bit equal."""
    row = random_weight(1, 96, 0.2, dtype, seed=1)
    weight = torch.cat([row, random_weight(9, 96, 0.6, dtype, seed=2), row])
    x = torch.randn(batch, 96).to(dtype)
    ops = native.native_ops()
    ops.isa(isa)
    try:
        out = bitmask_linear(x, *to_bitmask_components(weight), None)
    finally:
        ops.isa("auto")
    assert torch.equal(out[:, 0], out[:, -1])
    assert_matches(out, x, weight, None)


@pytest.mark.parametrize("layout", ["bitmask", "nm", "csr"])
def test_non_contiguous_inputs(path, layout):
    """A transposed or strided x gives the same result as its contiguous copy."""
    weight = random_weight(24, 64, 0.5, torch.float32, nm=(2, 4) if layout == "nm" else None)
    parts = components(layout, weight, (2, 4))
    for x in (torch.randn(64, 6).t(), torch.randn(6, 128)[:, ::2], torch.randn(3, 64, 4).transpose(1, 2)):
        assert not x.is_contiguous()
        assert_matches(OPS[layout](x, *parts, None), x, weight, None)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 70),
    groups=st.integers(1, 40),
    density=st.floats(0.0, 1.0),
    batch=st.integers(0, 20),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(["bitmask", "nm", "csr"]),
    seed=st.integers(0, 2**16),
)
def test_kernels_random_shapes(rows, groups, density, batch, dtype, layout, seed):
    """Property: on random shapes, densities and batches, every ISA path equals F.linear."""
    cols = 4 * groups
    weight = random_weight(rows, cols, density, dtype, seed, nm=(2, 4) if layout == "nm" else None)
    bias = torch.randn(rows).to(dtype)
    x = torch.randn(batch, cols).to(dtype)
    parts = components(layout, weight, (2, 4))
    ops = native.native_ops()
    try:
        for isa in ISAS:
            ops.isa(isa)
            assert_matches(OPS[layout](x, *parts, bias), x, weight, bias)
    finally:
        if ISAS:
            ops.isa("auto")


@pytest.mark.parametrize("layout", ["bitmask", "nm", "csr"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(layout, dtype):
    """torch.library.opcheck: schema, fake kernel, dynamic shapes and the input/bias autograd agree."""
    weight = random_weight(32, 64, 0.5, dtype, nm=(2, 4) if layout == "nm" else None)
    x = torch.randn(6, 64, dtype=dtype, requires_grad=True)
    bias = torch.randn(32, dtype=dtype, requires_grad=True)
    op = getattr(torch.ops.fx_sparsity, f"{layout}_linear").default
    torch.library.opcheck(op, (x, *components(layout, weight, (2, 4)), bias))


@pytest.mark.parametrize("layout", ["bitmask", "nm", "csr"])
def test_input_and_bias_gradients(layout):
    """Backward gives F.linear's input and bias gradients (float32 kernels, float64 reference)."""
    weight = random_weight(32, 64, 0.5, torch.float32, nm=(2, 4) if layout == "nm" else None)
    x = torch.randn(2, 5, 64, requires_grad=True)
    bias = torch.randn(32, requires_grad=True)
    grads = torch.autograd.grad(OPS[layout](x, *components(layout, weight, (2, 4)), bias).square().sum(), (x, bias))
    x64, b64 = x.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    ref = torch.autograd.grad(F.linear(x64, weight.double(), b64).square().sum(), (x64, b64))
    torch.testing.assert_close(grads, tuple(g.float() for g in ref), rtol=1e-4, atol=1e-4)


def test_bitmask_packing_round_trip_and_layout():
    """bitmask: 64-bit padded little-endian rows, nonzeros row by row, int64 offsets; unpacks exactly."""
    weight = random_weight(9, 70, 0.4, torch.float32)
    weight[4] = 0
    mask, values, offsets = to_bitmask_components(weight)
    assert mask.dtype == torch.uint8 and mask.shape == (9, mask_bytes_per_row(70)) == (9, 16)
    assert offsets.dtype == torch.int64 and offsets.tolist()[-1] == values.numel() == int((weight != 0).sum())
    assert offsets[5] == offsets[4]
    assert bool(mask[:, 9:].eq(0).all()) and int(mask[0, 0]) == sum(1 << j for j in range(8) if weight[0, j] != 0)
    assert torch.equal(bitmask_to_dense(mask, values, offsets, 70), weight)


def test_nm_packing_fills_short_groups():
    """N:M keeps exactly n values per group (zeros where a group holds fewer), fixed row stride; round trip."""
    weight = random_weight(6, 32, 0.6, torch.bfloat16, nm=(2, 4))
    weight[0, :4] = torch.tensor([0.0, 0.0, 0.0, 5.0])
    mask, values = to_nm_components(weight, 2, 4)
    assert values.shape == (6, 16) and values.dtype == torch.bfloat16
    assert int(mask[0, 0]) & 0xF == 0b1001  # the nonzero at column 3, then the first zero
    assert torch.equal(nm_to_dense(mask, values, 32), weight)


def test_nm_refuses_weights_that_are_not_nm():
    """A group with more than n nonzeros, a column count off m, bad n/m: ValueError naming it."""
    weight = random_weight(4, 16, 1.0, torch.float32, nm=(2, 4))
    weight[2, 8:12] = 1.0
    with pytest.raises(ValueError, match=r"not 2:4 sparse: row 2, columns 8..11 hold 4 nonzeros"):
        to_nm_components(weight, 2, 4)
    with pytest.raises(ValueError, match="multiple of 8, got 12"):
        to_nm_components(torch.zeros(2, 12), 1, 8)
    with pytest.raises(ValueError, match="1 <= n < m"):
        to_nm_components(torch.zeros(2, 8), 4, 4)


def test_detect_nm():
    """detect_nm finds the sparsest pattern of at most half density, ties to the smaller group; else None."""
    assert detect_nm(random_weight(8, 64, 1.0, torch.float32, nm=(2, 4))) == (2, 4)
    assert detect_nm(random_weight(8, 64, 1.0, torch.float32, nm=(1, 4))) == (1, 4)
    assert detect_nm(random_weight(8, 64, 1.0, torch.float32, nm=(3, 8))) == (3, 8)
    assert detect_nm(torch.ones(4, 64)) is None
    assert detect_nm(torch.ones(4, 6)) is None


def test_narrow_csr_indices():
    """csr stores int16 column indices (read as unsigned) up to 65536 columns, int32 beyond; the kernels read
    columns past 32767 correctly."""
    weight = torch.zeros(3, 40000)
    weight[0, 39999], weight[1, 32768], weight[2, 5] = 2.0, 3.0, 4.0
    crow, col, values = to_narrow_csr_components(weight)
    assert crow.dtype == torch.int32 and col.dtype == torch.int16
    assert torch.equal(csr_to_dense(crow, col, values, 40000), weight)
    x = torch.randn(2, 40000)
    torch.testing.assert_close(csr_linear(x, crow, col, values, None), x @ weight.t())
    torch.testing.assert_close(csr_linear(x[:1], crow, col, values, None), x[:1] @ weight.t())
    wide = random_weight(3, 70000, 0.01, torch.float32)
    parts = to_narrow_csr_components(wide)
    assert parts[1].dtype == torch.int32
    x = torch.randn(3, 70000)
    for rows in (x[:1], x):  # the batch-1 and the batch kernel, int32 indices (as in programs saved before)
        assert_matches(csr_linear(rows, *parts, None), rows, wide, None)


def test_kernels_refuse_bad_buffers():
    """Inconsistent components are refused at the operator boundary with a message naming the argument."""
    ops = native.native_ops()
    if ops is None:
        pytest.skip("the C++ kernels are not built")
    mask, values, offsets = to_bitmask_components(random_weight(8, 64, 0.5, torch.float32))
    with pytest.raises(RuntimeError, match="same dtype"):
        ops.bitmask_linear(torch.randn(2, 64, dtype=torch.bfloat16), mask, values, offsets, None)
    with pytest.raises(RuntimeError, match="mask must have shape"):
        ops.bitmask_linear(torch.randn(2, 128), mask, values, offsets, None)
    with pytest.raises(RuntimeError, match="row_offsets must start at 0"):
        ops.bitmask_linear(torch.randn(2, 64), mask, values[:-1], offsets, None)


def test_native_isa_is_the_best_this_cpu_has():
    """The kernels pick the widest ISA the CPU supports, once: AVX512-BF16 dot products for bf16 where the CPU
    has them; never the permutation-table decodes (``-lut``), on AMD either."""
    if not ISAS:
        pytest.skip("the C++ kernels are not built")
    flags = open("/proc/cpuinfo").read() if sys.platform == "linux" else ""
    assert native.native_isa() == ISAS[0]
    if "avx512bw" in flags and "avx512vl" in flags and "avx512dq" in flags:
        has_bf16 = " avx512_bf16" in flags and " avx512_vbmi2" in flags
        assert ISAS[0] == ("avx512-bf16" if has_bf16 else "avx512")


def test_failed_build_warns_once_and_falls_back(monkeypatch):
    """When the build fails (no compiler): ONE warning saying why and how to fix it, then the reference path."""
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    native._load.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert native.native_ops() is None and native.native_ops() is None
            weight = random_weight(8, 32, 0.5, torch.float32)
            x = torch.randn(3, 32)
            assert_matches(bitmask_linear(x, *to_bitmask_components(weight), None), x, weight, None)
        messages = [str(w.message) for w in caught if "C++ sparse kernels" in str(w.message)]
        assert len(messages) == 1
        assert "command not found" in messages[0] and "Install a C++ compiler" in messages[0]
    finally:
        native._load.cache_clear()
        monkeypatch.undo()


def test_no_native_env_forces_the_reference_in_a_fresh_process():
    """FX_SPARSITY_NO_NATIVE=1: a fresh process never builds or loads the extension and warns nothing."""
    code = (
        "import warnings, torch; warnings.simplefilter('error', RuntimeWarning);"
        "from passes.lowering import native; from passes.lowering import bitmask_linear, to_bitmask_components;"
        "w = torch.randn(4, 8) * (torch.rand(4, 8) < 0.5); x = torch.randn(2, 8);"
        "torch.testing.assert_close(bitmask_linear(x, *to_bitmask_components(w), None), x @ w.t());"
        "assert native.native_ops() is None;"
        "assert not any('fx_sparsity_native' in p for p in torch.ops.loaded_libraries); print('ok')"
    )
    env = {**__import__("os").environ, native.NO_NATIVE_ENV: "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]
