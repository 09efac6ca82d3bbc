"""The residual width of a torchvision VisionTransformer as one channel group (issue 10): functional/ATen
``layer_norm`` over the last dim, a class token expanded and concatenated along the tokens, and the position
embedding added by broadcast are members of the channel space; the shrunk module is compared with the masked one
whose LayerNorms count only the kept channels (removal through a LayerNorm is inexact, and reported so)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from fx_sparsity import shrink_report
from fx_sparsity.structured import ChannelPruner, shrink
from helpers import shrunk_copy, snapshot
from passes import find_channel_groups, get_capture
from passes.capturing import capture

vision = pytest.importorskip("torchvision.models.vision_transformer")

aten = torch.ops.aten
LAYERS = ("encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1")
NORMS = tuple(f"{layer}.{ln}" for layer in LAYERS for ln in ("ln_1", "ln_2")) + ("encoder.ln",)


def small_vit() -> nn.Module:
    """vit_b_16's code at image 32, patch 8, 2 layers, 2 heads, hidden 32, MLP 64; random head (torchvision
    initialises it to zero, which would hide every difference in the logits) and random LayerNorm affines."""
    torch.manual_seed(0)
    model = vision.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                     mlp_dim=64, num_classes=10).eval()
    with torch.no_grad():
        model.heads.head.weight.normal_()
        model.class_token.normal_()
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model


def _inputs() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _group_of(groups, producer: str):
    return next(g for g in groups if producer in {m.target for m in g.producers})


class KeptChannelLayerNorm(fx.Interpreter):
    """Runs a masked module with each ``layer_norm`` of the pruned width normalising over the kept channels only
    (the removed ones, zero in the masked module, give zero): what the shrunk module computes, by hand."""

    def __init__(self, gm: fx.GraphModule, keep: torch.Tensor, width: int) -> None:
        super().__init__(gm)
        self.keep, self.width = keep, width

    def call_function(self, target, args, kwargs):
        if target not in (aten.layer_norm.default, F.layer_norm) or args[0].shape[-1] != self.width:
            return super().call_function(target, args, kwargs)
        bound = dict(zip(("input", "normalized_shape", "weight", "bias", "eps"), args), **kwargs)
        x, weight, bias, eps = bound["input"], bound["weight"], bound["bias"], bound["eps"]
        out = torch.zeros_like(x)
        kept = F.layer_norm(x[..., self.keep], [len(self.keep)], weight[self.keep], bias[self.keep], eps)
        out[..., self.keep] = kept
        return out


def _kept(removed: torch.Tensor, size: int) -> torch.Tensor:
    return torch.tensor([c for c in range(size) if c not in set(removed.tolist())])


def test_vit_residual_group_members():
    """Exported torchvision ViT: the residual width is one prunable group of 32 channels holding conv_proj's rows,
    the class token and position embedding at dim 2, every LayerNorm's weight and bias, each in_proj's columns,
    out_proj's and fc2's rows (with biases), fc1's and the classifier head's columns; literal members are the five
    layer_norm normalized_shapes, the patch reshape [b, 32, 16] and out_proj's view [17, b, 32]; the report lists
    the five LayerNorms as inexact. The logits (classes) stay frozen."""
    model, x = small_vit(), _inputs()
    gm = capture(model, example_inputs=(x,))
    assert get_capture(gm).method == "export"
    groups = find_channel_groups(gm, (x,))
    width = _group_of(groups, "conv_proj.weight")
    assert width.prunable and width.size == 32
    expected = {("conv_proj.weight", "producer", 0), ("conv_proj.bias", "param", 0), ("class_token", "param", 2),
                ("encoder.pos_embedding", "param", 2), ("heads.head.weight", "consumer", 1)}
    for layer in LAYERS:
        expected |= {(f"{layer}.{ln}.{p}", "param", 0) for ln in ("ln_1", "ln_2") for p in ("weight", "bias")}
        expected |= {(f"{layer}.self_attention.in_proj_weight", "consumer", 1),
                     (f"{layer}.self_attention.out_proj.weight", "producer", 0),
                     (f"{layer}.self_attention.out_proj.bias", "param", 0),
                     (f"{layer}.mlp.0.weight", "consumer", 1),
                     (f"{layer}.mlp.3.weight", "producer", 0), (f"{layer}.mlp.3.bias", "param", 0)}
    expected |= {("encoder.ln.weight", "param", 0), ("encoder.ln.bias", "param", 0)}
    tensors = {(m.target, m.kind, m.dim) for m in width.members if m.kind not in ("literal", "module")}
    assert tensors == expected
    nodes = {n.name: n for n in gm.graph.nodes}
    literals = [nodes[m.target] for m in width.members if m.kind == "literal"]
    assert sum(n.target is aten.layer_norm.default for n in literals) == 5
    assert {n.target for n in literals} == {aten.layer_norm.default, aten.reshape.default, aten.view.default}
    assert all(m.inner == 1 for m in width.members if m.kind == "literal")
    assert width.inexact == tuple(f"LayerNorm {fqn} (its statistics count every channel)" for fqn in NORMS)
    head = _group_of(groups, "heads.head.weight")
    assert not head.prunable and "reaches the model output" in head.frozen_reason


def test_vit_pruning_nothing_equals_the_original():
    """Following the width changes nothing: a shrink that removes no channel gives exactly the exported graph's
    logits, and the prepared module (all-ones masks) and eager MultiheadAttention's fast path match them to float
    tolerance; the user's model is untouched."""
    model, x = small_vit(), _inputs()
    before = snapshot(model)
    pruner = ChannelPruner(0.5)
    gm = pruner.prepare(model, example_inputs=(x,))
    with torch.no_grad():
        captured = capture(model, example_inputs=(x,))
        expected = captured(x)
        torch.testing.assert_close(expected, model(x))
        torch.testing.assert_close(gm(x), expected)
        groups = find_channel_groups(captured, (x,))
        width = _group_of(groups, "conv_proj.weight")
        same, report = shrunk_copy(captured, groups, {width.index: []}, (x,))
        assert torch.equal(same(x), expected) and report.exact
    after = snapshot(model)
    assert after["ids"] == before["ids"] and after["modules"] == before["modules"]
    assert all(torch.equal(before["state"][k], v) for k, v in after["state"].items())


