"""The dependency rules added to follow real architectures as far as Torch-Pruning does (issue 18): GPT-2's Conv1D
(``addmm(bias, x, W)`` with ``W`` stored ``[in, out]``) and its q/k/v split, T5's per-head position bias shared by
every layer (an ATen ``embedding`` whose columns are heads), torchvision's ``stochastic_depth``, functional and
exported ``batch_norm``/``group_norm`` (timm's ``BatchNormAct2d``), a layer scale viewed to the channel axis (timm's
ConvNeXt), ``split_with_sizes`` and one-channel broadcasts (MobileViTv2's linear attention), exported depthwise convs
(a literal ``groups``), and Swin's ``torch.fx.wrap``'ed window attention and patch merging.

Each op is reproduced on a tiny model: the shrunk module equals the channel-masked one (or is reported inexact,
with the reason) and exports with ``torch.export``; where Torch-Pruning (PyPI ``torch-pruning``) and timm are
installed, the shrunk networks are compared with Torch-Pruning's, layer by layer."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves

from fx_sparsity import shrink_report
from fx_sparsity.structured import ChannelPruner, shrink
from helpers import TinyMobileNet, TinyResNet
from passes import find_channel_groups
from passes.capturing import capture
from passes.shrink import count_macs


def _prune(model: nn.Module, x, ratio: float = 0.5, mask_consumers: bool = True, **capture_args):
    """(pruner, masked module, shrunk module) after one ``ChannelPruner`` step at ``ratio``."""
    pruner = ChannelPruner(ratio, mask_consumers=mask_consumers)
    gm = pruner.prepare(model, example_inputs=(x,), **capture_args)
    pruner.step()
    return pruner, gm, shrink(gm)


def _outputs(module: nn.Module, x) -> list[torch.Tensor]:
    with torch.no_grad():
        return [t for t in tree_leaves(module(x)) if isinstance(t, torch.Tensor)]


def _assert_shrunk_equals_masked(gm, small, x, model: nn.Module | None = None) -> None:
    """The report is exact, the shrunk module computes what the masked one does, keeps the model's output shapes,
    and its torch.export capture computes the same."""
    assert shrink_report(small).exact, shrink_report(small).inexact
    out = _outputs(small, x)
    for a, b in zip(out, _outputs(gm, x), strict=True):
        torch.testing.assert_close(a, b)
    if model is not None:
        assert [t.shape for t in out] == [t.shape for t in _outputs(model, x)]
    for a, b in zip(_outputs(torch.export.export(small, (x,)).module(), x), out, strict=True):
        torch.testing.assert_close(a, b)


def _group_of(groups, producer: str):
    return next(g for g in groups if producer in {m.target for m in g.producers})


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items() if v.dim() > 0}


def _torch_pruning(model: nn.Module, x, ratio: float = 0.5) -> nn.Module:
    """Torch-Pruning's MetaPruner (L1 group magnitude, per-layer ratio) on a copy, the classifier kept; the test
    skips here when Torch-Pruning is not installed (call it after the test's own checks)."""
    tp = pytest.importorskip("torch_pruning", reason="Torch-Pruning (PyPI torch-pruning) is not installed")
    model = copy.deepcopy(model)
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=1),
                                  pruning_ratio=ratio, ignored_layers=head)
    pruner.step()
    return model


# ------------------------------------------------------------------ GPT-2: Conv1D (x @ W) and the q/k/v split
def _gpt2(attn: str = "sdpa") -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                     use_cache=False, attn_implementation=attn, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2Model(config).eval()
    with torch.no_grad():  # transformers initialises biases to zero, which would hide the bias folds
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return model


def _tokens() -> torch.Tensor:
    return torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))


