"""``lower`` and ``sparsify_model`` to the quantized layouts: a weight's quantization record, or round-to-nearest
on the grid its backend entry names; refusals naming the layer."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fx_sparsity
from fx_sparsity.deploy import SparseLinear, load_sparse, save_sparse
from fx_sparsity.quantization import dequantize, get_quantization, quantize_weight
from passes.lowering import native_ops

pytestmark = pytest.mark.skipif(native_ops() is None, reason="the quantized layouts need the C++ kernels")


def _mlp(width: int = 256) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, 128), nn.ReLU(), nn.Linear(128, 64)).eval()


def _rtn_reference(model: nn.Module, gm: torch.fx.GraphModule, specs: dict[str, str], x: torch.Tensor) -> torch.Tensor:
    """The MLP computed eagerly in float64 with each Linear's masked weight rounded to nearest on its grid."""
    h = x.double()
    for i, name in enumerate(("0", "2")):
        weight = gm.get_parameter(f"{name}.weight") * gm.get_buffer(f"{name}.weight_mask")
        w = dequantize(quantize_weight(weight, specs[name])).double()
        h = F.linear(h, w, model.get_submodule(name).bias.double())
        h = torch.relu(h) if i == 0 else h
    return h


@pytest.mark.parametrize("backend, sparsifier, specs", [
    ("bitmask-int8", lambda: fx_sparsity.MagnitudeSparsifier(0.5), {"0": "int8", "2": "int8"}),
    ("csr-int8", lambda: fx_sparsity.MagnitudeSparsifier(0.8), {"0": "int8", "2": "int8"}),
    ("dense-int8", lambda: fx_sparsity.MagnitudeSparsifier(0.5), {"0": "int8", "2": "int8"}),
    ("nm-int8", lambda: fx_sparsity.NMSparsifier(2, 4), {"0": "int8", "2": "int8"}),
    ({"0": {"backend": "bitmask-int4", "quantization": "int4-g64"}, "2": "nm-int4"},
     lambda: fx_sparsity.NMSparsifier(2, 4), {"0": "int4-g64", "2": "int4"}),
])
def test_round_to_nearest_without_a_record(backend, sparsifier, specs):
    """Masks without quantization: each layer packs round-to-nearest of its masked weight (int8, or int4 in groups
    of 128 unless the entry says otherwise); the lowered module computes the float64 eager model on those dequantized
    weights within fp32 accumulation error; the records name the layouts."""
    model, x = _mlp(), torch.randn(5, 256)
    s = sparsifier()
    gm = fx_sparsity.prepare(model, sparsifier=s)
    s.step()
    lowered = fx_sparsity.lower(gm, backend)
    layouts = [r.backend for r in fx_sparsity.get_lowering(lowered)]
    assert layouts == ([backend] * 2 if isinstance(backend, str) else ["bitmask-int4", "nm-int4"])
    with torch.no_grad():
        torch.testing.assert_close(lowered(x).double(), _rtn_reference(model, gm, specs, x), rtol=1e-5, atol=1e-5)


def test_a_joint_sparsegpt_record_is_packed_as_it_is(tmp_path):
    """SparseGPT pruned and quantized to int8 in one pass: lower packs the record's values (the prepared module's
    weights are their dequantized values), so the lowered module, the sparse layers of sparsify_model and a compressed
    checkpoint of them all compute the prepared module; the SparseLinear's dense weight is the record's."""
    model, x = _mlp(), torch.randn(5, 256)
    s = fx_sparsity.SparseGPTSparsifier(0.5, quantization="int8")
    gm = fx_sparsity.prepare(model, sparsifier=s)
    fx_sparsity.calibrate(gm, [torch.randn(16, 256) for _ in range(4)], progress_bar=False)
    s.step()
    with torch.no_grad():
        expected = gm(x)
        torch.testing.assert_close(fx_sparsity.lower(gm, "bitmask-int8")(x), expected, rtol=1e-5, atol=1e-5)
        sparse = fx_sparsity.sparsify_model(gm, "bitmask-int8")
        assert isinstance(sparse[0], SparseLinear) and sparse[0].layout == "bitmask-int8"
        assert torch.equal(sparse[0].dense_weight(), dequantize(get_quantization(gm)["0.weight"].quantized))
        torch.testing.assert_close(sparse(x), expected, rtol=1e-5, atol=1e-5)
    with torch.device("meta"):
        skeleton = copy.deepcopy(model)
    loaded = load_sparse(save_sparse(sparse, tmp_path / "ckpt"), model=skeleton)
    with torch.no_grad():
        assert torch.equal(loaded(x), sparse(x))


def test_auto_times_the_quantized_layouts_only_with_a_record():
    """auto on a model with int8 records times the int8 layouts beside the float ones (its notes name them); on the
    same masks without records it never considers them (quantizing changes the numbers)."""
    model, x = _mlp(), torch.randn(1, 256)
    s = fx_sparsity.SparseGPTSparsifier(0.5, quantization="int8")
    gm = fx_sparsity.prepare(model, sparsifier=s)
    fx_sparsity.calibrate(gm, [torch.randn(16, 256) for _ in range(2)], progress_bar=False)
    s.step()
    notes = [r.note for r in fx_sparsity.get_lowering(fx_sparsity.lower(gm, "auto", example_inputs=(x,),
                                                                          repeats=1, progress_bar=False))]
    assert all("bitmask-int8" in n and "dense-int8" in n and "int4" not in n for n in notes), notes
    plain = fx_sparsity.MagnitudeSparsifier(0.5)
    gm = fx_sparsity.prepare(model, sparsifier=plain)
    plain.step()
    notes = [r.note for r in fx_sparsity.get_lowering(fx_sparsity.lower(gm, "auto", example_inputs=(x,),
                                                                          repeats=1, progress_bar=False))]
    assert all("bitmask" in n and "int8" not in n for n in notes), notes


def test_refusals_name_the_layer():
    model = _mlp(width=96)
    s = fx_sparsity.SparseGPTSparsifier(0.5, quantization="int8")
    gm = fx_sparsity.prepare(model, sparsifier=s)
    fx_sparsity.calibrate(gm, [torch.randn(16, 96)], progress_bar=False)
    s.step()
    with pytest.raises(ValueError, match=r"cannot lower 0\.weight to bitmask-int4: its weight was quantized to int8"):
        fx_sparsity.lower(gm, "bitmask-int4")
    plain = fx_sparsity.MagnitudeSparsifier(0.5)
    gm = fx_sparsity.prepare(model, sparsifier=plain)
    plain.step()
    with pytest.raises(ValueError, match=r"cannot lower 0\.weight to bitmask-int4: .*96"):
        fx_sparsity.lower(gm, "bitmask-int4")  # 96 input features: no group of 128
    with pytest.raises(ValueError, match=r"quantization for 0\.weight applies to the quantized backends"):
        fx_sparsity.lower(gm, {"0": {"backend": "bitmask", "quantization": "int8"}})
    with pytest.raises(ValueError, match=r"is 'int8' \(8-bit\) but backend 'nm-int4' holds 4-bit values"):
        fx_sparsity.lower(gm, {"0": {"backend": "nm-int4", "quantization": "int8"}})
