"""Tiny models and the one numerics helper the tests share."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.ao.pruning import BaseSparsifier as AOBaseSparsifier

from fx_sparsity import BaseSparsifier
from passes.shrink import ShrinkReport, compare_shrunk, plan_shrink, remove_channels

__all__ = [
    "SimpleLinear",
    "MixedNet",
    "ConvNet1d3d",
    "ControlFlowNet",
    "LinearNet",
    "PointwiseConvNet",
    "TiedEmbeddingNet",
    "TinyResNet",
    "TinyMobileNet",
    "TinyViT",
    "ThreeLinear",
    "tiny_causal_lm",
    "CAUSAL_LMS",
    "ImplementedSparsifier",
    "AOImplementedSparsifier",
    "MockSparseLinear",
    "masked_reference",
    "tiny_hf_model",
    "token_batch",
    "check_against_eager",
    "count_nodes",
    "snapshot",
    "shrunk_copy",
    "grid_reference",
    "to_grid_reference",
    "correlated_inputs",
]


class SimpleLinear(nn.Module):
    """torch.ao.pruning's test model: Linears without bias, some inside a Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(nn.Linear(7, 5, bias=False), nn.Linear(5, 6, bias=False), nn.Linear(6, 4, bias=False))
        self.linear1 = nn.Linear(4, 4, bias=False)
        self.linear2 = nn.Linear(4, 10, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.linear1(self.seq(x)))


class MixedNet(nn.Module):
    """A Conv, a reflect-padded Conv, a Linear used twice, a tied Linear and a functional F.linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_reflect = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect", bias=False)
        self.fc = nn.Linear(8, 12)
        self.shared = nn.Linear(12, 12)
        self.tied = nn.Linear(12, 12, bias=False)
        self.tied.weight = self.shared.weight
        self.head_weight = nn.Parameter(torch.randn(5, 12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x))
        x = self.conv_reflect(x).mean(dim=(2, 3))
        x = torch.tanh(self.fc(x))
        x = torch.tanh(self.shared(x))
        x = torch.tanh(self.shared(x))
        x = self.tied(x)
        return F.linear(x, self.head_weight)


class ConvNet1d3d(nn.Module):
    """Conv1d and Conv3d (with stride, dilation, groups) called as modules."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 3, stride=2, dilation=2, groups=2, padding_mode="circular", padding=2)
        self.c3 = nn.Conv3d(2, 4, (2, 3, 3), padding="same")

    def forward(self, x1: torch.Tensor, x3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.c1(x1), self.c3(x3)


class ControlFlowNet(nn.Module):
    """Shape-dependent Python control flow: symbolic tracing fails, torch.export works."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1:
            x = x * 2
        return self.fc2(torch.relu(self.fc1(x)))


class LinearNet(nn.Module):
    """Two Linears with shapes that 16x16 and 32x32 blocks divide."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 96, bias=bias)
        self.fc2 = nn.Linear(96, 32, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class PointwiseConvNet(nn.Module):
    """1x1 convs (1d, 2d with and without bias, 3d), a 3x3 conv, a strided 1x1 conv and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.pw1d = nn.Conv1d(16, 16, 1)
        self.pw = nn.Conv2d(16, 32, 1)
        self.conv = nn.Conv2d(32, 32, 3, padding=1)
        self.strided = nn.Conv2d(32, 32, 1, stride=2, bias=False)
        self.pw3d = nn.Conv3d(32, 16, 1)
        self.head = nn.Linear(16, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        x = self.pw1d(x.flatten(2)).view(n, c, h, w)
        x = self.strided(torch.relu(self.conv(torch.relu(self.pw(x)))))
        x = self.pw3d(x.unsqueeze(2)).squeeze(2)
        return self.head(x.mean(dim=(2, 3)))


class TiedEmbeddingNet(nn.Module):
    """A language-model head whose weight is tied to the input embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.proj = nn.Linear(32, 32)
        self.head = nn.Linear(32, 64, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.proj(self.embed(tokens))))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.downsample(x))


