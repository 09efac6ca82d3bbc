"""int8 and int4 values in the sparse formats (bitmask, nm, csr) and the dense int formats: packing, the C++
kernels of every ISA this CPU has plus the portable one, the pure-torch reference path (FX_SPARSITY_NO_NATIVE),
the fx_sparsity::*_int8/_int4_linear operators (opcheck, export, compile) and lowering a graph with them.

The quantized weights come from a small reference rounding written here (scale = max|w| / qmax per row or
group, an all-zero row or group scale 1, q = clamp(round(w / scale), -qmax, qmax); with zero points
scale = (max - min) / 15, zero = clamp(round(-min / scale), 0, 15)), not from fx_sparsity.quantization.

Expected outputs are float64: x @ dequantize(q)^T + bias. The kernels accumulate in float32 over the input
features, one partial sum per scale group multiplied by its scale, so each output is within
(in_features + 2 * groups + 8) * 2^-24 * (|x| @ |W|^T + |bias|) of it (the first-order bound of float32
summation of that many terms; +8 for the lane reduction, the bias and the conversions); a bfloat16 output adds
one rounding step of bfloat16 (eps * |y|).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.export import Dim

from helpers import forced_kernel_path, native_isas
from passes.capturing import capture
from passes.lowering import (
    QUANT_GROUP_SIZES,
    QUANT_LAYOUTS,
    QUANT_OPS,
    SparseFormat,
    dequantize,
    lower_sparse,
    native,
    pack_int4,
    quantized_to_dense,
    to_quantized_components,
    unpack_int4,
    unsupported_reason,
)
from passes.lowering.quantized import QuantizedComponents, quant_bits
from passes.masking import insert_masks
from passes.matching import find_weights

EPS32 = 2.0**-24

ISAS = native_isas(("avx512-bf16", "avx512", "avx512-lut", "avx2", "generic"))
PATHS = [*ISAS, "reference"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """One kernel path: an ISA of the C++ kernels (forced with the isa operator), or the pure-torch reference."""
    yield from forced_kernel_path(request.param, monkeypatch)


# ---- the reference rounding and the weights ----


def quantize(w: torch.Tensor, bits: int, group_size: int | None = None, zero_points: bool = False):
    """(values, scales, zeros) of ``w`` by round-to-nearest (see the module docstring)."""
    rows, cols = w.shape
    if bits == 8:
        scales = w.abs().amax(1) / 127
        scales[scales == 0] = 1
        return torch.clamp(torch.round(w / scales[:, None]), -127, 127).to(torch.int8), scales, None
    g = w.reshape(rows, cols // group_size, group_size)
    if zero_points:
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
        scales = (hi - lo) / 15
        scales[scales == 0] = 1
        zeros = torch.clamp(torch.round(-lo / scales), 0, 15)
        q = torch.clamp(torch.round(g / scales[..., None]) + zeros[..., None], 0, 15)
        return q.reshape(rows, cols).to(torch.int8), scales, zeros.to(torch.int8)
    scales = g.abs().amax(-1) / 7
    scales[scales == 0] = 1
    q = torch.clamp(torch.round(g / scales[..., None]), -7, 7)
    return q.reshape(rows, cols).to(torch.int8), scales, None


def sparse_weight(layout: str, rows: int, cols: int, seed: int = 0, density: float = 0.4) -> torch.Tensor:
    """A weight for ``layout``: ``density`` (2:4 for nm), row 0 empty, row 1 full (bitmask/csr/dense)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    family = layout.split("-")[0]
    if family == "nm":
        order = torch.rand(rows, cols // 4, 4, generator=g).argsort(-1)[..., :2]
        w = w * torch.zeros(rows, cols // 4, 4).scatter_(-1, order, 1.0).reshape(rows, cols)
    elif family != "dense":
        w = w * (torch.rand(rows, cols, generator=g) < density)
    w[0] = 0
    if family != "nm" and rows > 1:  # every entry large enough not to round to 0
        w[1] = torch.sign(torch.randn(cols, generator=g)) * (0.5 + torch.rand(cols, generator=g))
    return w


def quantized(layout: str, rows: int, cols: int, group_size: int = 32, zero_points: bool = False, seed: int = 0):
    q = quantize(sparse_weight(layout, rows, cols, seed), quant_bits(layout), group_size, zero_points)
    return QuantizedComponents(*q)


def assert_within_bound(y: torch.Tensor, x: torch.Tensor, q: QuantizedComponents, bias: torch.Tensor | None):
    """``y`` against float64 x @ W^T + bias, within the float32 accumulation bound of the module docstring."""
    weight = dequantize(q.values, q.scales, q.zeros).double()
    rows, cols = weight.shape
    groups = q.scales.reshape(rows, -1).shape[1]
    x64 = x.double()
    ref = x64 @ weight.T + (0 if bias is None else bias.double())
    magnitude = x64.abs() @ weight.abs().T + (0 if bias is None else bias.double().abs())
    tol = (cols + 2 * groups + 8) * EPS32 * magnitude
    if y.dtype != torch.float32:
        tol = tol + torch.finfo(y.dtype).eps * ref.abs()
    assert y.dtype == x.dtype and y.shape == ref.shape and y.is_contiguous()
    err = (y.double() - ref).abs()
    assert bool((err <= tol).all()), f"max error {float(err.max())}, max tolerance at it {float(tol.flatten()[err.argmax()])}"


# int8: in 200 (not a multiple of 16 or 64); int4: each group size with an in_features it divides.
SHAPES = {8: [(37, 200, 200)], 4: [(37, 224, 32), (21, 192, 64), (9, 384, 128)]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", QUANT_LAYOUTS)
def test_kernels_match_dequantized_linear(path, layout, dtype):
    """Every quantized kernel, on every path: batch 0, 1, odd and 64, a 3-D input, bias or not, against float64
    F.linear on the dequantized weight (empty and full rows included) and against the pure-torch reference."""
    bits = quant_bits(layout)
    for rows, cols, group in SHAPES[bits]:
        for zero_points in (False, True) if layout == "dense-int4" else (False,):
            q = quantized(layout, rows, cols, group, zero_points)
            parts = to_quantized_components(layout, q)
            op = QUANT_OPS[layout]
            weight = quantized_to_dense(layout, parts, cols)
            for i, shape in enumerate(((0, cols), (1, cols), (5, cols), (64, cols), (2, 3, cols), (1, cols))):
                x = torch.randn(shape).to(dtype)
                bias = torch.randn(rows) if i % 2 else None  # batch 1 with and without
                y = op(x, *parts, bias)
                assert_within_bound(y, x, q, bias)
                ref = F.linear(x.float(), weight, bias).to(dtype)
                assert_within_bound(ref, x, q, bias)  # the pure-torch reference meets the same bound


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("layout", ["bitmask-int8", "bitmask-int4", "dense-int4"])
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_near_the_end_of_values_agree_bit_for_bit(isa, layout, batch, dtype):
    """The last rows of a quantized weight (within one vector of the end of the code stream, decoded without
    reading past it) and the same row earlier (whole-vector reads, on AVX2 byte shuffles for int8) sum in the same
    order: their outputs are bit for bit equal. bfloat16 x at batch 1 takes the AVX512-BF16 int4 kernels."""
    w = sparse_weight(layout, 11, 128, seed=3, density=0.6)
    w[-1] = w[0] = w[1] * (torch.rand(128, generator=torch.Generator().manual_seed(4)) < 0.2)
    q = QuantizedComponents(*quantize(w, quant_bits(layout), 32))
    x = torch.randn(batch, 128).to(dtype)
    ops = native.native_ops()
    ops.isa(isa)
    try:
        y = QUANT_OPS[layout](x, *to_quantized_components(layout, q), None)
    finally:
        ops.isa("auto")
    assert torch.equal(y[:, 0], y[:, -1])
    assert_within_bound(y, x, q, None)


@settings(max_examples=30, deadline=None)
@given(
    layout=st.sampled_from(QUANT_LAYOUTS),
    rows=st.integers(1, 40),
    width=st.integers(1, 75),
    group_size=st.sampled_from(QUANT_GROUP_SIZES),
    density=st.floats(0.0, 1.0),
    batch=st.integers(0, 20),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_kernels_random_shapes(layout, rows, width, group_size, density, batch, dtype, seed):
    """Property: on random shapes (int8: any multiple of 4 columns; int4: 1-4 groups of 32/64/128), densities
    (rows starting mid-byte in the int4 streams), batches and activation dtypes (float16 too), every ISA path
    meets the float32 accumulation bound."""
    bits = quant_bits(layout)
    cols = 4 * width if bits == 8 else group_size * (1 + width % 4)
    w = sparse_weight(layout, rows, cols, seed, density)
    q = QuantizedComponents(*quantize(w, bits, group_size, zero_points=layout == "dense-int4" and seed % 2 == 1))
    parts = to_quantized_components(layout, q)
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(seed)).to(dtype)
    bias = torch.randn(rows)
    ops = native.native_ops()
    try:
        for isa in ISAS:
            ops.isa(isa)
            assert_within_bound(QUANT_OPS[layout](x, *parts, bias), x, q, bias)
    finally:
        if ISAS:
            ops.isa("auto")


def test_packing_round_trip_and_nibble_order():
    """Every layout unpacks to the dequantized weight exactly; int4 codes are value + 8, low nibble first, one
    stream for bitmask/csr (a row may start mid-byte), nm groups with fewer values filled with code 8 (zero)."""
    for layout in QUANT_LAYOUTS:
        for rows, cols, group in SHAPES[quant_bits(layout)]:
            q = quantized(layout, rows, cols, group)
            parts = to_quantized_components(layout, q)
            assert torch.equal(quantized_to_dense(layout, parts, cols), dequantize(q.values, q.scales, q.zeros))
    assert pack_int4(torch.tensor([1, 15, 7])).tolist() == [0xF1, 0x87]
    assert unpack_int4(torch.tensor([0xF1, 0x87], dtype=torch.uint8), 3).tolist() == [1, 15, 7]
    values = torch.zeros(2, 32, dtype=torch.int8)
    values[0, 0], values[1, 3], values[1, 5] = -7, 7, 1
    mask, stream, offsets, scales = to_quantized_components(
        "bitmask-int4", QuantizedComponents(values, torch.ones(2, 1))
    )
    assert offsets.tolist() == [0, 1, 3] and stream.tolist() == [0xF1, 0x89]
    nm_values = torch.zeros(1, 32, dtype=torch.int8)
    nm_values[0, 4] = -3  # 1:4 keeps 8 per row: the first zero of group 0 (code 8), then -3 (code 5), ...
    _, nm_stream, _ = to_quantized_components("nm-int4", QuantizedComponents(nm_values, torch.ones(1, 1)), nm=(1, 4))
    assert nm_stream.tolist() == [[0x58, 0x88, 0x88, 0x88]]


@pytest.mark.parametrize(
    ("layout", "change", "match"),
    [
        ("bitmask-int8", lambda q: QuantizedComponents(q.values.clamp(-127, 127).index_fill(1, torch.tensor([0]), -128),
                                                       q.scales), r"int8 values must be integers in \[-127, 127\]"),
        ("csr-int4", lambda q: QuantizedComponents(q.values, q.scales.index_fill(1, torch.tensor([0]), 0.0)),
         r"scales must be finite and > 0, got 0.0"),
        ("nm-int4", lambda q: QuantizedComponents(q.values, q.scales.index_fill(1, torch.tensor([1]), float("inf"))),
         r"scales must be finite and > 0, got inf"),
        ("dense-int8", lambda q: QuantizedComponents(q.values, torch.full_like(q.scales, 3e38)), r"overflows float32"),
        ("bitmask-int4", lambda q: QuantizedComponents(q.values[:, :200], q.scales),
         r"do not split in_features=200 .* in_features must be a multiple of the group size"),
        ("csr-int4", lambda q: QuantizedComponents(q.values, q.scales, torch.full_like(q.scales, 8, dtype=torch.int8)),
         r"zero points cannot be held by a sparse format"),
        ("dense-int4", lambda q: QuantizedComponents(q.values + 9, q.scales), r"int4 values must be integers in \[-7, 7\]"),
        ("dense-int4", lambda q: QuantizedComponents(q.values.clamp(min=0), q.scales, torch.full_like(q.scales, 16,
                                                     dtype=torch.int8)), r"zeros must be integers in \[0, 15\]"),
        ("bitmask-int8", lambda q: QuantizedComponents(q.values, q.scales[:5]), r"int8 scales must be one per output row"),
        ("nm-int8", lambda q: QuantizedComponents(q.values.float(), q.scales), r"values must be a 2-D torch.int8"),
        ("dense-int8", lambda q: QuantizedComponents(q.values, q.scales.double()), r"scales must be a torch.float32"),
    ],
)
def test_packing_refuses_what_cannot_be_held(layout, change, match):
    """Values out of range, bad scales (zero, inf, overflowing), a width the group does not divide, zero points in
    a sparse format, shapes or dtypes that disagree: a ValueError naming the component and the fix."""
    bits = quant_bits(layout)
    rows, cols, group = SHAPES[bits][0]
    q = quantized(layout, rows, cols, group)
    with pytest.raises(ValueError, match=match):
        to_quantized_components(layout, change(q))


def test_native_ops_refuse_bad_buffers():
    """The C++ operators check their buffers at the boundary (never read out of bounds)."""
    ops = native.native_ops()
    if ops is None:
        pytest.skip("no C++ kernels here")
    q = quantized("bitmask-int4", 8, 64)
    mask, values, offsets, scales = to_quantized_components("bitmask-int4", q)
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="row_offsets must start at 0 and end at most"):
        ops.quant_bitmask_linear(x, mask, values[:1], offsets, scales, None)
    with pytest.raises(RuntimeError, match="scales must be a contiguous float32"):
        ops.quant_bitmask_linear(x, mask, values, offsets, scales.double(), None)
    with pytest.raises(RuntimeError, match="groups of a multiple of 16"):
        ops.quant_bitmask_linear(x, mask, values, offsets, torch.ones(8, 8), None)
    dv, ds, dz = to_quantized_components("dense-int4", quantized("dense-int4", 8, 64))
    with pytest.raises(RuntimeError, match="zeros must be a contiguous int8"):
        ops.quant_dense_linear(x, dv, ds, dz[:4], None)


@pytest.mark.parametrize("layout", QUANT_LAYOUTS)
def test_opcheck(layout):
    """torch.library.opcheck: schema, fake kernel, dynamic shapes and the input/bias autograd agree."""
    bits = quant_bits(layout)
    q = quantized(layout, 16, 64, 32, zero_points=layout == "dense-int4")
    x = torch.randn(6, 64, requires_grad=True)
    bias = torch.randn(16, requires_grad=True)
    torch.library.opcheck(QUANT_OPS[layout], (x, *to_quantized_components(layout, q), bias))
    if bits == 8:  # bf16 activations too
        torch.library.opcheck(QUANT_OPS[layout], (x.detach().bfloat16(), *to_quantized_components(layout, q), None))


def test_input_and_bias_gradients():
    """Backward gives F.linear's input and bias gradients on the dequantized weight (float64 reference)."""
    q = quantized("bitmask-int4", 16, 64)
    x = torch.randn(2, 5, 64, requires_grad=True)
    bias = torch.randn(16, requires_grad=True)
    out = QUANT_OPS["bitmask-int4"](x, *to_quantized_components("bitmask-int4", q), bias)
    grads = torch.autograd.grad(out.square().sum(), (x, bias))
    x64, b64 = x.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    weight = dequantize(q.values, q.scales).double()
    ref = torch.autograd.grad(F.linear(x64, weight, b64).square().sum(), (x64, b64))
    torch.testing.assert_close(grads, tuple(g.float() for g in ref), rtol=1e-4, atol=1e-4)


# ---- lowering a graph ----


class TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 48)
        self.fc2 = nn.Linear(48, 32, bias=False)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def masked_graph():
    """A TwoLinear and its captured graph with masks, 2:4 by magnitude on both weights."""
    torch.manual_seed(0)
    model = TwoLinear()
    gm = capture(model, method="symbolic_trace")
    gm = insert_masks(gm, find_weights(gm))
    for name in ("fc1", "fc2"):
        owner = gm.get_submodule(name)
        w = owner.weight.detach()
        scores = w.abs().reshape(w.shape[0], -1, 4)
        keep = torch.zeros_like(scores).scatter_(-1, scores.topk(2, -1).indices, 1.0).reshape(w.shape)
        owner.weight_mask.copy_(keep.to(owner.weight_mask.dtype))
    return model, gm


def test_lower_to_quantized_layouts_matches_dequantized_model(tmp_path):
    """fc1 -> nm-int8 and fc2 -> bitmask-int8 from the caller's quantized weights: the graph calls the quantized
    operators, the dense weights and masks are gone, and it computes F.linear on the dequantized weights; it
    exports with a dynamic batch, round-trips through torch.export.save/load and runs under torch.compile."""
    model, gm = masked_graph()
    q = {}
    for name in ("fc1", "fc2"):
        owner = gm.get_submodule(name)
        q[f"{name}.weight"] = QuantizedComponents(*quantize(owner.weight.detach() * owner.weight_mask, 8))
    lower_sparse(gm, {"fc1.weight": SparseFormat("nm-int8"), "fc2.weight": SparseFormat("bitmask-int8")}, q)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.fx_sparsity.nm_int8_linear.default) == 1
    assert targets.count(torch.ops.fx_sparsity.bitmask_int8_linear.default) == 1
    assert not hasattr(gm.fc1, "weight") and not hasattr(gm.fc1, "weight_mask")
    assert gm.fc1.weight_scales.shape == (48,)

    def reference(x):
        h = torch.relu(F.linear(x, dequantize(q["fc1.weight"].values, q["fc1.weight"].scales), model.fc1.bias))
        return F.linear(h, dequantize(q["fc2.weight"].values, q["fc2.weight"].scales))

    x, other = torch.randn(4, 64), torch.randn(3, 64)
    torch.testing.assert_close(gm(x), reference(x), rtol=1e-5, atol=1e-5)
    ep = torch.export.export(gm, (x,), dynamic_shapes=({0: Dim("batch", min=2, max=1024)},))
    torch.testing.assert_close(ep.module()(other), reference(other), rtol=1e-5, atol=1e-5)
    torch.export.save(ep.run_decompositions(), tmp_path / "q.pt2")
    loaded = torch.export.load(tmp_path / "q.pt2")
    assert torch.equal(loaded.module()(other), ep.module()(other))
    torch.testing.assert_close(torch.compile(gm, fullgraph=True)(x), gm(x))


