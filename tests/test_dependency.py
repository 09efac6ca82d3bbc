"""passes.dependency: which channels must shrink together, on residual, concat/split, grouped and depthwise,
flatten, norm, embedding and shared-layer graphs; what is frozen and why; nothing rewritten."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fx_sparsity.structured import ChannelPruner
from helpers import TinyMobileNet, TinyResNet, count_nodes, shrunk_copy, snapshot
from passes import Member, find_channel_groups, get_capture
from passes.capturing import capture


def _groups(model: nn.Module, *inputs: torch.Tensor):
    gm = capture(model)
    return gm, find_channel_groups(gm, inputs)


def _layers(group, kind: str) -> set[str]:
    return {m.target for m in group.members if m.kind == kind}


def _group_of(groups, producer: str):
    return next(g for g in groups if producer in _layers(g, "producer"))


class Concat(nn.Module):
    """Two convs concatenated into a 1x1 conv, then a split back at the same boundary."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 6, 1)
        self.mix = nn.Conv2d(14, 14, 1)
        self.head_a, self.head_b = nn.Conv2d(8, 4, 1), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = self.mix(torch.relu(torch.cat([self.a(x), self.b(x)], dim=1)))
        ya, yb = torch.split(y, [8, 6], dim=1)
        return self.head_a(ya) + self.head_b(yb)


class FlattenNet(nn.Module):
    """conv -> BatchNorm -> flatten of [C, 3, 3] -> Linear (channel x spatial blocks), a layer scale."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4)
        self.scale = nn.Parameter(torch.rand(4, 1, 1) + 0.5)
        self.fc, self.out = nn.Linear(36, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x))) * self.scale
        return self.out(torch.tanh(self.fc(h.flatten(1))))


def test_linear_chain_hidden_channels_prunable_output_frozen():
    """Linear -> ReLU -> Linear: the hidden channels are one group; the model output is frozen, with its reason."""
    _, groups = _groups(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(2, 4))
    assert [(g.size, g.prunable) for g in groups] == [(8, True), (2, False)]
    assert _layers(groups[0], "producer") == {"0.weight"} and _layers(groups[0], "consumer") == {"2.weight"}
    assert _layers(groups[0], "param") == {"0.bias"}
    assert "model output" in groups[1].frozen_reason


def test_residual_streams_are_one_group_each():
    """TinyResNet: stem + both layer1 blocks' conv2 + the layer2 shortcut form residual groups; the inner conv1 of
    each block is its own group; 7 groups, only fc's output frozen."""
    model = TinyResNet().eval()
    gm, groups = _groups(model, torch.randn(2, 3, 16, 16))
    assert len(groups) == 7 and [g.prunable for g in groups].count(False) == 1
    stream = _group_of(groups, "stem.0.weight")
    assert _layers(stream, "producer") == {"stem.0.weight", "layer1.0.conv2.weight", "layer1.1.conv2.weight"}
    inputs = {"layer1.0.conv1.weight", "layer2.0.conv1.weight", "layer2.0.downsample.0.weight"}
    assert inputs <= _layers(stream, "consumer")
    assert {"stem.1", "layer1.0.bn2", "layer1.1.bn2"} <= _layers(stream, "module")
    stream2 = _group_of(groups, "layer2.0.downsample.0.weight")
    outputs = {"layer2.0.downsample.0.weight", "layer2.0.conv2.weight", "layer2.1.conv2.weight"}
    assert _layers(stream2, "producer") == outputs
    assert "fc.weight" in _layers(stream2, "consumer")


def test_analysis_rewrites_nothing_and_leaves_the_model_alone():
    """The pass is analysis only: same graph node counts, same BatchNorm statistics and training flags."""
    model = TinyResNet().train()
    before = snapshot(model)
    gm = capture(model)
    counts = count_nodes(gm)
    find_channel_groups(gm, torch.randn(2, 3, 16, 16))
    assert count_nodes(gm) == counts and gm.training
    after = snapshot(model)
    for key, value in before["state"].items():
        torch.testing.assert_close(after["state"][key], value, rtol=0, atol=0)


