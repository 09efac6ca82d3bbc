"""ChannelPruner (step 1: masks over whole channel groups) and shrink (step 2: physically smaller modules):
counting rules, parity with torch.ao.pruning's SaliencyPruner/FPGMPruner and prune(), exactness against the
masked module, export and save/load, bad inputs, torchvision models."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.ao.pruning._experimental.pruner import FPGMPruner, SaliencyPruner
from torch.testing._internal import common_pruning

import fx_sparsity
from fx_sparsity import WeightNormSparsifier, shrink_report
from fx_sparsity.levels import LambdaSL
from fx_sparsity.structured import ChannelPruner, channel_importance, channels_to_remove, count_to_remove, shrink
from helpers import TinyMobileNet, TinyResNet, TinyViT, assert_adds_channels, shrunk_copy, snapshot
from passes import find_channel_groups, get_capture
from passes.capturing import capture


def _randomize_norms(model: nn.Module) -> nn.Module:
    """BatchNorms with non-trivial statistics, so removed channels carry non-zero constants."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
                m.weight.normal_()
                m.bias.normal_()
    return model.eval()


def _prune(model: nn.Module, x: torch.Tensor, config=None, **kwargs):
    pruner = ChannelPruner(**kwargs)
    gm = pruner.prepare(model, config, example_inputs=x)
    pruner.step()
    return pruner, gm, shrink(gm)


def _check_attributes(module: nn.Module) -> None:
    """Every module's size attributes agree with its tensors."""
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            assert (m.out_features, m.in_features) == tuple(m.weight.shape), name
        elif isinstance(m, nn.modules.conv._ConvNd):
            assert m.out_channels == m.weight.shape[0] and m.in_channels == m.weight.shape[1] * m.groups, name
        elif isinstance(m, nn.BatchNorm2d):
            assert m.num_features == m.running_mean.shape[0] == m.weight.shape[0], name


# ----------------------------------------------------------------- counting and scoring (pure tensor code)
def test_count_to_remove_rounds_down_and_keeps_multiples():
    """floor(ratio * n) removed; the kept count rounds up to a multiple of round_to and blocks; never all."""
    assert count_to_remove(64, 0.3) == 19
    assert count_to_remove(64, 0.3, round_to=8) == 16  # keep 45 -> 48
    assert count_to_remove(4, 0.3) == 1  # Torch-Pruning removes 2 of 4 heads at 0.3
    assert count_to_remove(10, 0.5, round_to=16) == 0  # 16 does not fit in 10: keep all
    assert count_to_remove(32, 0.5, blocks=4) == 16 and count_to_remove(12, 0.5, blocks=4) == 4


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300), st.floats(0, 0.999), st.sampled_from([1, 2, 8, 16]), st.sampled_from([1, 2, 4]))
def test_count_to_remove_properties(size, ratio, round_to, blocks):
    """Never more than ratio * size, never every channel, and the kept count is a multiple (or all)."""
    removed = count_to_remove(size, ratio, round_to, blocks)
    kept = size - removed
    multiple = math.lcm(round_to, blocks)
    assert 0 <= removed <= math.floor(ratio * size) and kept >= 1
    assert kept == size or kept % multiple == 0


def test_channels_to_remove_per_block_and_ties():
    """The lowest scores of each block; ties go to the lower channel."""
    scores = torch.tensor([5.0, 1.0, 1.0, 3.0, 0.0, 9.0, 2.0, 2.0])
    assert channels_to_remove(scores, 2).tolist() == [1, 4]
    assert channels_to_remove(scores, 4, blocks=2).tolist() == [1, 2, 4, 6]


def test_channel_importance_matches_torch_ao_scores():
    """l1 is SaliencyPruner's row norm; fpgm is FPGMPruner's summed L2 distance."""
    rows = torch.randn(6, 5)
    torch.testing.assert_close(channel_importance(rows, "l1"), rows.norm(p=1, dim=1))
    torch.testing.assert_close(channel_importance(rows, "l2"), rows.norm(dim=1))
    torch.testing.assert_close(channel_importance(rows, "fpgm"), FPGMPruner()._compute_distance(rows))


# ------------------------------------------------------------------ parity with torch.ao.pruning
AO_CASES = {
    "LinearBias": (["seq.0", "seq.1", "seq.2", "seq.3"], (3, 7)),
    "LinearActivation": (["seq.0", "seq.2", "seq.4", "linear1"], (3, 7)),
    "LinearActivationFunctional": (["seq.0", "seq.2", "seq.4", "linear1", "linear2"], (3, 7)),
    "SimpleConv2d": (["seq.0", "seq.1", "conv2d1"], (1, 1, 28, 28)),
    "Conv2dBias": (["seq.0", "seq.1", "seq.2", "conv2d1"], (1, 1, 28, 28)),
    "Conv2dActivation": (["seq.0", "seq.2", "seq.4", "conv2d1"], (1, 1, 28, 28)),
}