def test_gpt2_conv1d_groups_follow_the_weights_stored_in_out():
    """GPT-2 (transformers, 2 layers, 4 heads of 8, random init; torch.export): c_attn's 96 outputs split into q, k
    and v are cut into three pieces whose heads unite: one group of 4 heads per layer, c_attn.weight's dim 1 at
    offsets 0, 32 and 64 (8 entries per head), c_attn.bias alike, c_proj.weight's dim 0; the MLP's 128 channels are
    c_fc.weight's dim 1 and c_proj.weight's dim 0. The hidden width reaches the output and is frozen."""
    model, x = _gpt2(), _tokens()
    gm = capture(model, example_inputs=(x,))
    groups = find_channel_groups(gm, (x,))
    heads = _group_of(groups, "h.0.attn.c_attn.weight")
    assert heads.prunable and heads.size == 4
    rows = [(m.dim, m.offset, m.inner) for m in heads.producers]
    assert rows == [(1, 0, 8), (1, 32, 8), (1, 64, 8)]
    assert [(m.target, m.dim) for m in heads.consumers] == [("h.0.attn.c_proj.weight", 0)]
    mlp = _group_of(groups, "h.1.mlp.c_fc.weight")
    assert mlp.prunable and mlp.size == 128
    assert [(m.target, m.dim) for m in mlp.members if m.kind in ("producer", "consumer")] == [
        ("h.1.mlp.c_fc.weight", 1), ("h.1.mlp.c_proj.weight", 0)]
    width = _group_of(groups, "h.0.attn.c_proj.weight")
    assert not width.prunable and "model output" in width.frozen_reason
    assert "wte.weight" in {m.target for m in width.producers}  # the ATen embedding opens the width


@pytest.mark.parametrize("mask_consumers", [True, False])
def test_gpt2_heads_and_mlps_shrink_as_masked(mask_consumers):
    """ChannelPruner(0.5) on GPT-2: 2 of 4 heads (c_attn [32, 96] -> [32, 48], the split size 32 -> 16, the view
    sizes 96 -> 48) and half of each MLP go; the shrunk module equals the masked one and exports. Without
    mask_consumers the removed heads pass v's bias on: that constant is folded into c_proj's bias, exactly."""
    model, x = _gpt2(), _tokens()
    pruner, gm, small = _prune(model, x, mask_consumers=mask_consumers)
    shapes = _shapes(small)
    for layer in ("h.0", "h.1"):
        assert shapes[f"{layer}.attn.c_attn.weight"] == (32, 48) and shapes[f"{layer}.attn.c_attn.bias"] == (48,)
        assert shapes[f"{layer}.attn.c_proj.weight"] == (16, 32)
        assert shapes[f"{layer}.mlp.c_fc.weight"] == (32, 64) and shapes[f"{layer}.mlp.c_proj.weight"] == (64, 32)
    report = shrink_report(small)
    if not mask_consumers:
        assert {"h.0.attn.c_proj.weight", "h.1.attn.c_proj.weight"} <= set(report.folded)
    # x @ W's MACs: each output entry reads a column of the [in, out] weight, in entries.
    assert report.macs_before == 16 * 2 * (32 * 96 + 32 * 32 + 32 * 128 + 128 * 32)
    assert report.macs_after == 16 * 2 * (32 * 48 + 16 * 32 + 32 * 64 + 64 * 32)
    _assert_shrunk_equals_masked(gm, small, x, model)


def test_gpt2_eager_attention_shrinks_too():
    """GPT-2 with eager attention (matmul, a where() mask, softmax): the same heads go, shrunk equals masked."""
    model, x = _gpt2("eager"), _tokens()
    _, gm, small = _prune(model, x)
    assert _shapes(small)["h.1.attn.c_attn.weight"] == (32, 48)
    _assert_shrunk_equals_masked(gm, small, x, model)


class Conv1DMLP(nn.Module):
    """GPT-2's MLP from transformers' own Conv1D modules (16 -> 32 -> 16, random biases)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.c_fc, self.c_proj = Conv1D(32, 16), Conv1D(16, 32)
        with torch.no_grad():
            self.c_fc.bias.normal_()
            self.c_proj.bias.normal_()

    def forward(self, x):
        return self.c_proj(torch.relu(self.c_fc(x)))


def test_symbolically_traced_conv1d_rewrites_the_size_it_adds():
    """Conv1DMLP, symbolically traced: Conv1D reshapes its output to ``x.size()[:-1] + (nf,)``, a tuple added in the
    graph whose literal 32 is lowered to 16 with c_fc's rows; the removed channels' constant relu(bias) is folded
    into c_proj's bias, so the shrunk module equals the masked one (masks on producers only) and exports."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model, x = Conv1DMLP().eval(), torch.randn(2, 5, 16)
    _, gm, small = _prune(model, x, mask_consumers=False, capture_method="symbolic_trace")
    assert _shapes(small)["c_fc.weight"] == (16, 16) and _shapes(small)["c_proj.weight"] == (16, 16)
    assert shrink_report(small).folded == ("c_proj.weight",)
    _assert_shrunk_equals_masked(gm, small, x, model)


