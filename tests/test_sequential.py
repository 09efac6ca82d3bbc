"""prune_sequential: block-by-block calibration and pruning (passes/calibration/stages.py, fx_sparsity/calibration/sequential.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fx_sparsity import MagnitudeSparsifier, WandaSparsifier, get_sparsifier, prepare
from fx_sparsity.calibration import calibrate, prune_sequential
from fx_sparsity.levels import set_owl_levels
from fx_sparsity.sparsifier import SparseGPTSparsifier
from helpers import TinyResNet, snapshot
from passes.calibration import find_blocks, match_blocks, plan_stages

# ---------------------------------------------------------------- models


class _Block(nn.Module):
    def __init__(self, d: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    """Token embedding, ``layers`` pre-norm blocks in a Sequential, a final LayerNorm and a head."""

    def __init__(self, layers: int = 3, d: int = 16, vocab: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.Sequential(*[_Block(d) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.blocks(self.embed(tokens))))


def _gpt(layers: int = 3) -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(layers).eval()


def _batches(count: int = 3, vocab: int = 32) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (2, 8), generator=generator) for _ in range(count)]


def _llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_cache=False,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


SPARSIFIERS = {
    "wanda": lambda level: WandaSparsifier(level),
    "sparsegpt": lambda level: SparseGPTSparsifier(level, block_size=16),
    "magnitude": lambda level: MagnitudeSparsifier(level),
}


def _key(sparsifier) -> str:
    return getattr(sparsifier, "calibration_key", "input_norm")


def _masks(gm, sparsifier) -> dict[str, torch.Tensor]:
    return {g["tensor_fqn"]: gm.get_buffer(g["tensor_fqn"] + "_mask").clone() for g in sparsifier.groups}


# ---------------------------------------------------------------- nothing pruned: equal to calibrate


@pytest.mark.parametrize("name", sorted(SPARSIFIERS))
def test_level_zero_equals_whole_model_calibration(name):
    """TinyGPT (3 blocks + head), sparsity 0: every weight's statistic equals calibrate's, masks stay all ones and
    the module computes what the whole-model calibrated one does."""
    model, batches = _gpt(), _batches()
    sequential = SPARSIFIERS[name](0.0)
    gm = prepare(model, sparsifier=sequential)
    report = prune_sequential(gm, batches, keep_statistics=True, progress_bar=False)
    whole = SPARSIFIERS[name](0.0)
    reference = prepare(model, sparsifier=whole)
    statistics = calibrate(reference, batches, progress_bar=False)
    whole.step()
    assert report.blocks == ("(before blocks.0)", "blocks.0", "blocks.1", "blocks.2", "(after blocks.2)")
    assert set(statistics) == {g["tensor_fqn"] for g in sequential.groups}
    for fqn, statistic in statistics.items():
        torch.testing.assert_close(sequential.state[fqn][_key(sequential)], statistic)
    for fqn, mask in _masks(gm, sequential).items():
        assert mask.all(), fqn
    with torch.no_grad():
        for x in batches:
            torch.testing.assert_close(gm(x), reference(x))
            torch.testing.assert_close(gm(x), model(x))


@pytest.mark.parametrize("name", ["wanda", "sparsegpt"])
def test_padding_is_left_out_as_calibrate_does(name):
    """Token masks reach each stage's observers: at sparsity 0 the statistics equal calibrate's with the same
    token_mask, and differ from those counting the padded positions."""
    model, batches = _gpt(), _batches()
    masks = {id(b): (torch.arange(8) < torch.tensor([[8], [5]])).long() for b in batches}
    token_mask = lambda batch: masks[id(batch)]  # noqa: E731
    sequential = SPARSIFIERS[name](0.0)
    gm = prepare(model, sparsifier=sequential)
    prune_sequential(gm, batches, keep_statistics=True, token_mask=token_mask, progress_bar=False)
    masked = calibrate(prepare(model, sparsifier=SPARSIFIERS[name](0.0)), batches, token_mask=token_mask, progress_bar=False)
    full = calibrate(prepare(model, sparsifier=SPARSIFIERS[name](0.0)), batches, progress_bar=False)
    for fqn, statistic in masked.items():
        torch.testing.assert_close(sequential.state[fqn][_key(sequential)], statistic)
        assert not torch.allclose(statistic, full[fqn])
    with pytest.raises(TypeError, match="token_mask must be a key"):
        prune_sequential(prepare(model, sparsifier=SPARSIFIERS[name](0.5)), batches, token_mask=3, progress_bar=False)


@pytest.mark.parametrize("name", ["wanda", "sparsegpt"])
def test_exported_llama_level_zero_equals_whole_model_calibration(name):
    """transformers Llama (2 decoder layers) captured with torch.export: the blocks are found from the nodes'
    nn_module_stack, keyword batches work, and at sparsity 0 the statistics equal whole-model calibrate's."""
    model, batches = _llama(), _batches(vocab=64)
    sequential = SPARSIFIERS[name](0.0)
    gm = prepare(model, sparsifier=sequential, example_inputs=(batches[0],), capture_method="export")
    report = prune_sequential(gm, [{"input_ids": b} for b in batches], keep_statistics=True, progress_bar=False)
    assert report.blocks == ("(before model.layers.0)", "model.layers.0", "model.layers.1", "(after model.layers.1)")
    assert report.stages[-1].tensor_fqns == ("lm_head.weight",)
    whole = SPARSIFIERS[name](0.0)
    reference = prepare(model, sparsifier=whole, example_inputs=(batches[0],), capture_method="export")
    statistics = calibrate(reference, batches, progress_bar=False)
    for fqn, statistic in statistics.items():
        torch.testing.assert_close(sequential.state[fqn][_key(sequential)], statistic)
    with torch.no_grad():
        torch.testing.assert_close(gm(batches[0]).logits, model(batches[0]).logits)


