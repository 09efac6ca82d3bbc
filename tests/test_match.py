"""Matching: weights used as x @ W (addmm/mm/matmul, transformers' Conv1D) and the weights left unmatched."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import nn

from helpers import check_against_eager, count_nodes
from passes import SPARSITY_META_KEY, find_weights
from passes.capturing import capture
from passes.lowering import lowering_blocker
from passes.masking import fuse_masks, insert_masks


class Conv1D(nn.Module):
    """transformers' Conv1D: a linear layer whose weight is stored [in, out] and applied with addmm."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class MatmulNet(nn.Module):
    """Every form of x @ W with a parameter W, beside an nn.Linear and a product of two parameters."""

    def __init__(self):
        super().__init__()
        self.c_attn = Conv1D(12, 8)
        self.w_mm = nn.Parameter(torch.randn(12, 8) * 0.2)
        self.w_matmul = nn.Parameter(torch.randn(8, 6) * 0.2)
        self.w_at = nn.Parameter(torch.randn(6, 6) * 0.2)
        self.w_method = nn.Parameter(torch.randn(6, 6) * 0.2)
        self.fc = nn.Linear(6, 4)
        self.lora_a = nn.Parameter(torch.randn(4, 2))
        self.lora_b = nn.Parameter(torch.randn(2, 4))

    def forward(self, x):  # x: [batch, seq, 8]
        h = self.c_attn(x).relu()
        h = torch.mm(h.flatten(0, 1), self.w_mm).view(x.shape[0], -1, 8)
        h = torch.matmul(h, self.w_matmul).tanh()
        h = (h @ self.w_at).matmul(self.w_method)
        return self.fc(h) @ (self.lora_a @ self.lora_b)


class ControlFlowMatmulNet(MatmulNet):
    """MatmulNet with control flow on a shape: captured with torch.export (aten.addmm/mm/matmul)."""

    def forward(self, x):
        if x.shape[0] > 1:
            x = x * 2
        return super().forward(x)


TRANSPOSED = {"c_attn.weight", "w_mm", "w_matmul", "w_at", "w_method"}


@pytest.mark.parametrize("net", [MatmulNet, ControlFlowMatmulNet])
def test_matmul_weights_are_matched_transposed_masked_and_fused(net):
    """MatmulNet (symbolic trace) and its export capture: every x @ W parameter is a transposed linear match,
    nn.Linear is not transposed, the product of two parameters is not matched; masks apply to each form, and
    fuse_masks restores the ops reading the fused weights; lowering is refused with the reason."""
    torch.manual_seed(0)
    model = net().eval()
    x = torch.randn(3, 5, 8)
    gm = capture(model, example_inputs=(x,))
    matches = {m.tensor_fqn: m for m in find_weights(gm)}
    assert set(matches) == TRANSPOSED | {"fc.weight"}
    assert {fqn for fqn, m in matches.items() if m.transposed} == TRANSPOSED
    assert all(matches[fqn].kind == "linear" for fqn in matches)
    assert matches["c_attn.weight"].weight_shape == (8, 12)
    gm = insert_masks(gm, matches.values())
    reference = net().eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for fqn in matches:
            mask = torch.rand(gm.get_buffer(f"{fqn}_mask").shape) > 0.5
            gm.get_buffer(f"{fqn}_mask").copy_(mask)
            reference.get_parameter(fqn).mul_(mask)
    check_against_eager(gm, reference, x)
    for fqn in TRANSPOSED:
        assert "[in, out]" in lowering_blocker(gm, fqn)
    assert lowering_blocker(gm, "fc.weight") is None
    fused = fuse_masks(gm)
    check_against_eager(fused, reference, x)
    assert not [n for n in fused.graph.nodes if SPARSITY_META_KEY in n.meta]
    assert not [name for name, _ in fused.named_buffers() if name.endswith("_mask")]
    assert count_nodes(fused).get(("call_function", operator.mul), 0) == 0


def test_a_weight_used_in_both_layouts_is_not_matched():
    """One parameter used as F.linear(x, W) and as x @ W: no single mask layout fits both, so it is not matched
    (and unmatched_weights says so) rather than masked along the wrong dimension for one of the uses."""

    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return torch.nn.functional.linear(x, self.w) + x @ self.w

    gm = capture(Both())
    assert find_weights(gm) == []


# ---------------------------------------------------------------- weights left dense are reported


def attention(x: torch.Tensor, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor) -> torch.Tensor:
    """Like torchvision's shifted_window_attention: a function taking a Linear's weight, opaque to tracing."""
    return torch.nn.functional.linear(x, qkv_weight, qkv_bias).softmax(-1)


torch.fx.wrap("attention")