def test_concat_offsets_and_split_at_the_same_boundary():
    """cat([a(8), b(6)]) -> mix: consumer members at offsets 0 and 8; splitting mix's output at 8 cuts mix's
    channels into two groups (rows 0-7 read by head_a, rows 8-13 by head_b), each with its own size in the split's
    list of sizes; a residual sum of the two heads does not touch them."""
    _, groups = _groups(Concat(), torch.randn(2, 3, 5, 5))
    a, b = (_group_of(groups, f"{n}.weight") for n in ("a", "b"))
    assert [(m.target, m.offset) for m in a.consumers] == [("mix.weight", 0)]
    assert [(m.target, m.offset) for m in b.consumers] == [("mix.weight", 8)]
    assert a.prunable and b.prunable
    pieces = [g for g in groups if "mix.weight" in _layers(g, "producer")]
    assert [(g.size, g.prunable) for g in pieces] == [(8, True), (6, True)]
    assert [[(m.offset, m.dim) for m in g.producers] for g in pieces] == [[(0, 0)], [(8, 0)]]
    assert [_layers(g, "consumer") for g in pieces] == [{"head_a.weight"}, {"head_b.weight"}]
    literals = [[(m.target, m.dim, m.offset) for m in g.members if m.kind == "literal"] for g in pieces]
    assert literals == [[("split", 1, 0)], [("split", 1, 1)]]


def test_split_along_concat_boundaries_is_followed():
    """cat([a, b]) split back at the boundary: each piece keeps its own source group."""

    class CatSplit(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 6, 1), nn.Conv2d(6, 2, 1)

        def forward(self, x):
            ya, yb = torch.cat([self.a(x), self.b(x)], 1).split([8, 6], dim=1)
            return self.c(yb) + ya.mean(1, keepdim=True)

    _, groups = _groups(CatSplit(), torch.randn(2, 3, 4, 4))
    assert _group_of(groups, "b.weight").prunable
    assert [m.target for m in _group_of(groups, "b.weight").consumers] == ["c.weight"]
    assert "reduces over the channel axis" in _group_of(groups, "a.weight").frozen_reason


def test_depthwise_joins_its_input_group_and_grouped_conv_sets_blocks():
    """TinyMobileNet: expand and depthwise convs share a group (with the SE expand, multiplied in); the grouped conv
    (groups=4) makes its input and output groups 4 equal blocks."""
    _, groups = _groups(TinyMobileNet().eval(), torch.randn(2, 3, 16, 16))
    hidden = _group_of(groups, "blocks.0.expand.0.weight")
    assert _layers(hidden, "producer") == {
        "blocks.0.expand.0.weight", "blocks.0.depthwise.0.weight", "blocks.0.se_expand.weight"
    }
    assert _layers(hidden, "consumer") == {"blocks.0.se_reduce.weight", "blocks.0.project.0.weight"}
    assert _group_of(groups, "stem.0.weight").blocks == 4
    assert _group_of(groups, "grouped.weight").blocks == 4
    assert [g.prunable for g in groups].count(False) == 1


def test_flatten_into_linear_has_spatial_blocks_and_layer_scale_is_sliced():
    """conv(4 ch) -> flatten of 3x3 -> Linear(36): inner = 9; the [4, 1, 1] layer scale is a param member."""
    _, groups = _groups(FlattenNet().eval(), torch.randn(2, 2, 5, 5))
    conv = _group_of(groups, "conv.weight")
    assert [(m.target, m.dim, m.inner) for m in conv.consumers] == [("fc.weight", 1, 9)]
    assert {"conv.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "scale"} <= _layers(conv, "param")


@pytest.mark.parametrize(
    "model, inputs, reason",
    [
        (nn.Sequential(nn.Linear(4, 8), nn.LogSigmoid(), nn.Linear(8, 2)), (torch.randn(2, 4),), "does not know"),
        (nn.Sequential(nn.Linear(4, 8), nn.Softmax(-1), nn.Linear(8, 2)), (torch.randn(2, 4),), "normalizes across"),
        (nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(0)), (torch.randn(2, 3, 2, 2),), "reshapes the channel axis"),
        (nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()), (torch.randn(2, 3, 2, 2),), "model output"),
    ],
)
def test_unknown_ops_reshapes_and_outputs_freeze(model, inputs, reason):
    """An op the pass does not know, a softmax over the channels, a flatten that merges the batch into the channels,
    a model output:
    the channels are frozen, with the reason."""
    _, groups = _groups(model, *inputs)
    assert not groups[0].prunable and reason in groups[0].frozen_reason


