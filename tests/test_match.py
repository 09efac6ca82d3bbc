"""Matching: weights used as x @ W (addmm/mm/matmul, transformers' Conv1D) and the weights left unmatched."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import nn

from passes import SPARSITY_META_KEY, capture, find_weights, fuse_masks, insert_masks, lowering_blocker

from helpers import check_against_eager, count_nodes


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
        self.fc = nn.Linear(6, 4)
        self.lora_a = nn.Parameter(torch.randn(4, 2))
        self.lora_b = nn.Parameter(torch.randn(2, 4))

    def forward(self, x):  # x: [batch, seq, 8]
        h = self.c_attn(x).relu()
        h = torch.mm(h.flatten(0, 1), self.w_mm).view(x.shape[0], -1, 8)
        h = torch.matmul(h, self.w_matmul).tanh()
        h = h @ self.w_at
        return self.fc(h) @ (self.lora_a @ self.lora_b)


class ControlFlowMatmulNet(MatmulNet):
    """MatmulNet with control flow on a shape: captured with torch.export (aten.addmm/mm/matmul)."""

    def forward(self, x):
        if x.shape[0] > 1:
            x = x * 2
        return super().forward(x)


TRANSPOSED = {"c_attn.weight", "w_mm", "w_matmul", "w_at"}


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
            mask = (torch.rand_like(gm.get_buffer(f"{fqn}_mask")) > 0.5).float()
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
