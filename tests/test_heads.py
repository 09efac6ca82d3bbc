"""Attention heads as structured-pruning units through torch.export: transformers BERT and Llama (grouped-query
attention) built from small configs, literal view/expand/reshape sizes rewritten in the shrunk graph,
nn.MultiheadAttention's fused in_proj, the counting rule for heads, and bad requests."""

from __future__ import annotations

import io
import math
import operator

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from fx_sparsity import shrink_report
from fx_sparsity.structured import ChannelPruner, count_to_remove, shrink
from helpers import count_nodes, shrunk_copy, snapshot
from passes import find_channel_groups, get_capture
from passes.capturing import capture

transformers = pytest.importorskip("transformers")


def tiny_llama(heads: int = 8, kv_heads: int = 2, layers: int = 2) -> nn.Module:
    """A randomly initialised Llama (hidden 64, head_dim 8) with grouped-query attention, no KV cache."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=128, max_position_embeddings=32, use_cache=False,
    )
    return transformers.LlamaModel(config).eval()


def tiny_bert(layers: int = 2) -> nn.Module:
    """A randomly initialised BERT (hidden 64, 4 heads of 16, intermediate 128)."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=32,
    )
    return transformers.BertModel(config).eval()


def _tokens() -> torch.Tensor:
    return torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(1))


def _hidden(out) -> torch.Tensor:
    return out[0] if not isinstance(out, torch.Tensor) else out


def _prune(model: nn.Module, x, ratio: float, **kwargs):
    pruner = ChannelPruner(sparsity_level=ratio, **kwargs)
    gm = pruner.prepare(model, example_inputs=(x,))
    pruner.step()
    return pruner, gm, shrink(gm)


def _group_of(groups, producer: str):
    return next(g for g in groups if producer in {m.target for m in g.producers})


def _literals(group) -> set[tuple[str, int]]:
    return {(m.target, m.inner) for m in group.members if m.kind == "literal"}


# ------------------------------------------------------------------ transformers Llama (GQA) and BERT via export
@pytest.mark.parametrize("kv_heads", [2, 4])
def test_llama_gqa_groups_follow_literal_repeat_kv_sizes(kv_heads):
    """Exported Llama, 8 query heads on kv_heads KV heads: one group of kv_heads units per layer holding q/k/v rows
    and o columns; repeat_kv's literal expand [1, kv, n_rep, s, d] and reshape [1, 8, s, d] are recorded (1 and
    n_rep per KV head); the rotary slices of the head dim are followed; the residual stream stays frozen."""
    model, x = tiny_llama(kv_heads=kv_heads), _tokens()
    gm = capture(model, example_inputs=(x,))
    groups = find_channel_groups(gm, (x,))
    assert get_capture(gm).method == "export"
    n_rep = 8 // kv_heads
    for layer in range(2):
        attn = _group_of(groups, f"layers.{layer}.self_attn.q_proj.weight")
        assert attn.prunable and attn.size == kv_heads
        inner = {(m.target.split(".")[-2], m.kind): m.inner for m in attn.members if m.kind in ("producer", "consumer")}
        assert inner == {("q_proj", "producer"): 8 * n_rep, ("k_proj", "producer"): 8, ("v_proj", "producer"): 8,
                         ("o_proj", "consumer"): 8 * n_rep}
        if n_rep > 1:
            assert sorted(i for _, i in _literals(attn)) == [1, 1, n_rep, n_rep]
    assert not _group_of(groups, "layers.0.self_attn.o_proj.weight").prunable
    assert _group_of(groups, "layers.0.mlp.up_proj.weight").prunable