def test_literal_reshape_is_recorded_and_untracked_operands_freeze():
    """view(n, 16) with a literal channel count is followed (a literal member: 4 per channel of a 2x2 map, to be
    rewritten by shrink); a concat with the raw input and x + input are frozen with reasons."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
            self.fc, self.mix = nn.Linear(16, 2), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            y = self.fc(self.a(x).view(x.shape[0], 16))
            z = self.mix(torch.cat([self.b(x), x], 1))
            return y, z, self.c(x) + x

    _, groups = _groups(Net(), torch.randn(2, 4, 2, 2))
    a = _group_of(groups, "a.weight")
    assert a.prunable and [m for m in a.members if m.kind == "literal"] == [Member("view", "literal", 2, -1, 4)]
    assert _group_of(groups, "b.weight").prunable
    assert any(g.frozen_reason and "concatenates it with x" in g.frozen_reason for g in groups)
    assert "combines it with x" in _group_of(groups, "c.weight").frozen_reason


def test_shared_layer_unites_groups_and_norms_and_embeddings():
    """A Linear called twice is one producer (its two outputs one group); LayerNorm over the channels is listed as
    inexact; GroupNorm sets blocks; an Embedding produces its columns."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.shared, self.ln = nn.Embedding(10, 8), nn.Linear(8, 8), nn.LayerNorm(8)
            self.fc = nn.Linear(8, 3)
            self.conv, self.gn, self.head = nn.Conv2d(3, 8, 1), nn.GroupNorm(2, 8), nn.Conv2d(8, 1, 1)

        def forward(self, tokens, image):
            h = self.emb(tokens)
            h = self.ln(torch.relu(self.shared(h)) + self.shared(torch.tanh(h)))
            return self.fc(h), self.head(self.gn(self.conv(image)))

    _, groups = _groups(Net(), torch.randint(0, 10, (2, 5)), torch.randn(2, 3, 4, 4))
    emb = _group_of(groups, "emb.weight")
    assert [(m.target, m.dim) for m in emb.producers] == [("emb.weight", 1)]
    shared = _group_of(groups, "shared.weight")
    assert [m.target for m in shared.producers] == ["shared.weight"]
    assert shared.inexact and "LayerNorm ln" in shared.inexact[0]
    assert _group_of(groups, "conv.weight").blocks == 2


def test_masked_form_gives_the_same_groups():
    """The graph prepare() returns (F.conv2d on mul(weight, mask)) yields the groups of the plain capture."""
    model, x = TinyMobileNet().eval(), torch.randn(2, 3, 16, 16)
    pruner = ChannelPruner()
    gm = pruner.prepare(model, example_inputs=x)
    assert find_channel_groups(gm, x) == find_channel_groups(capture(model), x)


@pytest.mark.parametrize("make", [TinyResNet, TinyMobileNet, FlattenNet, Concat])
def test_pruning_nothing_equals_the_original_exactly(make):
    """Shrinking (plan_shrink, remove_channels) with nothing removed reproduces the model bit for bit."""
    model = make().eval()
    x = torch.randn(2, 2 if make is FlattenNet else 3, 16, 16) if make is not FlattenNet else torch.randn(2, 2, 5, 5)
    gm, groups = _groups(model, x)
    small, report = shrunk_copy(gm, groups, {}, x)
    torch.testing.assert_close(small(x), model(x), rtol=0, atol=0)
    assert report.params_after == report.params_before and report.macs_after == report.macs_before


def test_torchvision_resnet18_groups():
    """resnet18: 4 residual streams + 8 inner block convs are prunable; only fc's output (the model output) is
    frozen."""
    models = pytest.importorskip("torchvision.models")
    _, groups = _groups(models.resnet18().eval(), torch.randn(1, 3, 32, 32))
    assert len(groups) == 13 and [g.frozen_reason for g in groups if not g.prunable] == [
        "reaches the model output through fc"
    ]


class Attention(nn.Module):
    """Llama-style attention written the transformers way: q/k/v/o Linears, views with -1 heads, key/value heads
    repeated for grouped-query attention (repeat_kv), or F.scaled_dot_product_attention(enable_gqa=True)."""

    def __init__(self, heads: int = 4, kv_heads: int = 2, head_dim: int = 8, hidden: int = 32, sdpa: bool = False):
        super().__init__()
        self.q_proj = nn.Linear(hidden, heads * head_dim)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        self.n_rep, self.head_dim, self.sdpa = heads // kv_heads, head_dim, sdpa

    @staticmethod
    def repeat_kv(h: torch.Tensor, n_rep: int) -> torch.Tensor:
        batch, kv, length, head_dim = h.shape
        repeated = h[:, :, None, :, :].expand(batch, kv, n_rep, length, head_dim)
        return repeated.reshape(batch, kv * n_rep, length, head_dim)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        if self.sdpa:
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        else:
            k, v = self.repeat_kv(k, self.n_rep), self.repeat_kv(v, self.n_rep)
            out = torch.softmax(q @ k.transpose(2, 3) * self.head_dim**-0.5, dim=-1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    """Pre-norm transformer block: attention and a SiLU MLP on a residual stream."""

    def __init__(self, **attention) -> None:
        super().__init__()
        self.norm, self.attn = nn.LayerNorm(32), Attention(**attention)
        self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x):
        x = x + self.attn(self.norm(x))
        return x + self.down(F.silu(self.up(x)))