@pytest.mark.parametrize("name", list(AO_CASES))
def test_saliency_masks_and_pruned_model_match_torch_ao(name):
    """torch.ao.pruning's test models (Linear/Conv chains with bias, module and functional activations): our masks
    equal SaliencyPruner's, and the shrunk module equals torch.ao's prune() result (prune_bias=False: the removed
    channels' biases propagate into the next layer) in output and in every tensor's shape."""
    layers, shape = AO_CASES[name]
    model, x = getattr(common_pruning, name)().eval(), torch.randn(shape)
    ao_model = copy.deepcopy(model)
    ao = SaliencyPruner({"sparsity_level": 0.5, "prune_bias": False})
    ao.prepare(ao_model, [{"tensor_fqn": f"{layer}.weight"} for layer in layers])
    ao.enable_mask_update = True
    ao.step()
    ao_masks = {layer: ao_model.get_submodule(layer).parametrizations.weight[0].mask.clone() for layer in layers}
    ao_pruned = ao.prune()
    pruner, gm, small = _prune(model, x, [f"{layer}.weight" for layer in layers], sparsity_level=0.5)
    for layer in layers:
        assert torch.equal(gm.get_buffer(f"{layer}.weight_mask").flatten(1).any(1), ao_masks[layer]), layer
    with torch.no_grad():
        torch.testing.assert_close(small(x), ao_pruned(x))
        torch.testing.assert_close(small(x), gm(x))
    ao_shapes = {k: v.shape for k, v in ao_pruned.state_dict().items()}
    assert {k: v.shape for k, v in small.state_dict().items()} == ao_shapes
    assert shrink_report(small).exact
    _check_attributes(small)


@pytest.mark.parametrize("name", ["SimpleConv2d", "Conv2dBias", "Conv2dActivation"])
def test_fpgm_masks_match_torch_ao(name):
    """FPGM on conv chains (even sizes, where torch.ao's round() and our floor agree) picks torch.ao's filters."""
    layers, shape = AO_CASES[name]
    model = getattr(common_pruning, name)().eval()
    ao_model = copy.deepcopy(model)
    ao = FPGMPruner(0.5)
    ao.prepare(ao_model, [{"tensor_fqn": f"{layer}.weight"} for layer in layers])
    ao.enable_mask_update = True
    ao.step()
    pruner = ChannelPruner(sparsity_level=0.5, criterion="fpgm")
    gm = pruner.prepare(model, [f"{layer}.weight" for layer in layers], example_inputs=torch.randn(shape))
    pruner.step()
    for layer in layers:
        ao_mask = ao_model.get_submodule(layer).parametrizations.weight[0].mask
        assert torch.equal(gm.get_buffer(f"{layer}.weight_mask").flatten(1).any(1), ao_mask), layer


@pytest.mark.parametrize("name", ["Conv2dPadBias", "Conv2dPool", "Conv2dPoolFlatten", "Conv2dPoolFlattenFunctional"])
def test_padded_and_pooled_chains_report_where_removal_is_inexact(name):
    """Padded convs, pooling with padding, flatten into Linear: the report names where the shrunk module departs
    from the masked one; with mask_consumers=True the two agree exactly and the report is clean."""
    layers = ["seq.0", "seq.3", "conv2d1", "conv2d2"] if "Pool" in name else ["seq.0", "seq.2", "seq.4", "conv2d1"]
    model, x = getattr(common_pruning, name)().eval(), torch.randn(1, 1, 28, 28)
    _, gm, small = _prune(model, x, [f"{layer}.weight" for layer in layers], sparsity_level=0.5)
    report = shrink_report(small)
    assert not report.exact and any("padded conv" in note or "vary with" in note for note in report.inexact)
    _, gm, small = _prune(model, x, [f"{layer}.weight" for layer in layers], sparsity_level=0.5, mask_consumers=True)
    assert shrink_report(small).exact
    with torch.no_grad():
        torch.testing.assert_close(small(x), gm(x))
    _check_attributes(small)