@pytest.mark.parametrize("mask_consumers", [True, False])
def test_vit_width_shrinks_as_masked_with_kept_channel_norms(mask_consumers):
    """ChannelPruner(0.5) on the ViT prunes the residual width by default (it does not reach the logits): 16 of
    32 channels go from conv_proj, class token, position embedding, every LayerNorm, in_proj columns, out_proj and
    fc2 rows, fc1 and head columns, with 1 of 2 heads and half of each MLP. The shrunk module equals the masked one
    run with LayerNorms over the kept channels (not the masked one itself: the report lists every LayerNorm as
    inexact); logits keep their shape, MACs drop more than 3x, it exports."""
    model, x = small_vit(), _inputs()
    pruner = ChannelPruner(0.5, mask_consumers=mask_consumers)
    gm = pruner.prepare(model, example_inputs=(x,))
    pruner.step()
    small = shrink(gm)
    report = shrink_report(small)
    width = _group_of(pruner.channel_groups, "conv_proj.weight")
    assert report.channels[width.index] == (32, 16)
    assert sorted(report.channels.values()) == [(2, 1), (2, 1), (32, 16), (64, 32), (64, 32)]
    assert [n for n in report.inexact if "LayerNorm" in n] == [
        f"group {width.index}: LayerNorm {fqn} (its statistics count every channel)" for fqn in NORMS]
    assert report.macs_before > 3 * report.macs_after
    shapes = {"conv_proj.weight": (16, 3, 8, 8), "class_token": (1, 1, 16), "encoder.pos_embedding": (1, 17, 16),
              "encoder.ln.weight": (16,), "heads.head.weight": (10, 16)}
    for layer in LAYERS:
        shapes |= {f"{layer}.self_attention.in_proj_weight": (48, 16),
                   f"{layer}.self_attention.out_proj.weight": (16, 16), f"{layer}.mlp.0.weight": (32, 16),
                   f"{layer}.mlp.3.weight": (16, 32), f"{layer}.ln_1.weight": (16,)}
    assert {k: tuple(small.get_parameter(k).shape) for k in shapes} == shapes
    keep = _kept(pruner.removed_channels()[width.index], 32)
    with torch.no_grad():
        reference = KeptChannelLayerNorm(gm, keep, 32).run(x)
        out = small(x)
        assert out.shape == model(x).shape == (2, 10)
        if mask_consumers:  # else a removed channel's bias still flows in the masked module: no exact reference
            torch.testing.assert_close(out, reference)
        torch.testing.assert_close(torch.export.export(small, (x,)).module()(x), out)