# ---------------------------------------------------------------- pruning: later blocks see earlier pruning


def _eager_statistics(model: nn.Module, modules: dict[str, nn.Module], batches, key: str) -> dict[str, torch.Tensor]:
    """Input norms or Hessians of ``modules`` (weight FQN -> Linear) recorded with forward pre-hooks on eager ``model``."""
    sums: dict[str, torch.Tensor] = {}

    def hook(fqn):
        def record(module, args):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            value = x.square().sum(0) if key == "input_norm" else (x.T @ x).unsqueeze(0)
            sums[fqn] = value if fqn not in sums else sums[fqn] + value
        return record

    handles = [m.register_forward_pre_hook(hook(fqn)) for fqn, m in modules.items()]
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for h in handles:
            h.remove()
    return {f: (s.sqrt().float() if key == "input_norm" else s) for f, s in sums.items()}


@pytest.mark.parametrize("name", ["wanda", "sparsegpt"])
def test_block_statistics_equal_eager_model_with_earlier_blocks_pruned(name):
    """TinyGPT, 50%: block k's statistics (and the head's) equal those of an eager copy of the model whose
    blocks before k carry the final pruned (and, for SparseGPT, updated) weights; for k >= 1 they differ from
    the dense model's, so the check has teeth."""
    model, batches = _gpt(), _batches()
    sparsifier = SPARSIFIERS[name](0.5)
    gm = prepare(model, sparsifier=sparsifier)
    report = prune_sequential(gm, batches, keep_statistics=True, progress_bar=False)
    key = _key(sparsifier)
    stage_fqns = [s.tensor_fqns for s in report.stages if s.tensor_fqns]
    assert len(stage_fqns) == 4  # three blocks and the head
    for k, fqns in enumerate(stage_fqns):
        reference = copy.deepcopy(model)
        for earlier in stage_fqns[:k]:
            for fqn in earlier:
                pruned = gm.get_parameter(fqn) * gm.get_buffer(fqn + "_mask")
                reference.get_parameter(fqn).data.copy_(pruned)
        modules = {f: reference.get_submodule(f.rpartition(".")[0]) for f in fqns}
        expected = _eager_statistics(reference, modules, batches, key)
        dense = _eager_statistics(model, {f: model.get_submodule(f.rpartition(".")[0]) for f in fqns}, batches, key)
        for fqn in fqns:
            torch.testing.assert_close(sparsifier.state[fqn][key], expected[fqn])
            if k:
                assert not torch.allclose(sparsifier.state[fqn][key], dense[fqn]), fqn
    for g in sparsifier.groups:
        mask = gm.get_buffer(g["tensor_fqn"] + "_mask")
        assert mask.float().mean().item() == pytest.approx(0.5, abs=0.02), g["tensor_fqn"]


