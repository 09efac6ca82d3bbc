"""The pre-export contract: lowered modules pass torch.export (dynamic batch), run_decompositions,
save/load, torch.compile(fullgraph=True) and, fused, torch.jit.trace, with outputs of the prepared module.
(AOTInductor packages of the float and quantized operators: tests/test_quant_kernels.py, one build for all.)"""

from __future__ import annotations

import pytest
import torch
from torch.export import Dim

from fx_sparsity import WeightNormSparsifier, get_sparsifier, prepare
from fx_sparsity.lowering import lower
from helpers import LinearNet, PointwiseConvNet

BACKENDS = ["fuse", "csr", "bsr", "bitmask", "nm"] + (["semi_structured"] if torch.cuda.is_available() else [])
SPARSE_OPS = {
    "csr": torch.ops.fx_sparsity.csr_linear.default,
    "bsr": torch.ops.fx_sparsity.bsr_linear.default,
    "semi_structured": torch.ops.fx_sparsity.semi_structured_linear.default,
    "bitmask": torch.ops.fx_sparsity.bitmask_linear.default,
    "nm": torch.ops.fx_sparsity.nm_linear.default,
}


def lowered_model(name: str, backend: str, dtype=torch.float32):
    """(prepared, lowered, example input, other-batch input) for a LinearNet (with/without bias) or PointwiseConvNet."""
    torch.manual_seed(0)
    device = "cuda" if backend == "semi_structured" else "cpu"
    if name == "conv":
        model, shape = PointwiseConvNet(), (4, 16, 8, 8)
    else:
        model, shape = LinearNet(bias=name == "linear"), (4, 64)
    model = model.to(device, torch.float16 if backend == "semi_structured" else dtype)
    if backend in ("semi_structured", "nm"):
        sparsifier = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
    else:
        sparsifier = WeightNormSparsifier(sparsity_level=0.75, sparse_block_shape=(16, 16))
    gm = prepare(model, sparsifier=sparsifier)
    get_sparsifier(gm).step()
    config = backend if name != "conv" or backend != "bsr" else {"head": "fuse", "*": "bsr"}
    x = torch.randn(shape, dtype=next(model.parameters()).dtype, device=device)
    other = torch.randn((3, *shape[1:]), dtype=x.dtype, device=device)
    return gm, lower(gm, config), x, other


def sparse_op_count(graph, backend: str) -> int:
    return sum(n.target is SPARSE_OPS.get(backend) for n in graph.nodes)


@pytest.mark.parametrize("name", ["linear", "linear_nobias", "conv"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_export_decompose_save_load(backend, name, tmp_path):
    """export with a dynamic batch, run_decompositions (the custom op survives), save/load round trip:
    outputs equal the prepared module's on another batch size, and equal each other after the round trip."""
    if backend == "semi_structured" and name == "conv":
        pytest.skip("the conv model's shapes are below the 2:4 kernel minimums")
    gm, lowered, x, other = lowered_model(name, backend)
    ep = torch.export.export(lowered, (x,), dynamic_shapes=({0: Dim("batch", min=2, max=1024)},))
    tol = {"rtol": 1e-2, "atol": 1e-2} if backend == "semi_structured" else {}
    torch.testing.assert_close(ep.module()(other), gm(other), **tol)
    if backend != "fuse":
        assert sparse_op_count(ep.graph, backend) > 0
    decomposed = ep.run_decompositions()
    assert sparse_op_count(decomposed.graph, backend) == sparse_op_count(ep.graph, backend)
    torch.testing.assert_close(decomposed.module()(other), gm(other), **tol)
    path = tmp_path / "lowered.pt2"
    torch.export.save(decomposed, path)
    loaded = torch.export.load(path)
    assert torch.equal(loaded.module()(other), decomposed.module()(other))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    """torch.compile(fullgraph=True) (inductor) runs the lowered module with the prepared module's outputs."""
    gm, lowered, x, other = lowered_model("linear", backend)
    compiled = torch.compile(lowered, fullgraph=True)
    tol = {"rtol": 1e-2, "atol": 1e-2} if backend == "semi_structured" else {}
    torch.testing.assert_close(compiled(x), gm(x), **tol)


@pytest.mark.parametrize("name", ["linear", "conv"])
def test_jit_trace_fused(name):
    """The fused form traces with torch.jit.trace and matches the prepared module on another batch."""
    gm, lowered, x, other = lowered_model(name, "fuse")
    traced = torch.jit.trace(lowered, (x,))
    torch.testing.assert_close(traced(other), gm(other))


def test_bfloat16_fused_export():
    """bf16: the fused module exports, round-trips through save/load and matches the prepared module exactly."""
    gm, lowered, x, other = lowered_model("linear", "fuse", dtype=torch.bfloat16)
    ep = torch.export.export(lowered, (x,), dynamic_shapes=({0: Dim("batch", min=2, max=1024)},))
    assert torch.equal(ep.module()(other), gm(other))


@pytest.mark.parametrize("backend", ["bitmask", "nm", "csr"])
def test_bfloat16_kernel_export(backend, tmp_path):
    """bf16 through our kernels: lowered, exported with a dynamic batch, saved and loaded, it matches the
    prepared module up to bf16 rounding (fp32 accumulation in the kernel, bf16 in the dense op)."""
    gm, lowered, x, other = lowered_model("linear", backend, dtype=torch.bfloat16)
    assert sparse_op_count(lowered.graph, backend) > 0
    ep = torch.export.export(lowered, (x,), dynamic_shapes=({0: Dim("batch", min=2, max=1024)},))
    path = tmp_path / "lowered.pt2"
    torch.export.save(ep, path)
    torch.testing.assert_close(torch.export.load(path).module()(other), gm(other), rtol=2e-2, atol=2e-2)


def test_nm_refuses_a_weight_that_is_not_nm():
    """Asking for nm on an unstructured weight is a ValueError naming the layer, never wrong numbers."""
    gm, _, _, _ = lowered_model("linear", "fuse")
    with pytest.raises(ValueError, match=r"cannot lower fc1.weight to nm: the weight is not N:M sparse"):
        lower(gm, "nm")


@pytest.mark.parametrize("backend", ["bitmask", "csr"])
def test_channels_last_conv_input(backend):
    """1x1 convs lowered to our kernels take a channels-last input and match the prepared module."""
    gm, lowered, x, other = lowered_model("conv", backend)
    x_last = x.to(memory_format=torch.channels_last)
    assert not x_last.is_contiguous()
    torch.testing.assert_close(lowered(x_last), gm(x))