# ------------------------------------------------------------------ the two-step flow on CNNs
@pytest.mark.parametrize("make", [TinyResNet, TinyMobileNet])
def test_shrunk_cnn_equals_the_channel_masked_module(make):
    """TinyResNet/TinyMobileNet (residuals, BatchNorm, depthwise, grouped conv, SE): with consumer columns masked
    too, shrinking is exact; with producer rows only, removed channels' constants are folded and the padded convs
    they enter are named in the report. The user's model is untouched; attributes follow the tensors."""
    model, x = _randomize_norms(make()), torch.randn(2, 3, 16, 16)
    before = snapshot(model)
    _, gm, small = _prune(model, x, sparsity_level=0.5, mask_consumers=True)
    report = shrink_report(small)
    assert report.exact and report.params_after < 0.5 * report.params_before
    assert report.macs_after < 0.5 * report.macs_before
    with torch.no_grad():
        torch.testing.assert_close(small(x), gm(x))
    _check_attributes(small)
    _, gm, small = _prune(model, x, sparsity_level=0.5)
    assert shrink_report(small).folded and shrink_report(small).inexact
    assert all("padded conv" in note for note in shrink_report(small).inexact)
    after = snapshot(model)
    assert after["ids"] == before["ids"] and after["attrs"] == before["attrs"]
    for key, value in before["state"].items():
        torch.testing.assert_close(after["state"][key], value, rtol=0, atol=0)