def test_exported_llama_layer_statistics_equal_eager_model_with_earlier_layers_pruned():
    """transformers Llama captured with torch.export, SparseGPT 50%: layer 1's input Hessians (and lm_head's)
    equal those of the eager Llama whose earlier layers carry the pruned, updated weights."""
    model, batches = _llama(), _batches(vocab=64)
    sparsifier = SPARSIFIERS["sparsegpt"](0.5)
    gm = prepare(model, sparsifier=sparsifier, example_inputs=(batches[0],), capture_method="export")
    report = prune_sequential(gm, batches, keep_statistics=True, progress_bar=False)
    stage_fqns = [s.tensor_fqns for s in report.stages if s.tensor_fqns]
    assert len(stage_fqns) == 3
    for k in (1, 2):
        reference = copy.deepcopy(model)
        for fqn in [f for earlier in stage_fqns[:k] for f in earlier]:
            reference.get_parameter(fqn).data.copy_(gm.get_parameter(fqn) * gm.get_buffer(fqn + "_mask"))
        modules = {f: reference.get_submodule(f.rpartition(".")[0]) for f in stage_fqns[k]}
        expected = _eager_statistics(reference, modules, batches, "input_hessian")
        for fqn in stage_fqns[k]:
            torch.testing.assert_close(sparsifier.state[fqn]["input_hessian"], expected[fqn])


@pytest.mark.parametrize("name", sorted(SPARSIFIERS))
def test_released_statistics_prune_as_kept_ones(name):
    """By default each statistic is released as its weight is stepped (SparseGPT: one weight of the block at a
    time, its Hessian factorised in its own memory): masks and weights are bit for bit those of
    keep_statistics=True, and no statistic is left in the state."""
    model, batches = _gpt(), _batches()
    states = []
    for keep in (True, False):
        sparsifier = SPARSIFIERS[name](0.5)
        gm = prepare(model, sparsifier=sparsifier)
        prune_sequential(gm, batches, keep_statistics=keep, progress_bar=False)
        state = sparsifier.state
        held = [g["tensor_fqn"] for g in sparsifier.groups if _key(sparsifier) in state.get(g["tensor_fqn"], {})]
        assert len(held) == (len(sparsifier.groups) if keep else 0)
        states.append(gm.state_dict())
    kept, released = states
    assert kept.keys() == released.keys()
    for k, v in kept.items():
        assert torch.equal(v, released[k]), k
    assert any(not v.all() for k, v in released.items() if k.endswith("_mask"))


def test_magnitude_masks_equal_whole_model_step():
    """Magnitude ignores statistics: pruning block by block gives the masks one step() gives."""
    model, batches = _gpt(), _batches()
    sequential, whole = MagnitudeSparsifier(0.5), MagnitudeSparsifier(0.5)
    gm, reference = prepare(model, sparsifier=sequential), prepare(model, sparsifier=whole)
    prune_sequential(gm, batches, progress_bar=False)
    whole.step()
    expected = _masks(reference, whole)
    for fqn, mask in _masks(gm, sequential).items():
        torch.testing.assert_close(mask, expected[fqn])