@pytest.mark.parametrize("sdpa", [False, True])
@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (4, 4), (8, 2)])
def test_attention_heads_are_units_and_kv_heads_carry_their_query_groups(heads, kv_heads, sdpa):
    """One group of kv_heads units: q rows in blocks of head_dim * (heads / kv_heads) (a KV head's query group),
    k/v rows in blocks of head_dim, o columns like q; the MLP hidden channels another group; the residual stream
    (the model input) frozen."""
    _, groups = _groups(Block(heads=heads, kv_heads=kv_heads, sdpa=sdpa).eval(), torch.randn(2, 5, 32))
    attn = _group_of(groups, "attn.q_proj.weight")
    assert attn.prunable and attn.size == kv_heads
    n_rep = heads // kv_heads
    inner = {(m.target, m.kind): m.inner for m in attn.members if m.kind != "module"}
    assert inner == {
        ("attn.q_proj.weight", "producer"): 8 * n_rep, ("attn.q_proj.bias", "param"): 8 * n_rep,
        ("attn.k_proj.weight", "producer"): 8, ("attn.k_proj.bias", "param"): 8,
        ("attn.v_proj.weight", "producer"): 8, ("attn.v_proj.bias", "param"): 8,
        ("attn.o_proj.weight", "consumer"): 8 * n_rep,
    }
    assert _group_of(groups, "up.weight").prunable and not _group_of(groups, "down.weight").prunable


def test_literal_head_count_is_recorded_and_fused_multihead_attention_heads_are_units():
    """A view with a literal head count is followed (literal members for shrink to rewrite); nn.MultiheadAttention
    captured through torch.export (need_weights=False) has one group of 4 heads: rows of each q/k/v third of
    in_proj in blocks of head_dim, out_proj's columns; with need_weights=True it is refused with the reason, while
    the MLP beside it stays prunable."""

    class Literal(Attention):
        def forward(self, x):
            q = self.q_proj(x).view(2, 5, 4, 8).transpose(1, 2)
            return self.o_proj(torch.softmax(q @ q.transpose(2, 3), -1).matmul(q).transpose(1, 2).reshape(2, 5, 32))

    _, groups = _groups(Literal(kv_heads=4), torch.randn(2, 5, 32))
    heads = _group_of(groups, "q_proj.weight")
    literals = {(m.target, m.dim, m.offset, m.inner) for m in heads.members if m.kind == "literal"}
    assert heads.prunable and heads.size == 4 and literals == {("view", 3, -1, 1), ("reshape", 3, -1, 8)}

    class WithMHA(nn.Module):
        def __init__(self, need_weights: bool) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
            self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
            self.need_weights = need_weights

        def forward(self, x):
            h = x + self.attn(x, x, x, need_weights=self.need_weights)[0]
            return h + self.fc2(torch.relu(self.fc1(h)))

    x = torch.randn(2, 5, 16)
    gm = capture(WithMHA(False).eval(), example_inputs=(x,))
    groups = find_channel_groups(gm, x)
    assert get_capture(gm).method == "export"
    heads = _group_of(groups, "attn.in_proj_weight")
    assert heads.prunable and heads.size == 4
    assert [(m.target, m.kind, m.dim, m.offset, m.inner) for m in heads.members if m.kind != "literal"] == [
        ("attn.in_proj_weight", "producer", 0, 0, 4), ("attn.in_proj_bias", "param", 0, 0, 4),
        ("attn.in_proj_weight", "producer", 0, 16, 4), ("attn.in_proj_bias", "param", 0, 16, 4),
        ("attn.in_proj_weight", "producer", 0, 32, 4), ("attn.in_proj_bias", "param", 0, 32, 4),
        ("attn.out_proj.weight", "consumer", 1, 0, 4),
    ]
    gm = capture(WithMHA(True).eval(), example_inputs=(x,))
    groups = find_channel_groups(gm, x)
    assert "fused q/k/v projection in a form the pass does not follow" in _group_of(
        groups, "attn.in_proj_weight"
    ).frozen_reason
    assert _group_of(groups, "fc1.weight").prunable