@pytest.mark.parametrize("ratio, kept_kv", [(0.5, 1), (0.3, 2)])
def test_llama_shrinks_kv_heads_with_their_query_groups_exactly(ratio, kept_kv):
    """Llama, 8 heads on 2 KV heads: ratio 0.5 removes 1 KV head and its 4 query heads (0.3 of 2 removes none:
    floor); q/k/v/o and MLP shapes shrink, the hidden size and output shape stay, the shrunk module equals the
    masked one and exports; the user's model is untouched."""
    model, x = tiny_llama(), _tokens()
    before = snapshot(model)
    pruner, gm, small = _prune(model, x, ratio, mask_consumers=True)
    report = shrink_report(small)
    assert report.exact
    q = small.get_parameter("layers.0.self_attn.q_proj.weight")
    k = small.get_parameter("layers.1.self_attn.k_proj.weight")
    o = small.get_parameter("layers.0.self_attn.o_proj.weight")
    assert tuple(q.shape) == (kept_kv * 4 * 8, 64) and tuple(k.shape) == (kept_kv * 8, 64)
    assert tuple(o.shape) == (64, kept_kv * 4 * 8)
    up = small.get_parameter("layers.0.mlp.up_proj.weight")
    assert up.shape[0] == 128 - math.floor(ratio * 128)
    with torch.no_grad():
        expected = _hidden(gm(x))
        assert _hidden(small(x)).shape == _hidden(model(x)).shape == (2, 6, 64)
        torch.testing.assert_close(_hidden(small(x)), expected)
        torch.testing.assert_close(_hidden(torch.export.export(small, (x,)).module()(x)), expected)
    after = snapshot(model)
    for key, value in before["state"].items():
        torch.testing.assert_close(after["state"][key], value, rtol=0, atol=0)


def test_bert_heads_and_intermediate_shrink_hidden_size_kept(tmp_path):
    """BERT (4 heads of 16): ratio 0.3 removes floor(0.3 * 4) = 1 head per layer (Torch-Pruning would remove 2)
    and 38 of 128 intermediate channels; the hidden size (64) and output shapes are kept; shrunk == masked;
    the shrunk module exports, saves and loads."""
    model, x = tiny_bert(), _tokens()
    pruner, gm, small = _prune(model, x, 0.3, mask_consumers=True)
    for layer in range(2):
        prefix = f"encoder.layer.{layer}"
        for name in ("query", "key", "value"):
            assert tuple(small.get_parameter(f"{prefix}.attention.self.{name}.weight").shape) == (48, 64)
        assert tuple(small.get_parameter(f"{prefix}.attention.output.dense.weight").shape) == (64, 48)
        assert tuple(small.get_parameter(f"{prefix}.intermediate.dense.weight").shape) == (90, 64)
    assert shrink_report(small).exact
    with torch.no_grad():
        out, expected = tree_leaves(small(x)), tree_leaves(gm(x))
        assert [tuple(t.shape) for t in out] == [tuple(t.shape) for t in tree_leaves(model(x))] == [(2, 6, 64), (2, 64)]
        torch.testing.assert_close(out, expected)
        program = torch.export.export(small, (x,))
        torch.export.save(program, tmp_path / "bert.pt2")
        loaded = torch.export.load(tmp_path / "bert.pt2").module()
        torch.testing.assert_close(tree_leaves(loaded(x)), out)
        buffer = io.BytesIO()
        torch.save(small, buffer)
        buffer.seek(0)
        torch.testing.assert_close(tree_leaves(torch.load(buffer, weights_only=False)(x)), out)