def test_owl_levels_set_before_are_kept():
    """OWL composes by levels: calibrate + set_owl_levels on the dense model, then prune_sequential prunes each
    layer at the level OWL gave it (levels differ between layers)."""
    model, batches = _gpt(), _batches()
    sparsifier = WandaSparsifier(0.5)
    gm = prepare(model, sparsifier=sparsifier)
    calibrate(gm, batches, progress_bar=False)
    levels = set_owl_levels(gm, 0.5, m=2.0, lam=0.2)
    assert len(set(levels.values())) > 1
    prune_sequential(gm, batches, progress_bar=False)
    for g in sparsifier.groups:
        mask = gm.get_buffer(g["tensor_fqn"] + "_mask")
        row = mask.shape[1]
        assert 1 - mask.float().mean().item() == pytest.approx(round(levels[g["tensor_fqn"]] * row) / row)


# ---------------------------------------------------------------- memory


@pytest.mark.parametrize("layers", [2, 5])
def test_memory_is_one_block_whatever_the_depth(layers):
    """TinyGPT with 2 or 5 blocks, SparseGPT: each block stage holds exactly the hidden states of all batches
    (batch x tokens x d float32) in and out, and its own four Hessians; none stay in state afterwards; the
    peak does not grow with depth."""
    model, batches = _gpt(layers), _batches()
    sparsifier = SparseGPTSparsifier(0.5, block_size=16)
    gm = prepare(model, sparsifier=sparsifier)
    report = prune_sequential(gm, batches, progress_bar=False)
    hidden = sum(x.numel() for x in batches) * 16 * 4
    columns = [16, 16, 16, 32]  # qkv, proj, fc1, fc2 inputs
    hessians = sum(c * c * 8 for c in columns)
    blocks = [s for s in report.stages if s.name.startswith("blocks.")]
    assert len(blocks) == layers
    for stage in blocks:
        assert (stage.input_bytes, stage.output_bytes, stage.statistic_bytes) == (hidden, hidden, hessians)
    head = report.stages[-1]
    assert head.tensor_fqns == ("head.weight",) and head.statistic_bytes == 16 * 16 * 8
    assert report.peak_bytes == 2 * hidden + hessians
    assert all("input_hessian" not in sparsifier.state[g["tensor_fqn"]] for g in sparsifier.groups)


# ---------------------------------------------------------------- blocks


def test_resnet_blocks_found_and_batchnorm_untouched():
    """TinyResNet: the four BasicBlocks are the blocks (the stem and fc run before/after); the user's model,
    BatchNorm statistics included, is unchanged, and at sparsity 0 the output is the model's."""
    model = TinyResNet().eval()
    before = snapshot(model)
    batches = [torch.randn(2, 3, 8, 8) for _ in range(2)]
    sparsifier = WandaSparsifier(0.0)
    gm = prepare(model, sparsifier=sparsifier)
    report = prune_sequential(gm, batches, progress_bar=False)
    assert report.blocks == ("(before layer1.0)", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "(after layer2.1)")
    assert report.stages[0].tensor_fqns == ("stem.0.weight",)
    with torch.no_grad():
        torch.testing.assert_close(gm(batches[0]), model(batches[0]))
    after = snapshot(model)
    assert after["ids"] == before["ids"] and after["modules"] == before["modules"] and after["attrs"] == before["attrs"]
    for k, v in before["state"].items():
        torch.testing.assert_close(after["state"][k], v, rtol=0, atol=0)


def test_user_model_unchanged_by_sparsegpt():
    """SparseGPT writes new weights into the prepared module only: the user's TinyGPT is bit-identical."""
    model, batches = _gpt(), _batches()
    before = snapshot(model)
    gm = prepare(model, sparsifier=SparseGPTSparsifier(0.5, block_size=16))
    prune_sequential(gm, batches, progress_bar=False)
    assert not torch.equal(gm.get_parameter("blocks.0.fc1.weight"), model.blocks[0].fc1.weight)
    after = snapshot(model)
    assert after["ids"] == before["ids"] and after["attrs"] == before["attrs"]
    for k, v in before["state"].items():
        torch.testing.assert_close(after["state"][k], v, rtol=0, atol=0)