class HiddenWeightsNet(nn.Module):
    """Weights fx_sparsity cannot mask in the symbolic trace, each for another reason, beside a matched one."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 8)  # read inside a torch.fx.wrap'ed function
        self.unused = nn.Linear(8, 8)  # never called
        self.block = nn.Sequential(nn.Linear(8, 8))  # kept as a leaf module
        self.scaled = nn.Linear(8, 8)  # its weight is transformed before use
        self.conv1d = Conv1D(8, 8)  # a Linear-like module from outside torch.nn
        self.up = nn.ConvTranspose1d(8, 8, 1)  # transposed convolutions are not sparsified
        self.fc = nn.Linear(8, 8)  # matched

    def forward(self, x):  # x: [batch, 8]
        x = attention(x, self.qkv.weight, self.qkv.bias)
        x = self.block(x)
        x = torch.nn.functional.linear(x, self.scaled.weight * 2)
        x = self.conv1d(x)
        x = self.up(x.unsqueeze(-1)).squeeze(-1)
        return self.fc(x)


def test_unmatched_weights_say_why_and_what_to_do():
    """HiddenWeightsNet traced with block as a leaf: every weight but fc.weight and conv1d.weight is reported, with
    its reason and remedy; captured with method='export', the wrapped function's and the leaf's weights match."""
    from passes import unmatched_weights

    model = HiddenWeightsNet().eval()
    gm = capture(model, leaf_modules=["block"])
    matches = find_weights(gm)
    assert {m.tensor_fqn for m in matches} == {"fc.weight", "conv1d.weight"}
    report = {u.tensor_fqn: u for u in unmatched_weights(model, gm, matches)}
    assert list(report) == ["qkv.weight", "unused.weight", "block.0.weight", "scaled.weight", "up.weight"]
    assert "passed to attention" in report["qkv.weight"].reason and "torch.fx.wrap" in report["qkv.weight"].reason
    assert "method='export'" in report["qkv.weight"].remedy
    assert "never reads it" in report["unused.weight"].reason
    assert "'block' (Sequential)" in report["block.0.weight"].reason and "leaf_modules" in report["block.0.weight"].remedy
    assert "used by mul" in report["scaled.weight"].reason
    assert "transposed convolution" in report["up.weight"].reason

    x = torch.randn(3, 8)
    exported = capture(model, example_inputs=(x,), method="export")
    matches = find_weights(exported)
    assert {"qkv.weight", "block.0.weight", "fc.weight", "conv1d.weight"} <= {m.tensor_fqn for m in matches}
    report = {u.tensor_fqn for u in unmatched_weights(model, exported, matches)}
    assert report == {"unused.weight", "scaled.weight", "up.weight"}
    torch.testing.assert_close(exported(x), model(x))


def test_unmatched_weights_after_masking_and_for_a_weight_in_both_layouts():
    """After insert_masks, find_masked_weights covers the masked weights; an unselected Linear is 'not selected';
    a weight used as F.linear(x, W) and as x @ W is reported with that reason."""
    from passes import unmatched_weights
    from passes.matching import find_masked_weights

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)

        def forward(self, x):
            return self.b(self.a(x)) + x @ self.a.weight

    model = Net()
    gm = capture(model)
    assert find_weights(gm)[0].tensor_fqn == "b.weight"
    gm = insert_masks(gm, find_weights(gm))
    report = unmatched_weights(model, gm, find_masked_weights(gm))
    assert [(u.tensor_fqn, "both" in u.reason) for u in report] == [("a.weight", True)]
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    gm = capture(model)
    report = unmatched_weights(model, gm, find_weights(gm)[:1])
    assert [(u.tensor_fqn, u.reason) for u in report] == [("1.weight", "not selected")]


def test_method_argument():
    """method='symbolic_trace' never falls back to export; method='export' needs example_inputs; bad values fail."""
    from helpers import ControlFlowNet
    from passes import CaptureError

    with pytest.raises(CaptureError, match="symbolic tracing of ControlFlowNet failed"):
        capture(ControlFlowNet(), example_inputs=(torch.randn(3, 6),), method="symbolic_trace")
    with pytest.raises(ValueError, match="method='export' needs example_inputs"):
        capture(ControlFlowNet(), method="export")
    with pytest.raises(ValueError, match="method must be"):
        capture(ControlFlowNet(), method="fx")


@pytest.mark.parametrize("method", ["symbolic_trace", "export"])
def test_a_parametrized_weight_is_reported_not_a_key_error(method):
    """A Linear under torch.nn.utils.parametrizations.weight_norm: its weight is computed on each access, so there is
    no stored tensor to mask. find_weights failed with a KeyError on the computed tensor's id (symbolic tracing);
    now it matches only the plain Linear, unmatched_weights names the parametrized one with the parametrization and
    the remedy (remove it, or leave the layer out), and a config naming it says so. The prepared module still
    computes the model."""
    import warnings

    from fx_sparsity import get_sparsifier, get_unmatched, prepare
    from passes import unmatched_weights

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    torch.nn.utils.parametrizations.weight_norm(model[0])
    x = torch.randn(3, 4)
    gm = capture(model, example_inputs=(x,), method=method)
    matches = find_weights(gm)
    assert [m.tensor_fqn for m in matches] == ["2.weight"]
    (report,) = unmatched_weights(model, gm, matches)
    assert report.tensor_fqn == "0.weight"
    assert "parametrization _WeightNorm" in report.reason and "0.parametrizations.weight.original0" in report.reason
    assert "remove_parametrizations(model.get_submodule('0'), 'weight')" in report.remedy
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        prepared = prepare(model, example_inputs=(x,), capture_method=method)
    assert [g["tensor_fqn"] for g in get_sparsifier(prepared).groups] == ["2.weight"]
    assert [u.tensor_fqn for u in get_unmatched(prepared)] == ["0.weight"]
    torch.testing.assert_close(prepared(x), model(x))
    for key in ("0", "0.weight", "0.parametrizations.weight.original0"):
        with pytest.raises(ValueError, match=r"'0' is a ParametrizedLinear whose weight the parametrization _WeightNorm "
                                             r"computes on each access.*or select only unparametrized layers"):
            prepare(model, [key], example_inputs=(x,), capture_method=method)