def test_aot_inductor_package(tmp_path):
    """AOTInductor compiles a program lowered to the float operators fx_sparsity::csr_linear and ::bitmask_linear
    and the quantized nm-int4 and csr-int8, dynamic batch, into a package that loads and computes exactly what
    the lowered module does (and that module what the masked one did, to the quantization). One package for all
    four operators: an AOTInductor compile is a C++ build of the whole program, about 10-15 s on 2 cores."""
    torch.manual_seed(0)
    model = nn.Sequential(*(m for _ in range(3) for m in (nn.Linear(64, 64), nn.ReLU())), nn.Linear(64, 32))
    gm = capture(model, method="symbolic_trace")
    gm = insert_masks(gm, find_weights(gm))
    layouts = {"0.weight": "csr", "2.weight": "bitmask", "4.weight": "nm-int4", "6.weight": "csr-int8"}
    q, weights = {}, []  # weights: what each layer computes with (masked; dequantized where quantized)
    for fqn, layout in layouts.items():
        owner = gm.get_submodule(fqn.removesuffix(".weight"))
        w = owner.weight.detach()
        scores = w.abs().reshape(w.shape[0], -1, 4)  # 2:4 by magnitude: every layout holds it
        keep = torch.zeros_like(scores).scatter_(-1, scores.topk(2, -1).indices, 1.0).reshape(w.shape)
        owner.weight_mask.copy_(keep.to(owner.weight_mask.dtype))
        weights.append(w * keep)
        if layout in QUANT_LAYOUTS:
            q[fqn] = QuantizedComponents(*quantize(w * keep, 4 if layout.endswith("int4") else 8, 32))
            weights[-1] = dequantize(q[fqn].values, q[fqn].scales)
    x, other = torch.randn(4, 64), torch.randn(3, 64)
    lower_sparse(gm, {fqn: SparseFormat(layout) for fqn, layout in layouts.items()}, q)
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert {f"fx_sparsity.{op}_linear.default" for op in ("csr", "bitmask", "nm_int4", "csr_int8")} <= targets
    expected = other
    for i, w in enumerate(weights):
        expected = F.linear(expected, w, model[2 * i].bias)
        expected = torch.relu(expected) if i < 3 else expected
    torch.testing.assert_close(gm(other), expected, rtol=1e-5, atol=1e-5)
    ep = torch.export.export(gm, (x,), dynamic_shapes=({0: Dim("batch", min=2, max=1024)},))
    package = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "q.pt2"))
    assert torch.equal(torch._inductor.aoti_load_package(package)(other), gm(other))