# ------------------------------------------------------------------ T5: a per-head position bias
def test_t5_position_bias_unites_every_layers_heads():
    """T5 encoder (2 layers, 4 heads of 8; torch.export): layer 0's relative position bias (an embedding with one
    column per head) is added to the scores of both layers, so the 4 heads of both layers are one group holding the
    embedding's columns; 2 heads go from q/k/v/o of every layer and from the embedding, exactly, and it exports.
    The token embedding (``shared``, tied to ``encoder.embed_tokens``) is followed under its other name."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    model, x = transformers.T5EncoderModel(config).eval(), _tokens()
    pruner, gm, small = _prune(model, x)
    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    heads = _group_of(pruner.channel_groups, bias)
    projections = {f"encoder.block.{i}.layer.0.SelfAttention.{p}.weight" for i in (0, 1) for p in "qkv"}
    assert heads.size == 4 and projections | {bias} == {m.target for m in heads.producers}
    assert "shared" not in pruner.unfollowed  # the token embedding, tied to encoder.embed_tokens, is followed
    shapes = _shapes(small)
    assert shapes[bias] == (32, 2)
    assert shapes["encoder.block.1.layer.0.SelfAttention.q.weight"] == (16, 32)
    assert shapes["encoder.block.1.layer.0.SelfAttention.o.weight"] == (32, 16)
    assert shapes["encoder.block.1.layer.1.DenseReluDense.wi.weight"] == (32, 32)
    _assert_shrunk_equals_masked(gm, small, x, model)


# ------------------------------------------------------------------ torchvision: stochastic_depth
class DepthBlock(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN -> StochasticDepth, added to the input (torchvision's residual form)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        from torchvision.ops import StochasticDepth

        self.body = nn.Sequential(nn.Conv2d(channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, channels, 1), nn.BatchNorm2d(channels))
        self.drop = StochasticDepth(0.2, "row")

    def forward(self, x):
        return x + self.drop(self.body(x))


def _stochastic_net() -> nn.Module:
    pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), DepthBlock(8), DepthBlock(8),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()


def test_stochastic_depth_keeps_the_residual_stream_prunable():
    """torchvision's stochastic_depth (symbolic tracing keeps it as one call) scales whole samples: the residual
    stream through two DepthBlocks is one prunable group, halved with both blocks' inner channels; shrunk equals
    masked, exports."""
    model, x = _stochastic_net(), torch.randn(2, 3, 8, 8)
    pruner, gm, small = _prune(model, x)
    stream = _group_of(pruner.channel_groups, "0.weight")
    assert stream.prunable and {"3.body.3.weight", "4.body.3.weight"} <= {m.target for m in stream.producers}
    assert _shapes(small)["4.body.3.weight"] == (4, 8, 1, 1) and _shapes(small)["7.weight"] == (5, 4)
    _assert_shrunk_equals_masked(gm, small, x, model)


def test_torchvision_convnext_blocks_shrink_as_torch_pruning():
    """A two-stage torchvision ConvNeXt (CNBlocks: depthwise conv, permutes, LayerNorm, MLP, layer scale,
    stochastic_depth; downsampling LayerNorm2d) pruned at 0.5 is Torch-Pruning's network, tensor for tensor; the
    report names the LayerNorms (inexact), the output shape is kept and it exports."""
    convnext = pytest.importorskip("torchvision.models.convnext")
    torch.manual_seed(0)
    setting = [convnext.CNBlockConfig(16, 32, 1), convnext.CNBlockConfig(32, None, 2)]
    model = convnext.ConvNeXt(setting, stochastic_depth_prob=0.1, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    _, gm, small = _prune(model, x)
    report = shrink_report(small)
    assert report.inexact and all("LayerNorm" in note for note in report.inexact)
    assert [t.shape for t in _outputs(small, x)] == [(1, 10)]
    torch.export.export(small, (x,))
    assert _shapes(small) == _shapes(_torch_pruning(model, x))  # last: skipped without Torch-Pruning


# ------------------------------------------------------------------ functional and exported batch/group norms
class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a BatchNorm2d subclass calling F.batch_norm on its tensors, then an activation."""

    def forward(self, x):
        return F.relu(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1,
                                   self.eps))