def test_vit_width_shrunk_saves_and_loads(tmp_path):
    """The ViT shrunk with its residual width round-trips through torch.export.save/load and torch.save/load."""
    model, x = small_vit(), _inputs()
    pruner = ChannelPruner(0.5, mask_consumers=True)
    gm = pruner.prepare(model, example_inputs=(x,))
    pruner.step()
    small = shrink(gm)
    with torch.no_grad():
        out = small(x)
        torch.export.save(torch.export.export(small, (x,)), tmp_path / "vit.pt2")
        torch.testing.assert_close(torch.export.load(tmp_path / "vit.pt2").module()(x), out)
        torch.save(small, tmp_path / "vit.pt")
        torch.testing.assert_close(torch.load(tmp_path / "vit.pt", weights_only=False)(x), out)


class FunctionalWidth(nn.Module):
    """Symbolically traced: a token parameter expanded (literal sizes) and concatenated along the tokens, a
    position parameter added, F.layer_norm with a tuple normalized_shape, then a Linear to the output."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.out = nn.Linear(6, 8), nn.Linear(8, 3)
        self.token = nn.Parameter(torch.randn(1, 1, 8))
        self.pos = nn.Parameter(torch.randn(1, 5, 8))
        self.weight, self.bias = nn.Parameter(torch.rand(8) + 0.5), nn.Parameter(torch.randn(8))

    def forward(self, x):
        h = torch.cat([self.token.expand(2, 1, 8), self.embed(x)], dim=1) + self.pos
        return self.out(F.layer_norm(h, (8,), self.weight, self.bias, 1e-5))


def test_symbolic_trace_functional_layer_norm_and_expanded_token():
    """FunctionalWidth (call_method expand with literal sizes, F.layer_norm): the 8 channels are one group whose
    literals (expand's 8, normalized_shape's 8) are rewritten to 4; the shrunk module equals the masked one with
    its LayerNorm over the kept channels, and the report names the norm."""
    model, x = FunctionalWidth().eval(), torch.randn(2, 4, 6)
    pruner = ChannelPruner(0.5, mask_consumers=True)
    gm = pruner.prepare(model, example_inputs=(x,))
    assert get_capture(gm).method == "symbolic_trace"
    pruner.step()
    small = shrink(gm)
    group = _group_of(pruner.channel_groups, "embed.weight")
    assert {(m.target, m.dim) for m in group.members if m.kind == "param"} >= {("token", 2), ("pos", 2),
                                                                                ("weight", 0), ("bias", 0)}
    assert sum(m.kind == "literal" for m in group.members) == 2
    assert shrink_report(small).inexact == (f"group {group.index}: LayerNorm layer_norm (its statistics count every "
                                            "channel)",)
    keep = _kept(pruner.removed_channels()[group.index], 8)
    with torch.no_grad():
        torch.testing.assert_close(small(x), KeptChannelLayerNorm(gm, keep, 8).run(x))
    assert tuple(small.get_parameter("token").shape) == (1, 1, 4)


def test_bert_hidden_width_now_followed_through_layer_norm_stays_frozen_at_the_output():
    """Exported transformers BERT: its encoder LayerNorms are now followed (their weights join the hidden-width
    group), and that group still reaches the model output (last_hidden_state), so it stays frozen with that reason
    and ChannelPruner's default leaves it whole."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=32)
    model = transformers.BertModel(config).eval()
    x = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(1))
    pruner = ChannelPruner(0.5)
    pruner.prepare(model, example_inputs=(x,))
    hidden = _group_of(pruner.channel_groups, "encoder.layer.0.attention.output.dense.weight")
    params = {m.target for m in hidden.members if m.kind == "param"}
    assert {f"encoder.layer.{i}.{part}.LayerNorm.{p}" for i in range(2) for part in ("attention.output", "output")
            for p in ("weight", "bias")} <= params
    assert not hidden.prunable and "reaches the model output" in hidden.frozen_reason
    assert hidden.index in pruner.frozen


class TwoDimNorm(nn.Module):
    """F.layer_norm over the last two dims (tokens x channels): a channel cannot go alone."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.out = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.out(F.layer_norm(self.embed(x), (4, 8)))


def test_layer_norm_over_several_dims_is_frozen_with_the_reason():
    """TwoDimNorm: the embed group is frozen, the reason naming the layer_norm node; nothing is added to it."""
    model, x = TwoDimNorm().eval(), torch.randn(2, 4, 6)
    gm = capture(model, example_inputs=(x,))
    group = _group_of(find_channel_groups(gm, (x,)), "embed.weight")
    assert not group.prunable
    assert "layer_norm normalizes over several dims" in group.frozen_reason
    assert not [m for m in group.members if m.kind == "literal"]