def test_named_blocks_and_globs():
    """Globs match one name component; naming blocks by FQN gives those stages; find_blocks agrees."""
    gm = prepare(_gpt(), sparsifier=WandaSparsifier(0.5))
    assert match_blocks(gm, ["blocks.*"]) == ("blocks.0", "blocks.1", "blocks.2")
    assert match_blocks(gm, ["blocks.2", "blocks.0"]) == ("blocks.0", "blocks.2")
    assert find_blocks(gm, [g["tensor_fqn"] for g in get_sparsifier(gm).groups]) == ("blocks.0", "blocks.1", "blocks.2")
    stages = plan_stages(gm, ("blocks.0", "blocks.2"))
    assert [s.name for s in stages] == ["(before blocks.0)", "blocks.0", "(after blocks.0)", "blocks.2", "(after blocks.2)"]
    assert stages[2].tensor_fqns == tuple(f"blocks.1.{n}.weight" for n in ("qkv", "proj", "fc1", "fc2"))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"blocks": ["blocks.9"]}, ValueError, "names no module.*close matches"),
        ({"blocks": ["blocks", "blocks.1"]}, ValueError, "overlap"),
        ({"blocks": []}, ValueError, "blocks is empty"),
        ({"blocks": "blocks.*"}, TypeError, "list of module FQNs"),
        ({"batches": []}, ValueError, "at least one batch"),
        ({"batches": torch.zeros(2, 8, dtype=torch.long)}, TypeError, r"wrap one tensor in a list"),
        ({"batches": [object()]}, TypeError, "batch 0 of batches"),
        ({"batches": [(torch.zeros(2, 8, dtype=torch.long), torch.zeros(1))]}, TypeError, "batch 0 of batches"),
    ],
)
def test_bad_input_is_refused_before_anything_changes(kwargs, error, match):
    """Bad blocks or batches get a clear error, and no mask or state changed."""
    sparsifier = WandaSparsifier(0.5)
    gm = prepare(_gpt(), sparsifier=sparsifier)
    kwargs = {"batches": _batches(), **kwargs}
    with pytest.raises(error, match=match):
        prune_sequential(gm, progress_bar=False, **kwargs)
    assert all(m.all() for m in _masks(gm, sparsifier).values())
    assert not any(sparsifier.state.get(g["tensor_fqn"]) for g in sparsifier.groups)


def test_channel_pruner_is_refused():
    """ChannelPruner's channel groups span layers: pruning block by block is refused with a TypeError."""
    from fx_sparsity import ChannelPruner

    model = _gpt()
    gm = ChannelPruner().prepare(model, None, example_inputs=(_batches()[0],))
    with pytest.raises(TypeError, match="ChannelPruner couples channels"):
        prune_sequential(gm, _batches(), progress_bar=False)


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
        self.layers[1].weight = self.layers[0].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[1](torch.relu(self.layers[0](x)))


def test_weight_shared_across_blocks_is_refused():
    """One weight read in two blocks cannot be pruned block by block: ValueError naming it."""
    gm = prepare(_Tied(), sparsifier=WandaSparsifier(0.5))
    with pytest.raises(ValueError, match="layers.0.weight is read by ops in"):
        prune_sequential(gm, [torch.randn(2, 4)], blocks=["layers.*"], progress_bar=False)


def test_no_repeated_blocks_asks_for_names():
    """A model without indexed repeated modules: ValueError telling the user to name the blocks."""

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(self.a(x))

    gm = prepare(Two(), sparsifier=WandaSparsifier(0.5))
    with pytest.raises(ValueError, match="name the block modules"):
        prune_sequential(gm, [torch.randn(2, 4)], progress_bar=False)
    report = prune_sequential(gm, [torch.randn(2, 4)], blocks=["a", "b"], progress_bar=False)
    assert report.blocks == ("a", "b")


# ---------------------------------------------------------------- weights streamed from a checkpoint


def _checkpoint(model: nn.Module, path) -> str:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def _read_pruned(directory) -> dict[str, torch.Tensor]:
    import json

    from safetensors.torch import load_file

    index = json.loads((directory / "model.safetensors.index.json").read_text())
    out: dict[str, torch.Tensor] = {}
    for file in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(directory / file)))
    assert set(index["weight_map"]) == set(out)
    return out