@pytest.mark.parametrize("make", [tiny_llama, tiny_bert])
def test_eager_attention_implementation_prunes_heads_too(make):
    """attn_implementation="eager" (q @ k^T, softmax in float32, .to(dtype), dropout, contiguous): the same head
    groups as the SDPA path, ratio 0.5 halves them per layer, shrunk == masked."""
    torch.manual_seed(0)
    model = make()
    model.config._attn_implementation = "eager"
    x = _tokens()
    pruner, gm, small = _prune(model, x, 0.5, mask_consumers=True)
    report = shrink_report(small)
    heads = [g for g in pruner.channel_groups if g.prunable and g.size in (2, 4)]
    assert len(heads) == 2 and all(report.channels[g.index] == (g.size, g.size // 2) for g in heads)
    assert report.exact and not any(n.target is torch.ops.aten.scaled_dot_product_attention.default
                                    for n in gm.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(tree_leaves(small(x)), tree_leaves(gm(x)))


def test_pruning_no_head_equals_the_original_exactly():
    """Shrinking (plan_shrink, remove_channels) the exported Llama with nothing removed reproduces the model bit for bit."""
    model, x = tiny_llama(layers=1), _tokens()
    gm = capture(model, example_inputs=(x,))
    small, report = shrunk_copy(gm, find_channel_groups(gm, (x,)), {}, (x,))
    with torch.no_grad():
        torch.testing.assert_close(_hidden(small(x)), _hidden(model(x)), rtol=0, atol=0)
    assert report.params_after == report.params_before


def test_head_counting_rule_rounds_down():
    """The documented rule: floor(ratio * heads) go, so 0.3 of 4 heads removes 1 (Torch-Pruning rounds up to 2),
    0.5 of 8 removes 4, 0.3 of 2 KV heads removes none; round_to keeps a multiple of it."""
    assert [count_to_remove(4, 0.3), count_to_remove(8, 0.5), count_to_remove(2, 0.3), count_to_remove(12, 0.3)] == [
        1, 4, 0, 3
    ]
    assert count_to_remove(12, 0.3, round_to=4) == 0 and count_to_remove(12, 0.5, round_to=4) == 4


def test_bad_head_requests_get_clear_errors():
    """Naming the frozen residual producer (o_proj) in a config, or removing every KV head, is a ValueError naming
    the layer or group and the fix; nothing is built."""
    model, x = tiny_llama(layers=1), _tokens()
    with pytest.raises(ValueError, match=r"o_proj.weight, whose output channels .* cannot shrink"):
        ChannelPruner(0.5).prepare(model, {"layers.0.self_attn.o_proj": {}}, example_inputs=(x,))
    gm = capture(model, example_inputs=(x,))
    groups = find_channel_groups(gm, (x,))
    attn = _group_of(groups, "layers.0.self_attn.q_proj.weight")
    with pytest.raises(ValueError, match=rf"removes all 2 channels of group {attn.index}; keep at least one"):
        shrunk_copy(gm, groups, {attn.index: [0, 1]}, (x,))


# ------------------------------------------------------------------ nn.MultiheadAttention (fused in_proj)
class MHABlock(nn.Module):
    """Self-attention with nn.MultiheadAttention (4 heads of 8, need_weights=False), optional causal mask, then a
    residual and an MLP; in_proj and out_proj biases made non-zero so removed heads carry constants."""

    def __init__(self, batch_first: bool = True, masked: bool = False) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=batch_first)
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 32)
        self.masked = masked
        with torch.no_grad():
            self.attn.in_proj_bias.normal_()
            self.attn.out_proj.bias.normal_()

    def forward(self, x):
        n = x.shape[1] if self.attn.batch_first else x.shape[0]
        mask = torch.ones(n, n, dtype=torch.bool, device=x.device).tril().logical_not() if self.masked else None
        h = x + self.attn(x, x, x, need_weights=False, attn_mask=mask)[0]
        return h + self.fc2(torch.relu(self.fc1(h)))


@pytest.mark.parametrize("mask_consumers", [True, False])
@pytest.mark.parametrize("batch_first, masked", [(True, False), (False, False), (True, True)])
def test_multihead_attention_loses_whole_heads_from_fused_in_proj(batch_first, masked, mask_consumers):
    """MHABlock at ratio 0.5: 2 of 4 heads go from each q/k/v third of in_proj_weight/bias and from out_proj's
    columns (embed_dim 32 stays the residual width); the literal sizes of the exported decomposition are lowered;
    shrunk == masked (without consumer masks the removed heads' constant is folded into out_proj's bias), and the
    shrunk module exports with a dynamic batch."""
    model = MHABlock(batch_first, masked).eval()
    x = torch.randn(3, 5, 32) if batch_first else torch.randn(5, 3, 32)
    pruner, gm, small = _prune(model, x, 0.5, mask_consumers=mask_consumers)
    heads = _group_of(pruner.channel_groups, "attn.in_proj_weight")
    report = shrink_report(small)
    assert report.channels[heads.index] == (4, 2) and report.exact
    assert ("attn.out_proj.weight" in report.folded) is not mask_consumers
    removed = pruner.removed_channels()[heads.index]
    kept_rows = torch.cat([third * 32 + h * 8 + torch.arange(8) for third in range(3) for h in range(4)
                           if h not in removed.tolist()])
    torch.testing.assert_close(small.get_parameter("attn.in_proj_weight"), model.attn.in_proj_weight[kept_rows])
    assert tuple(small.get_parameter("attn.out_proj.weight").shape) == (32, 16)
    # the same graph, its literal sizes lowered (the shared sym * 4 of a dynamic batch becomes sym * 2)
    captured = capture(model, example_inputs=(x,))
    assert count_nodes(small) == count_nodes(captured)
    factors = lambda g: sorted(str(n.args[1]) for n in g.graph.nodes if n.target is operator.mul)  # noqa: E731
    assert factors(small) == sorted("2" if f == "4" else f for f in factors(captured))
    with torch.no_grad():
        torch.testing.assert_close(small(x), gm(x))
        if not batch_first:  # capture keeps dim 0 dynamic: here the sequence, the batch (B * H literal) is static
            torch.testing.assert_close(torch.export.export(small, (x,)).module()(x), small(x))
            return
        batch = torch.export.Dim("batch", min=1, max=64)
        program = torch.export.export(small, (x,), dynamic_shapes=({0: batch},))
        torch.testing.assert_close(program.module()(x), small(x))
        torch.testing.assert_close(program.module()(x[:1]), gm(x[:1]))


def test_multihead_attention_pruned_heads_equal_zeroed_heads_of_the_eager_model():
    """Against the eager nn.MultiheadAttention: zeroing heads 1 and 3 (their q/k/v rows and out_proj columns) in
    a copy of the model gives the output of the shrunk module without those heads."""
    model, x = MHABlock().eval(), torch.randn(2, 5, 32)
    gm = capture(model, example_inputs=(x,))
    groups = find_channel_groups(gm, (x,))
    heads = _group_of(groups, "attn.in_proj_weight")
    small, report = shrunk_copy(gm, groups, {heads.index: [1, 3]}, (x,))
    reference = MHABlock().eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for h in (1, 3):
            for third in range(3):
                rows = slice(third * 32 + h * 8, third * 32 + h * 8 + 8)
                reference.attn.in_proj_weight[rows] = 0
                reference.attn.in_proj_bias[rows] = 0
            reference.attn.out_proj.weight[:, h * 8 : h * 8 + 8] = 0
        torch.testing.assert_close(small(x), reference(x))
    assert report.params_before - report.params_after == 2 * (3 * 8 * 32 + 3 * 8 + 32 * 8)


def test_multihead_attention_nothing_removed_is_exact_and_unfollowed_forms_are_refused():
    """MHABlock: shrinking nothing reproduces the captured module bit for bit (and the eager model to rounding: the
    exported decomposition is not the eager kernel); need_weights=True (averaged attention weights) is refused
    with the reason, and naming it in a config is a ValueError."""
    model, x = MHABlock().eval(), torch.randn(2, 5, 32)
    gm = capture(model, example_inputs=(x,))
    small, _ = shrunk_copy(gm, find_channel_groups(gm, (x,)), {}, (x,))
    with torch.no_grad():
        torch.testing.assert_close(small(x), gm(x), rtol=0, atol=0)
        torch.testing.assert_close(small(x), model(x))

    class Weights(MHABlock):
        def forward(self, x):
            return x + self.attn(x, x, x)[0]

    weights = Weights().eval()
    groups = find_channel_groups(capture(weights, example_inputs=(x,)), (x,))
    why = _group_of(groups, "attn.in_proj_weight").frozen_reason
    assert "fused q/k/v projection in a form the pass does not follow" in why and "need_weights=False" in why
    with pytest.raises(ValueError, match=r"attn.in_proj_weight, whose output channels .* cannot shrink"):
        ChannelPruner(0.5).prepare(weights, {"attn.in_proj_weight": {}}, example_inputs=(x,))


def test_multihead_attention_kept_as_a_leaf_module_says_how_to_prune_its_heads():
    """leaf_modules=[nn.MultiheadAttention] keeps it a call_module, whose heads cannot go (as a module its inner
    width must equal embed_dim): the channels it reads are frozen with a reason naming the remedy."""
    model, x = MHABlock().eval(), torch.randn(2, 5, 32)

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pre, self.block = nn.Linear(32, 32), model

        def forward(self, x):
            return self.block(self.pre(x))

    gm = capture(Wrapped().eval(), example_inputs=(x,), leaf_modules=[nn.MultiheadAttention])
    assert get_capture(gm).method == "symbolic_trace"
    why = _group_of(find_channel_groups(gm, (x,)), "pre.weight").frozen_reason
    assert "nn.MultiheadAttention kept whole (a leaf module); capture it with torch.export" in why


def test_torchvision_vit_heads_and_mlp_shrink_hidden_dim_kept():
    """torchvision's VisionTransformer (vit_b_16's code at 2 layers, 4 heads, hidden 32, 32x32 images), a config
    naming in_proj and fc1: ratio 0.5 removes 2 heads per layer and half of each MLP, exactly; hidden_dim (the
    residual width, which the default prunes too: see test_vit_width.py) is kept, so no attribute needs patching;
    output shape kept; exports."""
    vision = pytest.importorskip("torchvision.models.vision_transformer")
    torch.manual_seed(0)
    model = vision.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32,
                                     mlp_dim=64, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    pruner = ChannelPruner(sparsity_level=0.5, mask_consumers=True)
    gm = pruner.prepare(model, ["*.in_proj_weight", "*.mlp.0"], example_inputs=(x,))
    pruner.step()
    small = shrink(gm)
    report = shrink_report(small)
    assert sorted(report.channels.values()) == [(4, 2), (4, 2), (64, 32), (64, 32)] and report.exact
    weight = "encoder.layers.encoder_layer_0.self_attention.in_proj_weight"
    assert tuple(small.get_parameter(weight).shape) == (48, 32)
    with torch.no_grad():
        assert small(x).shape == model(x).shape == (2, 10)
        torch.testing.assert_close(small(x), gm(x))
        torch.testing.assert_close(torch.export.export(small, (x,)).module()(x), small(x))


# ------------------------------------------------------------------ literal sizes in symbolically traced graphs
class LiteralHeads(nn.Module):
    """Hand-written attention whose views spell the head count (4) and width (32) as literals, and a conv whose
    flatten into a Linear spells its size (4 channels x 2 x 2 = 16)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(32, 32) for _ in range(4))
        self.conv, self.fc = nn.Conv2d(3, 4, 1), nn.Linear(16, 32)

    def forward(self, x, image):
        q, k, v = (f(x).view(2, 5, 4, 8).transpose(1, 2) for f in (self.q, self.k, self.v))
        attn = torch.softmax(q @ k.transpose(2, 3) * 8**-0.5, -1) @ v
        h = x + self.o(attn.transpose(1, 2).reshape(2, 5, 32))
        return h + self.fc(torch.relu(self.conv(image)).view(2, 16))[:, None]


def test_symbolically_traced_literal_sizes_are_rewritten():
    """LiteralHeads (symbolic trace: sizes as call_method arguments), ratio 0.5: removing 2 of 4 heads and 2 of 4
    conv channels
    lowers view(2, 5, 4, 8) to 2 heads, reshape(2, 5, 32) to 16 and view(2, 16) to 8 (2 of 4 channels x 2 x 2);
    the shrunk module equals the masked one (ChannelPruner, consumer columns masked)."""
    model, x, image = LiteralHeads().eval(), torch.randn(2, 5, 32), torch.randn(2, 3, 2, 2)
    pruner = ChannelPruner(sparsity_level=0.5, mask_consumers=True)
    gm = pruner.prepare(model, example_inputs=(x, image))
    assert get_capture(gm).method == "symbolic_trace"
    pruner.step()
    small = shrink(gm)
    views = {n.name: n.args[1:] for n in small.graph.nodes if n.op == "call_method" and n.target in ("view", "reshape")}
    assert views["view"] == (2, 5, 2, 8) and views["reshape"] == (2, 5, 16) and views["view_3"] == (2, 8)
    with torch.no_grad():
        torch.testing.assert_close(small(x, image), gm(x, image))