class TinyResNet(nn.Module):
    """ResNet-18's structure in miniature: stem, BasicBlocks with BatchNorm, strided 1x1 shortcuts, pool, fc."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = nn.Sequential(_BasicBlock(16, 16, 1), _BasicBlock(16, 16, 1))
        self.layer2 = nn.Sequential(_BasicBlock(16, 32, 2), _BasicBlock(32, 32, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class _InvertedResidual(nn.Module):
    def __init__(self, channels: int, expand: int) -> None:
        super().__init__()
        hidden = channels * expand
        self.expand = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.Hardswish())
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.Hardswish()
        )
        self.se_reduce = nn.Conv2d(hidden, hidden // 4, 1)
        self.se_expand = nn.Conv2d(hidden // 4, hidden, 1)
        self.project = nn.Sequential(nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.depthwise(self.expand(x))
        scale = F.hardsigmoid(self.se_expand(torch.relu(self.se_reduce(F.adaptive_avg_pool2d(h, 1)))))
        return x + self.project(h * scale)


class TinyMobileNet(nn.Module):
    """MobileNetV3-small's building blocks: depthwise and grouped convs, squeeze-excitation, hardswish."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.blocks = nn.Sequential(_InvertedResidual(16, 4), _InvertedResidual(16, 3))
        self.grouped = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.classifier = nn.Sequential(nn.Linear(32, 64), nn.Hardswish(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.grouped(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class TinyViT(nn.Module):
    """ViT-B/16's structure in miniature: patch-embedding conv, class token, position embedding,
    nn.TransformerEncoder layers (MultiheadAttention + MLP), head."""

    def __init__(self, image: int = 32, patch: int = 8, dim: int = 32, depth: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, 2, dim * 2, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.encoder(x))[:, 0])


class ThreeLinear(nn.Module):
    """Three Linears (24 -> 48 -> 40 -> 8) with ReLUs between them."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(24, 48), nn.Linear(48, 40), nn.Linear(40, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


# transformers causal LMs from small configs (random weights, nothing downloaded): hidden 64, 2 layers, vocab 128.
CAUSAL_LMS = ("llama", "qwen2", "gpt2")


def tiny_causal_lm(name: str, *, tie_word_embeddings: bool = False) -> nn.Module:
    """A transformers ``LlamaForCausalLM`` (grouped-query attention: 4 heads, 2 KV heads), ``Qwen2ForCausalLM``
    (likewise, with q/k/v biases) or ``GPT2LMHeadModel`` (``Conv1D`` layers, head tied to the embedding), in eval
    mode; seeded."""
    import pytest

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(vocab_size=128, use_cache=False, bos_token_id=0, eos_token_id=None, pad_token_id=0)
    if name == "gpt2":
        config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, **common)
        return transformers.GPT2LMHeadModel(config).eval()
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie_word_embeddings)
    if name == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**sizes, **common)).eval()
    if name == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**sizes, **common)).eval()
    raise ValueError(f"name must be one of {CAUSAL_LMS}, got {name!r}")


class ImplementedSparsifier(BaseSparsifier):
    """torch.ao.pruning's test sparsifier on our API: zero row 0 of each mask."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(defaults=kwargs)

    def update_mask(self, module: nn.Module, tensor_name: str, **kwargs: Any) -> None:
        self.get_mask(module, tensor_name)[0] = 0


class AOImplementedSparsifier(AOBaseSparsifier):
    """The same, on torch.ao.pruning, for differential tests."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(defaults=kwargs)

    def update_mask(self, module: nn.Module, tensor_name: str, **kwargs: Any) -> None:
        module.parametrizations[tensor_name][0].mask[0] = 0


class MockSparseLinear(nn.Linear):
    """A Linear of another type with ``from_dense``, to check ``convert``."""

    @classmethod
    def from_dense(cls, mod: nn.Linear) -> MockSparseLinear:
        new = cls(mod.in_features, mod.out_features, bias=mod.bias is not None)
        with torch.no_grad():
            new.weight.copy_(mod.weight)
            if mod.bias is not None:
                new.bias.copy_(mod.bias)
        return new


def masked_reference(model: nn.Module, gm: fx.GraphModule, sparsifier: BaseSparsifier) -> nn.Module:
    """An eager copy of ``model`` whose selected weights are multiplied by the masks of ``gm``."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for group in sparsifier.groups:
            mask = gm.get_buffer(f"{group['tensor_fqn']}_mask")
            reference.get_parameter(group["tensor_fqn"]).mul_(mask)
    return reference


def tiny_hf_model(kind: str, device: str = "cpu", seed: int = 0, **overrides: Any) -> nn.Module:
    """A randomly initialised transformers causal LM from a tiny config (hidden 64, 2 layers, vocab 128, 4 heads,
    2 KV heads where the architecture has them), in eval mode, with the config's defaults otherwise (``use_cache``
    on); ``kind`` is ``"llama"``, ``"gpt2"`` or ``"qwen2"``. GPT-2's head is untied (a tied head masks the
    embedding too). Built on ``device`` (``"meta"``: no weight memory), seeded (the global RNG is left as it was).
    Skips the test without transformers."""
    import pytest

    transformers = pytest.importorskip("transformers")
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                         bos_token_id=0, eos_token_id=0, tie_word_embeddings=False, **overrides)
        cls = transformers.GPT2LMHeadModel
    else:
        configs = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                   "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}
        config_cls, cls = configs[kind]
        config = config_cls(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **overrides)
    with torch.random.fork_rng(), torch.device(device):
        torch.manual_seed(seed)
        return cls(config).eval()


def token_batch(batch: int, length: int, padding: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """What a tokenizer returns with ``padding=True``: ``input_ids`` ``[batch, length]`` (vocabulary 128) and an
    ``attention_mask`` whose first sequence ends in ``padding`` padded positions (zeros)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length - padding:] = 0
    ids[0, length - padding:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def check_against_eager(gm: fx.GraphModule, reference: nn.Module, *inputs: torch.Tensor) -> None:
    """Lint ``gm``'s graph and check its outputs equal ``reference``'s on ``inputs``."""
    gm.graph.lint()
    torch.testing.assert_close(gm(*inputs), reference(*inputs))


def count_nodes(gm: fx.GraphModule) -> dict[tuple[str, object], int]:
    """Count nodes by (op, target)."""
    counts: dict[tuple[str, object], int] = {}
    for node in gm.graph.nodes:
        counts[(node.op, node.target)] = counts.get((node.op, node.target), 0) + 1
    return counts


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything a pass must leave alone on the user's model."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "ids": {k: id(v) for k, v in model.state_dict(keep_vars=True).items()},
        "modules": {k: (type(m), id(m), sorted(vars(m).get("_buffers", {}))) for k, m in model.named_modules()},
        "attrs": {k: sorted(vars(m)) for k, m in model.named_modules()},
    }


def assert_adds_channels(first: dict, second: dict, strictly: bool = True) -> None:
    """Gradual structured pruning only adds: every channel ``removed_channels()`` gave after the first step is
    removed after the second, and (``strictly``) the second removes more in all."""
    assert all(set(first[i].tolist()) <= set(second[i].tolist()) for i in first)
    if strictly:
        assert sum(len(c) for c in second.values()) > sum(len(c) for c in first.values())


def shrunk_copy(gm: fx.GraphModule, groups: Any, removed: Any, example_inputs: Any) -> tuple[fx.GraphModule, ShrinkReport]:
    """``gm`` without the ``removed`` channels, as a deep copy sharing no tensor with it, and its report: the
    passes.shrink steps (plan, remove, compare) the structured tests run; ``gm`` is not modified."""
    plan = plan_shrink(gm, groups, removed, example_inputs)
    small = remove_channels(copy.deepcopy(gm), plan)
    return small, compare_shrunk(gm, small, plan)


def grid_reference(values: torch.Tensor, spec: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The documented scale rule of fx_sparsity.quantization, written out plainly: the scale (and zero point) of
    each row of ``values`` (``[..., k]``, pruned entries already zero). Symmetric: ``max|v| / qmax``; zero point:
    ``(max(v, 0) - min(v, 0)) / 15`` and ``round(-min / scale)``; an all-zero row gets scale 1 (zero point 0);
    scales are at least float32's smallest normal number."""
    v = values.double()
    tiny = torch.finfo(torch.float32).tiny
    if spec.zero_point:
        low, high = v.min(-1).values.clamp(max=0), v.max(-1).values.clamp(min=0)
        scale = ((high - low) / spec.qmax).clamp(min=tiny)
        scale[high == low] = 1.0
        scale = scale.float()
        return scale, torch.round((0.0 - low).float() / scale).clamp(0, spec.qmax)
    amax = v.abs().max(-1).values
    scale = (amax / spec.qmax).clamp(min=tiny)
    scale[amax == 0] = 1.0
    return scale.float(), None


def to_grid_reference(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: Any) -> torch.Tensor:
    """IST-DASLab's ``quantize(x, scale, zero, maxq) = scale * (clamp(round(x / scale) + zero, 0, maxq) - zero)`` on
    fx_sparsity's grids (a symmetric grid is zero = qmax, maxq = 2 qmax), in ``x``'s dtype."""
    zero = torch.full_like(scale, spec.qmax) if zero is None else zero
    maxq = spec.qmax if spec.zero_point else 2 * spec.qmax
    scale, zero = scale.to(x.dtype), zero.to(x.dtype)
    return scale * (torch.clamp(torch.round(x / scale) + zero, 0, maxq) - zero)


def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated channels of very different scales (what makes OBS updates matter)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    scale = torch.logspace(-1, 1, d)[torch.randperm(d, generator=g)]
    return (torch.randn(n, d, generator=g) @ mix) * scale


def native_isas(candidates: Sequence[str]) -> list[str]:
    """Those of ``candidates`` (ISA names of the C++ kernels' ``isa`` operator) this CPU runs; none without the
    kernels. The active ISA is reset to ``"auto"``."""
    from passes.lowering import native

    ops = native.native_ops()
    if ops is None:
        return []
    found = []
    for isa in candidates:
        try:
            ops.isa(isa)
            found.append(isa)
        except RuntimeError:  # this CPU lacks it
            pass
    ops.isa("auto")
    return found


def forced_kernel_path(path: str, monkeypatch: Any) -> Iterator[str]:
    """The body of the kernel tests' ``path`` fixtures: run on one ISA of the C++ kernels (forced with the ``isa``
    operator, reset to ``"auto"`` after) or, for ``"reference"``, on the pure-torch path (``FX_SPARSITY_NO_NATIVE``)."""
    from passes.lowering import native

    if path == "reference":
        monkeypatch.setenv(native.NO_NATIVE_ENV, "1")
        yield path
        return
    ops = native.native_ops()
    ops.isa(path)
    yield path
    ops.isa("auto")