@pytest.mark.parametrize("name", ["wanda", "sparsegpt"])
def test_streamed_from_safetensors_equals_in_memory(name, tmp_path):
    """TinyGPT built on the meta device, prepared there (no weight memory), pruned block by block with its
    weights read from a safetensors file: the written checkpoint holds every tensor, the pruned weights equal
    weight * mask of the same run in memory (SparseGPT's updates included), the rest is copied bit for bit;
    each stage loaded only its own tensors, and the prepared module is back on meta afterwards."""
    from fx_sparsity.calibration import SafetensorsWeights, prepare_on_meta

    model, batches = _gpt(), _batches()
    source = _checkpoint(model, tmp_path / "model.safetensors")
    with torch.device("meta"):
        meta_model = TinyGPT(3).eval()
    sparsifier = SPARSIFIERS[name](0.5)
    gm = prepare_on_meta(meta_model, sparsifier=sparsifier)
    assert all(t.is_meta for t in [*gm.parameters(), *gm.buffers()])
    report = prune_sequential(gm, batches, weights=SafetensorsWeights(source, tmp_path / "out"), progress_bar=False)
    out = _read_pruned(tmp_path / "out")
    reference_sparsifier = SPARSIFIERS[name](0.5)
    reference = prepare(model, sparsifier=reference_sparsifier)
    prune_sequential(reference, batches, progress_bar=False)
    masked = {g["tensor_fqn"] for g in reference_sparsifier.groups}
    state = model.state_dict()
    assert set(out) == set(state)
    for fqn, tensor in state.items():
        if fqn in masked:
            expected = reference.get_parameter(fqn) * reference.get_buffer(fqn + "_mask")
            torch.testing.assert_close(out[fqn], expected)
            assert (out[fqn] == 0).float().mean().item() >= 0.5
        else:
            assert torch.equal(out[fqn], tensor), fqn
    block = sum(p.numel() * 4 for p in model.blocks[0].parameters())
    masks = sum(model.get_parameter(f).numel() for f in masked if f.startswith("blocks.0."))  # bool masks: a byte each
    assert [s.weight_bytes for s in report.stages if s.name == "blocks.1"] == [block + masks]
    assert all(t.is_meta for t in [*gm.parameters(), *gm.buffers()])
    collected: dict[str, torch.Tensor] = {}  # the callback form of out
    gm2 = prepare_on_meta(meta_model, sparsifier=SPARSIFIERS[name](0.5))
    prune_sequential(gm2, batches, weights=SafetensorsWeights(source, collected.update), progress_bar=False)
    assert set(collected) == set(state)
    for fqn in state:
        torch.testing.assert_close(collected[fqn], out[fqn])


def test_streamed_bad_input(tmp_path):
    """A meta-prepared module without weights=, a checkpoint missing a tensor, or a missing file: clear errors."""
    from fx_sparsity.calibration import SafetensorsWeights, prepare_on_meta

    model = _gpt()
    with torch.device("meta"):
        meta_model = TinyGPT(3).eval()
    gm = prepare_on_meta(meta_model, sparsifier=WandaSparsifier(0.5))
    with pytest.raises(ValueError, match="meta device.*weights=SafetensorsWeights"):
        prune_sequential(gm, _batches(), progress_bar=False)
    state = {k: v for k, v in model.state_dict().items() if k != "blocks.1.fc1.bias"}
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match=r"blocks\.1\.fc1\.bias.*not in the checkpoint"):
        prune_sequential(gm, _batches(), weights=SafetensorsWeights(tmp_path / "partial.safetensors", tmp_path / "o"),
                         progress_bar=False)
    assert not (tmp_path / "o").exists()
    with pytest.raises(FileNotFoundError, match="not a file"):
        SafetensorsWeights(tmp_path / "missing.safetensors", tmp_path / "o")
    with pytest.raises(ValueError, match="no tensor on the meta device"):
        prepare_on_meta(model, sparsifier=WandaSparsifier(0.5))