def test_lower_int4_and_dense_int4_with_zero_points():
    """fc1 -> csr-int4 (symmetric, groups of 32), then in a second graph fc1 -> dense-int4 with zero points;
    fc2 (48 inputs: no int4 group divides it) -> dense-int8: outputs equal the dequantized model's."""
    for fc1_layout, zero_points in (("csr-int4", False), ("dense-int4", True)):
        model, gm = masked_graph()
        w1 = gm.fc1.weight.detach() * gm.fc1.weight_mask
        w2 = gm.fc2.weight.detach() * gm.fc2.weight_mask
        q1 = QuantizedComponents(*quantize(w1, 4, 32, zero_points))
        q2 = QuantizedComponents(*quantize(w2, 8))
        lower_sparse(gm, {"fc1.weight": SparseFormat(fc1_layout), "fc2.weight": SparseFormat("dense-int8")},
                     {"fc1.weight": q1, "fc2.weight": q2})
        x = torch.randn(5, 64)
        h = torch.relu(F.linear(x, dequantize(q1.values, q1.scales, q1.zeros), model.fc1.bias))
        torch.testing.assert_close(gm(x), F.linear(h, dequantize(q2.values, q2.scales)), rtol=1e-5, atol=1e-5)


def test_lower_refusals_name_the_layer():
    """A quantized layout with no quantized weight, one of another shape, one keeping an entry the mask prunes,
    or int4 on a width no group divides: a ValueError naming the layer, and the graph is unchanged."""
    _, gm = masked_graph()
    before = [n.format_node() for n in gm.graph.nodes]
    w1 = gm.fc1.weight.detach()
    with pytest.raises(ValueError, match=r"cannot lower fc1.weight to bitmask-int8: no quantized values given"):
        lower_sparse(gm, {"fc1.weight": SparseFormat("bitmask-int8")})
    with pytest.raises(ValueError, match=r"cannot lower fc1.weight to bitmask-int8: its quantized values have shape"):
        lower_sparse(gm, {"fc1.weight": SparseFormat("bitmask-int8")},
                     {"fc1.weight": QuantizedComponents(*quantize(w1[:, :32], 8))})
    with pytest.raises(ValueError, match=r"cannot lower fc1.weight to nm-int8: its quantized values keep \d+ entries "
                                         r"the mask prunes"):
        lower_sparse(gm, {"fc1.weight": SparseFormat("nm-int8")}, {"fc1.weight": QuantizedComponents(*quantize(w1, 8))})
    w2 = gm.fc2.weight.detach() * gm.fc2.weight_mask
    with pytest.raises(ValueError, match=r"cannot lower fc2.weight to bitmask-int4: int4 scales of 2 groups per row "
                                         r"do not split in_features=48"):
        lower_sparse(gm, {"fc2.weight": SparseFormat("bitmask-int4")},
                     {"fc2.weight": QuantizedComponents(w2.to(torch.int8).clamp(-7, 7) * 0, torch.ones(32, 2))})
    with pytest.raises(ValueError, match=r"bitmask-int8 packs quantized values"):
        SparseFormat("bitmask-int8").components(w1)
    assert [n.format_node() for n in gm.graph.nodes] == before
    assert hasattr(gm.fc1, "weight_mask") and not hasattr(gm.fc1, "weight_scales")


def test_unsupported_reason_for_quantized_layouts(monkeypatch):
    """A quantized layout runs on CPU with the C++ kernels built; elsewhere (another device, no kernels) the
    reason says why; nm= applies to the nm layouts only."""
    weight = torch.randn(8, 64)
    if native.native_ops() is not None:
        assert unsupported_reason("bitmask-int8", weight, None) is None
    assert "CPU only" in unsupported_reason("csr-int4", weight.to("meta"), None)
    assert "float32, bfloat16 or float16" in unsupported_reason("dense-int8", weight.double(), None)
    monkeypatch.setenv(native.NO_NATIVE_ENV, "1")
    assert "not available" in unsupported_reason("nm-int4", weight, None)
    assert SparseFormat("nm-int4", nm=(2, 4)).nm == (2, 4)
    with pytest.raises(ValueError, match="nm applies to 'nm', 'nm-int8', 'nm-int4' only"):
        SparseFormat("csr-int8", nm=(2, 4))