class NormNet(nn.Module):
    """conv -> BatchNormAct (F.batch_norm) -> conv -> F.group_norm(x, 2, w, b) -> pool -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, 8, 3, padding=1), BatchNormAct(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.gn_weight, self.gn_bias = nn.Parameter(torch.rand(8) + 0.5), nn.Parameter(torch.randn(8))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.conv2(self.bn(self.conv1(x)))
        x = F.group_norm(x, 2, self.gn_weight, self.gn_bias)
        return self.fc(x.mean((2, 3)))


def _with_statistics(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
                m.weight.normal_()
    return model.eval()


def test_functional_batch_norm_is_exact_and_group_norm_blocks_are_inexact():
    """NormNet, symbolically traced: F.batch_norm slices its four tensors and removing channels through it is
    exact; F.group_norm gives its group 2 blocks (each loses 2 of 4) and an inexact note. The shrunk module keeps
    its BatchNorm tensors and the group norm's affine at 4 channels and exports."""
    model, x = _with_statistics(NormNet()), torch.randn(2, 3, 6, 6)
    pruner, gm, small = _prune(model, x)
    bn, gn = (_group_of(pruner.channel_groups, f"{n}.weight") for n in ("conv1", "conv2"))
    assert bn.prunable and bn.blocks == 1 and not bn.inexact
    assert {"bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"} <= {m.target for m in bn.members}
    assert gn.prunable and gn.blocks == 2
    assert gn.inexact == ("GroupNorm group_norm (its statistics count every channel)",)
    assert _shapes(small)["bn.running_var"] == _shapes(small)["gn_weight"] == (4,)
    removed = pruner.removed_channels()
    assert len(removed[gn.index]) == 4 and sorted((removed[gn.index] // 4).tolist()) == [0, 0, 1, 1]
    assert [n for n in shrink_report(small).inexact if "GroupNorm" in n]
    torch.export.export(small, (x,))


def test_exported_resnet_follows_aten_batch_norm():
    """TinyResNet captured by torch.export (aten.batch_norm): every group symbolic tracing prunes is prunable here
    too, the same network comes out, and the shrunk module equals the masked one and exports."""
    model, x = _with_statistics(TinyResNet()), torch.randn(2, 3, 16, 16)
    traced = _prune(model, x)
    pruner, gm, small = _prune(model, x, capture_method="export")
    assert list(pruner.frozen) == list(traced[0].frozen) and len(pruner.frozen) == 1  # only the classifier's output
    assert _shapes(small) == _shapes(traced[2])
    _assert_shrunk_equals_masked(gm, small, x, model)


def test_exported_depthwise_convs_lower_their_literal_groups():
    """TinyMobileNet captured by torch.export: its depthwise convs are aten.conv2d calls with a literal groups
    (64 and 48), which drops with their channels (to 32 and 24); the shrunk module equals the masked one and exports.
    A grouped conv that is not depthwise (groups=4) keeps its input channels whole: its literal groups is per block
    of the stream's channels, which only the module form's attributes say how to cut."""
    model, x = _with_statistics(TinyMobileNet()), torch.randn(2, 3, 16, 16)
    pruner, gm, small = _prune(model, x, capture_method="export")
    hidden = [_group_of(pruner.channel_groups, f"blocks.{i}.expand.0.weight") for i in (0, 1)]
    assert [(g.size, g.prunable) for g in hidden] == [(64, True), (48, True)]
    assert "blocks.0.depthwise.0.weight" in {m.target for m in hidden[0].producers}
    groups = sorted(n.args[6] for n in small.graph.nodes if n.target is torch.ops.aten.conv2d.default
                    and len(n.args) > 6 and n.args[6] > 4)
    assert groups == [24, 32]
    assert any("literal groups argument" in why for why in pruner.frozen.values())
    _assert_shrunk_equals_masked(gm, small, x, model)


# ------------------------------------------------------------------ a layer scale viewed to the channel axis
class ScaledBlock(nn.Module):
    """timm ConvNeXt's layer scale ``x.mul(gamma.reshape(1, -1, 1, 1))`` and a bias ``beta.view(1, 8, 1, 1)`` with
    a literal channel count, on a residual stream."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1)
        self.gamma, self.beta = nn.Parameter(torch.rand(8) + 0.5), nn.Parameter(torch.randn(8))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        x = x + torch.tanh(self.conv(x)).mul(self.gamma.reshape(1, -1, 1, 1)) + self.beta.view(1, 8, 1, 1)
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("method", ["symbolic_trace", "export"])
def test_layer_scale_views_of_parameters_are_sliced(method):
    """ScaledBlock: gamma and beta are sliced with the residual stream and the literal 8 of beta's view is lowered
    to 4; shrunk equals masked and exports, in both captures."""
    model, x = ScaledBlock().eval(), torch.randn(2, 3, 5, 5)
    pruner, gm, small = _prune(model, x, capture_method=method)
    stream = _group_of(pruner.channel_groups, "stem.weight")
    assert stream.prunable and {"gamma", "beta"} <= {m.target for m in stream.members if m.kind == "param"}
    assert _shapes(small)["gamma"] == _shapes(small)["beta"] == (4,)
    _assert_shrunk_equals_masked(gm, small, x, model)


# ------------------------------------------------------------------ splits inside a channel space
class LinearAttention(nn.Module):
    """MobileViTv2's separable self-attention: a 1x1 conv to 1 + 2d channels split with sizes [1, d, d] into query,
    key and value; softmax of the query over the patches, its one channel broadcast across the key's, summed, then
    ``relu(value) * context.expand_as(value)`` into an output conv."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.d, self.qkv, self.out = d, nn.Conv2d(d, 1 + 2 * d, 1), nn.Conv2d(d, d, 1)
        self.stem, self.fc = nn.Conv2d(3, d, 1), nn.Linear(d, 3)

    def forward(self, x):
        x = self.stem(x)
        query, key, value = self.qkv(x).split([1, self.d, self.d], dim=1)
        scores = F.softmax(query, dim=-1)
        context = (key * scores).sum(dim=-1, keepdim=True)
        return self.fc(self.out(F.relu(value) * context.expand_as(value)).mean((2, 3)))


@pytest.mark.parametrize("method", ["symbolic_trace", "export"])
def test_split_with_sizes_cuts_the_producer_into_pieces(method):
    """LinearAttention: qkv's 17 channels are cut into pieces of 1, 8 and 8: the query's one channel is frozen (it
    is broadcast), key and value are one group of 8 (multiplied together) with qkv rows at offsets 1 and 9 and
    their sizes in the split's list; 4 go, the split becomes [1, 4, 4]; shrunk equals masked, exports."""
    model, x = LinearAttention().eval(), torch.randn(2, 3, 4, 5)
    pruner, gm, small = _prune(model, x, capture_method=method)
    pieces = [g for g in pruner.channel_groups if "qkv.weight" in {m.target for m in g.producers}]
    assert [(g.size, g.prunable) for g in pieces] == [(1, False), (8, True)]
    assert "broadcasts its one channel" in pieces[0].frozen_reason
    assert [m.offset for m in pieces[1].producers] == [1, 9]
    assert [m.offset for m in pieces[1].members if m.kind == "literal"] == [1, 2]
    assert _shapes(small)["qkv.weight"] == (9, 4, 1, 1)
    _assert_shrunk_equals_masked(gm, small, x, model)


class EqualPieces(nn.Module):
    """A gated unit ``a * sigmoid(b)`` from ``chunk(2)``, and ``split(x, 6)`` into two pieces added together."""

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.mix = nn.Linear(5, 16), nn.Linear(8, 12)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        a, b = self.gate(x).chunk(2, dim=-1)
        c, d = torch.split(self.mix(a * torch.sigmoid(b)), 6, dim=-1)
        return self.fc(torch.relu(c) + d)


def test_equal_pieces_of_chunk_and_split_are_one_group():
    """EqualPieces: chunk(2) and split(x, 6) must give equal pieces, so each pair of pieces is one group (gate
    rows c and 8 + c go together); split's size 6 is a literal lowered to 3; shrunk equals masked, exports."""
    model, x = EqualPieces().eval(), torch.randn(4, 5)
    pruner, gm, small = _prune(model, x)
    gate, mix = (_group_of(pruner.channel_groups, f"{n}.weight") for n in ("gate", "mix"))
    assert (gate.size, mix.size) == (8, 6) and gate.prunable and mix.prunable
    assert [m.offset for m in gate.producers] == [0, 8] and [m.offset for m in mix.producers] == [0, 6]
    assert _shapes(small)["gate.weight"] == (8, 5) and _shapes(small)["mix.weight"] == (6, 4)
    _assert_shrunk_equals_masked(gm, small, x, model)


# ------------------------------------------------------------------ torchvision Swin: torch.fx.wrap'ed functions
def _swin(width: int = 16) -> nn.Module:
    swin = pytest.importorskip("torchvision.models.swin_transformer")
    torch.manual_seed(0)
    return swin.SwinTransformer(patch_size=[4, 4], embed_dim=width, depths=[2, 2], num_heads=[2, 4],
                                window_size=[4, 4], stochastic_depth_prob=0.1, num_classes=10).eval()


def test_swin_window_attention_and_patch_merging_are_followed():
    """A two-stage torchvision Swin-T (embed 16, heads 2 and 4, window 4; symbolic tracing keeps
    shifted_window_attention and _patch_merging_pad as calls): each stage's width is one group holding its blocks'
    qkv rows (three thirds) and proj columns, in as many blocks as heads; patch merging reads the width four times
    (LayerNorm and reduction at offsets 0, 16, 32, 48). Halving the widths keeps every head (8 and 16 channels of 2
    and 4 heads), is reported inexact for the attention scale and the LayerNorms, keeps the output shape, exports,
    and gives a module whose tensors load into torchvision's Swin of half the width, computing the same."""
    model, x = _swin(), torch.randn(1, 3, 32, 32)
    pruner, gm, small = _prune(model, x)
    stage = _group_of(pruner.channel_groups, "features.0.0.weight")
    assert stage.prunable and stage.blocks == 2
    qkv = [(m.offset, m.dim) for m in stage.members if m.target == "features.1.0.attn.qkv.weight"]
    assert sorted(qkv) == [(0, 0), (0, 1), (16, 0), (32, 0)]
    assert [m.offset for m in stage.members if m.target == "features.2.reduction.weight"] == [0, 16, 32, 48]
    inexact = shrink_report(small).inexact
    assert any("scales q by (C // num_heads) ** -0.5" in note for note in inexact)
    assert any("LayerNorm features.2.norm" in note for note in inexact)
    assert [t.shape for t in _outputs(small, x)] == [(1, 10)]
    torch.export.export(small, (x,))
    half = _swin(width=8)
    half.load_state_dict(small.state_dict())
    torch.testing.assert_close(_outputs(half, x), _outputs(small, x))


def test_swin_macs_count_the_projections_inside_the_window_attention():
    """count_macs of the symbolically traced Swin (its q/k/v and output projections inside the wrapped call) equals
    that of its torch.export capture, where they are plain linear ops (no window is padded at 32x32)."""
    model, x = _swin(), torch.randn(1, 3, 32, 32)
    assert count_macs(capture(model), x) == count_macs(capture(model, example_inputs=(x,), method="export"), x)


# ------------------------------------------------------------------ timm's test models against Torch-Pruning
@pytest.mark.parametrize("name", ["test_efficientnet", "test_convnext", "test_efficientnet_gn"])
def test_timm_models_shrink_as_torch_pruning(name):
    """timm's tiny test models (EfficientNet with BatchNormAct2d's F.batch_norm, squeeze-excitation and DropPath;
    ConvNeXt with its layer scale ``gamma.reshape(1, -1, 1, 1)``; EfficientNet with GroupNorm) pruned at 0.5 are
    Torch-Pruning's networks, tensor for tensor; the BatchNorm one equals its masked module, the others report their
    norms inexact; all keep the output shape and export."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model, x = timm.create_model(name, num_classes=10).eval(), torch.randn(1, 3, 64, 64)
    _, gm, small = _prune(model, x)
    if name == "test_efficientnet":
        _assert_shrunk_equals_masked(gm, small, x, model)
    else:
        assert all("Norm" in note for note in shrink_report(small).inexact) and shrink_report(small).inexact
        assert [t.shape for t in _outputs(small, x)] == [(1, 10)]
        torch.export.export(small, (x,))
    assert _shapes(small) == _shapes(_torch_pruning(model, x))  # last: skipped without Torch-Pruning