def test_bias_folds_exactly_through_batchnorm_and_activation_into_1x1_conv_and_flatten_linear():
    """conv3x3 -> BN -> ReLU -> 1x1 conv -> flatten -> Linear: producer-only masks, removed channels carry
    relu(bn(bias)) and are folded exactly (no padding on the way)."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 1), nn.Tanh(), nn.Flatten(), nn.Linear(54, 5)
    )
    model, x = _randomize_norms(model), torch.randn(4, 3, 5, 5)
    _, gm, small = _prune(model, x, sparsity_level=0.5)
    report = shrink_report(small)
    assert report.exact and set(report.folded) == {"3.weight", "6.weight"}
    assert small.get_submodule("6").in_features == 27 and small.get_submodule("3").in_channels == 4
    with torch.no_grad():
        torch.testing.assert_close(small(x), gm(x))


def test_shrunk_module_exports_and_round_trips(tmp_path):
    """The shrunk TinyResNet exports with a dynamic batch, saves and loads (torch.export.save/load), pickles, and
    its state_dict loads into a fresh copy; outputs equal throughout."""
    model, x = _randomize_norms(TinyResNet()), torch.randn(2, 3, 16, 16)
    _, _, small = _prune(model, x, sparsity_level=0.3, round_to=4, mask_consumers=True)
    with torch.no_grad():
        expected = small(x)
        batch = torch.export.Dim("batch", min=1, max=64)
        program = torch.export.export(small, (x,), dynamic_shapes=({0: batch},))
        torch.export.save(program, tmp_path / "shrunk.pt2")
        loaded = torch.export.load(tmp_path / "shrunk.pt2").module()
        torch.testing.assert_close(loaded(x), expected)
        torch.testing.assert_close(loaded(x[:1]), small(x[:1]))
        buffer = io.BytesIO()
        torch.save(small, buffer)
        buffer.seek(0)
        torch.testing.assert_close(torch.load(buffer, weights_only=False)(x), expected)
        fresh = copy.deepcopy(small)
        for p in fresh.parameters():
            p.zero_()
        fresh.load_state_dict(small.state_dict())
        torch.testing.assert_close(fresh(x), expected)


def test_round_to_and_global_scope():
    """round_to=8 keeps multiples of 8 in every pruned group; scope='global' removes about ratio of all channels."""
    model, x = TinyResNet().eval(), torch.randn(2, 3, 16, 16)
    _, _, small = _prune(model, x, sparsity_level=0.3, round_to=8)
    assert all(after % 8 == 0 for _, after in shrink_report(small).channels.values())
    pruner, _, small = _prune(model, x, sparsity_level=0.4, scope="global")
    sizes = shrink_report(small).channels.values()
    removed, total = sum(b - a for b, a in sizes), sum(b for b, _ in sizes)
    assert removed == math.floor(0.4 * total) and len({a / b for b, a in sizes}) > 1


def test_gradual_structured_pruning_with_a_scheduler():
    """LambdaSL drives sparsity_level 0.25 -> 0.5 between steps (fine-tuning would go between them): the channels
    removed first stay removed (scores on masked weights), more go, and the shrunk module equals the masked one."""
    model, x = TinyMobileNet().eval(), torch.randn(2, 3, 16, 16)
    pruner = ChannelPruner(sparsity_level=0.5, mask_consumers=True)
    gm = pruner.prepare(model, example_inputs=x)
    scheduler = LambdaSL(pruner, lambda epoch: 0.5 if epoch == 0 else 1.0)
    pruner.step()
    first = pruner.removed_channels()
    scheduler.step()
    assert {g["sparsity_level"] for g in pruner.groups} == {0.5}
    pruner.step()
    second = pruner.removed_channels()
    assert_adds_channels(first, second)
    with torch.no_grad():
        torch.testing.assert_close(shrink(gm)(x), gm(x))


# ------------------------------------------------------------------ bad inputs
def test_bad_inputs_get_clear_errors():
    """ratio 1 (whole groups), a frozen layer named in the config, coupled layers with different ratios, no example
    inputs, a module not prepared by ChannelPruner, removing a whole or frozen group, unequal blocks."""
    model, x = TinyResNet().eval(), torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="sparsity_level must be a number in \\[0, 1\\).*whole channel groups"):
        ChannelPruner(sparsity_level=1.0)
    with pytest.raises(ValueError, match="fc.weight.*cannot shrink: reaches the model output"):
        ChannelPruner().prepare(model, ["fc"], example_inputs=x)
    with pytest.raises(ValueError, match="coupled layers share one ratio"):
        ChannelPruner().prepare(model, {"stem.0": {"sparsity_level": 0.2}, "layer1.0.conv2": {"sparsity_level": 0.5}}, example_inputs=x)
    with pytest.raises(ValueError, match="needs example_inputs"):
        ChannelPruner().prepare(model)
    with pytest.raises(ValueError, match="no channel group of Sequential can shrink .*model output"):
        ChannelPruner().prepare(nn.Sequential(nn.Linear(3, 2)), example_inputs=torch.randn(1, 3))
    with pytest.raises(ValueError, match="prepared by ChannelPruner"):
        shrink(WeightNormSparsifier().prepare(model, None))
    gm = capture(model)
    groups = find_channel_groups(gm, x)
    with pytest.raises(ValueError, match="removes all 16 channels"):
        shrunk_copy(gm, groups, {0: range(16)}, x)
    with pytest.raises(ValueError, match="group 6 cannot shrink: reaches the model output"):
        shrunk_copy(gm, groups, {6: [0]}, x)
    mobile = capture(TinyMobileNet())
    mobile_groups = find_channel_groups(mobile, x)
    with pytest.raises(ValueError, match="4 blocks .* must lose equally many"):
        shrunk_copy(mobile, mobile_groups, {0: [0, 1, 2, 3]}, x)



def test_shrink_after_squash_mask_is_refused_naming_the_order():
    """shrink(gm) after squash_mask() (the masks, and with them the removed channels, are gone): a ValueError saying
    to shrink before squashing, not an AttributeError on a missing weight_mask; the squashed module is left as it was."""
    pruner = ChannelPruner(sparsity_level=0.5)
    gm = pruner.prepare(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), example_inputs=torch.randn(2, 8))
    pruner.step()
    pruner.squash_mask()
    before = snapshot(gm)
    with pytest.raises(ValueError, match=r"shrink\(gm\) after squash_mask\(\).*call shrink\(gm\) before squash_mask"):
        shrink(gm)
    after = snapshot(gm)
    assert after["ids"] == before["ids"] and after["modules"] == before["modules"]
    assert all(torch.equal(before["state"][k], v) for k, v in after["state"].items())


# ------------------------------------------------------------------ torchvision
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_models_shrink_and_export(name):
    """resnet18 and mobilenet_v3_small (random init, 64x64): 30% of each group's channels removed, output shape kept,
    fewer MACs, exact with consumer masks, exportable."""
    models = pytest.importorskip("torchvision.models")
    model, x = _randomize_norms(getattr(models, name)()), torch.randn(1, 3, 64, 64)
    _, gm, small = _prune(model, x, sparsity_level=0.3, mask_consumers=True)
    report = shrink_report(small)
    assert report.exact and report.macs_after < 0.6 * report.macs_before
    with torch.no_grad():
        torch.testing.assert_close(small(x), gm(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.export.export(small, (x,)).module()(x), small(x))
    _check_attributes(small)


# ------------------------------------------------------------------ attention heads
@pytest.mark.parametrize("sdpa", [False, True])
def test_gqa_attention_loses_kv_heads_with_their_query_groups(sdpa):
    """Llama-style block, 8 query heads on 4 KV heads: ratio 0.5 removes 2 KV heads and their 4 query heads (q, k, v
    rows, o columns), and half the MLP; the shrunk block equals the masked one and exports."""
    from test_dependency import Block

    model, x = Block(heads=8, kv_heads=4, sdpa=sdpa).eval(), torch.randn(2, 5, 32)
    pruner, gm, small = _prune(model, x, sparsity_level=0.5, mask_consumers=True)
    report = shrink_report(small)
    attn = next(g for g in pruner.channel_groups if g.size == 4 and g.prunable)
    assert report.channels[attn.index] == (4, 2) and report.exact
    shapes = {n: tuple(small.get_parameter(f"attn.{n}.weight").shape) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert shapes == {"q_proj": (32, 32), "k_proj": (16, 32), "v_proj": (16, 32), "o_proj": (32, 32)}
    removed = pruner.removed_channels()[attn.index]
    q_mask = gm.get_buffer("attn.q_proj.weight_mask").reshape(4, 2 * 8, 32)  # [kv head, its query rows, in]
    assert not q_mask[removed].any() and q_mask[[h for h in range(4) if h not in removed.tolist()]].all()
    with torch.no_grad():
        torch.testing.assert_close(small(x), gm(x))
        torch.testing.assert_close(torch.export.export(small, (x,)).module()(x), small(x))


def test_exported_vit_shrinks_its_mlps_and_attention_heads():
    """TinyViT (captured with torch.export: ATen ops), a config naming the attention and fc1 layers: both encoder
    MLPs lose half their hidden channels and each nn.MultiheadAttention one of its 2 heads (fused in_proj thirds),
    exactly; the residual width (which the default would prune too, see test_vit_width.py) stays."""
    model, x = TinyViT().eval(), torch.randn(2, 3, 32, 32)
    pruner, gm, small = _prune(model, x, ["*.in_proj_weight", "*.linear1"], sparsity_level=0.5, mask_consumers=True)
    assert get_capture(gm).method == "export"
    assert sorted(shrink_report(small).channels.values()) == [(2, 1), (2, 1), (64, 32), (64, 32)]
    assert list(pruner.frozen.values()).count("reaches the model output through linear_8") == 1
    with torch.no_grad():
        torch.testing.assert_close(small(x), gm(x))
        torch.testing.assert_close(torch.export.export(small, (x,)).module()(x), small(x))


def test_channel_pruner_runs_its_own_prepare():
    """fx_sparsity.prepare(model, sparsifier=ChannelPruner()) is pruner.prepare (the dependency analysis runs): it needs
    example_inputs, and with them masks exactly what pruner.prepare does. The recipe's masking step alone, on a pruner
    that has no channel groups, raises saying to call pruner.prepare; a config may not set the derived
    'channel_groups'."""
    from fx_sparsity.sparsifier.preparing import mask_captured
    from passes import capture

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"ChannelPruner.prepare needs example_inputs"):
        fx_sparsity.prepare(model, sparsifier=fx_sparsity.ChannelPruner(0.5))
    via_prepare = fx_sparsity.ChannelPruner(0.5)
    gm = fx_sparsity.prepare(model, sparsifier=via_prepare, example_inputs=x)
    direct = fx_sparsity.ChannelPruner(0.5)
    reference = direct.prepare(model, example_inputs=x)
    via_prepare.step()
    direct.step()
    assert via_prepare.channel_groups == direct.channel_groups
    torch.testing.assert_close(gm.get_buffer("0.weight_mask"), reference.get_buffer("0.weight_mask"), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"prepare it with pruner.prepare\(model, config, example_inputs"):
        mask_captured(fx_sparsity.ChannelPruner(0.5), model, capture(model), None)
    with pytest.raises(ValueError, match="sets 'channel_groups', which prepare derives"):
        fx_sparsity.ChannelPruner(0.5).prepare(model, {"0": {"channel_groups": (0,)}}, example_inputs=torch.randn(2, 8))


def test_layers_outside_every_group_are_reported():
    """An nn.GRU (not followed by the dependency analysis) is named in pruner.unfollowed, and in the error when
    nothing else can shrink; TinyResNet has every parameter in some group."""
    with pytest.raises(ValueError, match=r"GRU 0: its parameters \['weight_ih_l0', .*are in no channel group"):
        ChannelPruner().prepare(nn.Sequential(nn.GRU(8, 8)), example_inputs=torch.randn(3, 1, 8))
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.GRU(8, 4))
    pruner = ChannelPruner(0.5)
    pruner.prepare(model, example_inputs=torch.randn(3, 2, 8))
    assert list(pruner.unfollowed) == ["3"] and "GRU 3" in pruner.unfollowed["3"]
    pruner = ChannelPruner(0.5)
    pruner.prepare(TinyResNet().eval(), example_inputs=torch.randn(2, 3, 16, 16))
    assert pruner.unfollowed == {}
