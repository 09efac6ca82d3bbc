"""Compressed checkpoints: save_sparse writes packed tensors (not dense zeros) with metadata, load_sparse builds
the model on the meta device and reads them back (in a fresh process too) with outputs equal to the saved model's,
allocating no dense-weight-sized tensor; incomplete, changed or foreign folders are refused naming file and tensor;
a killed save leaves nothing that loads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fx_sparsity
from fx_sparsity import MagnitudeSparsifier, prepare
from fx_sparsity.calibration.streaming import SafetensorsWeights, write_safetensors
from fx_sparsity.deploy import (
    SparseLinear,
    densify_model,
    load_sparse,
    save_sparse,
    sparsify_model,
)
from fx_sparsity.deploy import checkpoint as checkpoint_module
from helpers import MixedNet, PointwiseConvNet, snapshot, tiny_causal_lm

ROOT = Path(__file__).resolve().parents[1]


def sparse_llama(tie_word_embeddings: bool = False) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """(the user's Llama, its sparse-module copy (bitmask, 50% magnitude), example ids)."""
    model = tiny_causal_lm("llama", tie_word_embeddings=tie_word_embeddings)
    ids = torch.randint(0, 128, (2, 8))
    sparsifier = MagnitudeSparsifier(0.5)
    gm = prepare(model, sparsifier=sparsifier, example_inputs=(ids,))
    sparsifier.step()
    return model, sparsify_model(gm, "bitmask"), ids


@pytest.fixture(scope="module")
def llama() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """:func:`sparse_llama`, made once for the tests of this file that only read it (export capture and lowering
    take a few seconds)."""
    return sparse_llama()


def sparse_mlp() -> nn.Module:
    """Three 256-wide Linears, 75% magnitude, csr (a bias, an unpruned LayerNorm between)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.LayerNorm(256), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64))
    sparsifier = MagnitudeSparsifier(0.75)
    gm = prepare(model, sparsifier=sparsifier)
    sparsifier.step()
    return sparsify_model(gm, "csr")


def mlp_skeleton() -> nn.Module:
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(256, 256), nn.LayerNorm(256), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64))


def greedy(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                              pad_token_id=0, use_cache=True)


def test_llama_save_then_load_in_a_fresh_process(llama, tmp_path):
    """A sparse Llama (GQA, bitmask) saved: config.json (architectures set), generation_config.json, one shard and
    fx_sparsity.json naming each layer's format, shape and dtype and the versions; no model.safetensors, so
    transformers' from_pretrained refuses the folder. A fresh Python process that imports fx_sparsity and loads it
    gets a LlamaForCausalLM of 15 bitmask SparseLinears whose logits equal the saved model's bit for bit and whose
    greedy generate() gives the same tokens; the model's torch.export program, saved, loads there (fx_sparsity and
    transformers' output types imported) and computes the same logits with the bitmask operator. (About 15 s on 2
    busy cores: the fresh process imports torch, transformers and fx_sparsity; the one subprocess of this file.)"""
    transformers = pytest.importorskip("transformers")
    _, sparse, ids = llama
    folder = save_sparse(sparse, tmp_path / "ckpt")
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "fx_sparsity.json", "generation_config.json", "sparse-00001-of-00001.safetensors"]
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert sparse.config.architectures is None  # the user's config is not changed
    metadata = json.loads((folder / "fx_sparsity.json").read_text())
    assert metadata["format_version"] == checkpoint_module.FORMAT_VERSION
    assert metadata["fx_sparsity_version"] == fx_sparsity.__version__ and metadata["torch_version"] == torch.__version__
    layer = metadata["layers"]["model.layers.0.self_attn.k_proj"]
    assert layer == {"module": "SparseLinear", "layout": "bitmask", "shape": [32, 64], "dtype": "float32",
                     "stride": None, "bias": False}
    assert len(metadata["layers"]) == 15
    with pytest.raises(OSError, match="no file named model.safetensors"):
        transformers.LlamaForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        torch.save({"ids": ids, "logits": sparse(ids).logits, "tokens": greedy(sparse, ids)}, tmp_path / "expected.pt")
    torch.export.save(torch.export.export(sparse, (ids,)), tmp_path / "sparse.pt2")
    script = textwrap.dedent(f"""
        import torch, fx_sparsity                # fx_sparsity registers the operators the sparse layers call
        import transformers.modeling_outputs     # the output types of a transformers .pt2
        from fx_sparsity.deploy import SparseLinear, load_sparse
        expected = torch.load({str(tmp_path / 'expected.pt')!r})
        model = load_sparse({str(folder)!r})
        assert type(model).__name__ == "LlamaForCausalLM" and not model.training
        layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
        assert len(layers) == 15 and all(m.layout == "bitmask" for m in layers), layers
        ids = expected["ids"]
        with torch.no_grad():
            assert torch.equal(model(ids).logits, expected["logits"])
            tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                                    pad_token_id=0, use_cache=True)
        assert torch.equal(tokens, expected["tokens"]), (tokens, expected["tokens"])
        program = torch.export.load({str(tmp_path / 'sparse.pt2')!r}).module()
        assert any("fx_sparsity.bitmask_linear" in str(n.target) for n in program.graph.nodes)
        torch.testing.assert_close(program(ids).logits, expected["logits"])
        print("loaded ok")
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "loaded ok" in run.stdout


@pytest.mark.parametrize("name", ["qwen2", "gpt2", "llama-tied"])
def test_transformers_round_trip(name, tmp_path):
    """Qwen2 (q/k/v biases), GPT-2 (Conv1D dense, the tied head sparse) and a Llama whose head is tied to the
    embedding, each pruned 50% on every weight and saved: load_sparse from config.json gives the class with the
    same sparse layers and equal logits; the embedding is dense, the head a SparseLinear, and nothing is on the
    meta device."""
    if name == "llama-tied":
        _, sparse, ids = sparse_llama(tie_word_embeddings=True)
    else:
        model = tiny_causal_lm(name)
        ids = torch.randint(0, 128, (2, 8))
        sparsifier = MagnitudeSparsifier(0.5)
        gm = prepare(model, sparsifier=sparsifier, example_inputs=(ids,))
        sparsifier.step()
        sparse = sparsify_model(gm, "csr")
    loaded = load_sparse(save_sparse(sparse, tmp_path))
    assert type(loaded) is type(sparse)
    layers = {n: (type(m), m.layout) for n, m in sparse.named_modules() if isinstance(m, SparseLinear)}
    assert {n: (type(m), m.layout) for n, m in loaded.named_modules() if isinstance(m, SparseLinear)} == layers
    assert type(loaded.lm_head) is SparseLinear and not isinstance(loaded.get_input_embeddings(), SparseLinear)
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, sparse(ids).logits)


def test_plain_module_needs_a_skeleton_and_ties_stay(tmp_path):
    """PointwiseConvNet and MixedNet (symbolic trace, bitmask): loading without model= is refused naming the
    class; with a skeleton built on the meta device the loaded copy computes the saved one's outputs; MixedNet's
    tied Linears share one set of buffers again, and densified, one Parameter again; the skeleton is not modified
    (still meta, still dense Linears)."""
    for cls, x in ((PointwiseConvNet, torch.randn(2, 16, 8, 8)), (MixedNet, torch.randn(2, 3, 8, 8))):
        torch.manual_seed(0)
        model = cls().eval()
        sparsifier = MagnitudeSparsifier(0.5)
        gm = prepare(model, sparsifier=sparsifier)
        sparsifier.step()
        sparse = sparsify_model(gm, "bitmask")
        folder = save_sparse(sparse, tmp_path / cls.__name__)
        with pytest.raises(ValueError, match=rf"holds a plain nn.Module \(.*{cls.__name__}\).*pass model="):
            load_sparse(folder)
        with torch.device("meta"):
            skeleton = cls()
        before = snapshot(skeleton)
        loaded = load_sparse(folder, model=skeleton)
        with torch.no_grad():
            assert torch.equal(loaded(x), sparse(x))
        assert snapshot(skeleton)["modules"] == before["modules"]
        assert all(t.is_meta for t in skeleton.parameters())
    assert all(a is b for a, b in zip(loaded.shared.components, loaded.tied.components))
    dense = densify_model(sparse)  # MixedNet of plain layers: one Parameter under shared.weight and tied.weight
    assert dense.shared.weight is dense.tied.weight
    with torch.device("meta"):
        skeleton = MixedNet()
    reloaded = load_sparse(save_sparse(dense, tmp_path / "dense"), model=skeleton)
    assert isinstance(reloaded.shared.weight, nn.Parameter) and reloaded.shared.weight is reloaded.tied.weight
    with torch.no_grad():
        assert torch.equal(reloaded(x), dense(x))


def test_disk_bytes_are_the_formats_bytes(tmp_path):
    """A 75%-sparse csr MLP: the shards' bytes are within 5% of the tensors' bytes (packed components, biases, the
    LayerNorm), and under 45% of the dense model's."""
    sparse = sparse_mlp()
    stored = sum(t.numel() * t.element_size() for t in sparse.state_dict().values())
    dense = sum(t.numel() * t.element_size() for t in densify_model(sparse).state_dict().values())
    folder = save_sparse(sparse, tmp_path)
    on_disk = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    assert stored <= on_disk <= 1.05 * stored
    assert on_disk < 0.45 * dense


class LargestAllocation(TorchDispatchMode):
    """The largest storage any op outside the meta device returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def test_load_never_allocates_a_dense_weight(tmp_path):
    """Loading the 75%-sparse MLP (skeleton on meta) allocates no tensor as large as one dense 256x256 weight;
    loading its dense copy through the same path does (the check sees allocations)."""
    sparse = sparse_mlp()
    folder = save_sparse(sparse, tmp_path / "sparse")
    dense_folder = save_sparse(densify_model(sparse), tmp_path / "dense")
    weight_bytes = 256 * 256 * 4
    with LargestAllocation() as mode:
        loaded = load_sparse(folder, model=mlp_skeleton())
    assert 0 < mode.largest < weight_bytes / 2
    with LargestAllocation() as mode:
        load_sparse(dense_folder, model=mlp_skeleton())
    assert mode.largest >= weight_bytes
    x = torch.randn(3, 256)
    with torch.no_grad():
        assert torch.equal(loaded(x), sparse(x))


def test_shards_are_plain_safetensors(tmp_path):
    """The safetensors package reads every shard; its tensors are the sparse model's state dict."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    sparse = sparse_mlp()
    folder = save_sparse(sparse, tmp_path, max_shard_bytes=100_000)
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) > 2
    read = {k: v for shard in shards for k, v in safetensors_torch.load_file(shard).items()}
    state = sparse.state_dict()
    assert read.keys() == state.keys() and all(torch.equal(read[k], state[k]) for k in state)


def rewrite_metadata(folder: Path, change) -> None:
    path = folder / "fx_sparsity.json"
    metadata = json.loads(path.read_text())
    change(metadata)
    path.write_text(json.dumps(metadata))


def test_bad_checkpoints_are_refused_naming_file_and_tensor(llama, tmp_path):
    """Each broken copy of a sharded MLP checkpoint is refused with a ValueError naming what is wrong: no metadata
    (an unfinished save), another format version, an unknown layer format, a missing shard, a truncated shard, a
    header whose shape disagrees with the metadata (same bytes), a metadata shape that disagrees with the model,
    and a checkpoint of another model (a skeleton of other sizes, or of another class)."""
    sparse = sparse_mlp()
    good = save_sparse(sparse, tmp_path / "good", max_shard_bytes=100_000)
    shards = sorted(p.name for p in good.glob("*.safetensors"))

    def copy(name: str) -> Path:
        return Path(shutil.copytree(good, tmp_path / name))

    broken = copy("unfinished")
    (broken / "fx_sparsity.json").unlink()
    with pytest.raises(ValueError, match="has no fx_sparsity.json: .* did not finish"):
        load_sparse(broken, model=mlp_skeleton())
    broken = copy("version")
    rewrite_metadata(broken, lambda m: m.update(format_version=2, fx_sparsity_version="9.0"))
    with pytest.raises(ValueError, match=r"fx_sparsity.json was written by fx_sparsity 9.0 in checkpoint format 2"):
        load_sparse(broken, model=mlp_skeleton())
    broken = copy("layout")
    rewrite_metadata(broken, lambda m: m["layers"]["2"].update(layout="coo"))
    with pytest.raises(ValueError, match="layer 2 has the format 'coo', which this fx_sparsity does not know"):
        load_sparse(broken, model=mlp_skeleton())
    broken = copy("missing")
    (broken / shards[1]).unlink()
    with pytest.raises(ValueError, match=rf"shard .*{shards[1]}' listed in fx_sparsity.json is missing"):
        load_sparse(broken, model=mlp_skeleton())
    broken = copy("truncated")
    data = (broken / shards[0]).read_bytes()
    (broken / shards[0]).write_bytes(data[:-100])
    with pytest.raises(ValueError, match=rf"shard .*{shards[0]}' has {len(data) - 100} bytes, fx_sparsity.json says "
                                         rf"{len(data)}: it is truncated"):
        load_sparse(broken, model=mlp_skeleton())

    broken = copy("header")
    metadata = json.loads((broken / "fx_sparsity.json").read_text())
    name = next(n for n, e in metadata["tensors"].items() if e["shape"] == [256])
    file = metadata["tensors"][name]["file"]
    tensors = safetensors_load(broken / file)
    tensors[name] = tensors[name].reshape(16, 16)  # the same bytes: only the header's shape differs
    write_safetensors(broken / file, tensors)
    rewrite_metadata(broken, lambda m: m["files"][file].update(bytes=(broken / file).stat().st_size))
    with pytest.raises(ValueError, match=rf"tensor {name} of {file} is torch.float32 of shape \[16, 16\] in its header, "
                                         r"fx_sparsity.json says F32 \[256\]"):
        load_sparse(broken, model=mlp_skeleton())
    broken = copy("shape")
    rewrite_metadata(broken, lambda m: m["tensors"]["1.weight"].update(shape=[255]))
    with pytest.raises(ValueError, match=r"tensor 1.weight \(in sparse-\d+-of-\d+.safetensors\) has shape \[255\], "
                                         r"Sequential.1.weight has \[256\]"):
        load_sparse(broken, model=mlp_skeleton())

    with torch.device("meta"):
        other = nn.Sequential(nn.Linear(256, 128), nn.LayerNorm(128), nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 64))
    with pytest.raises(ValueError, match=r"layer 0 has weight shape \[256, 256\].*has \[128, 256\].*another model"):
        load_sparse(good, model=other)
    with torch.device("meta"):
        other = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64))
    with pytest.raises(ValueError, match=r"holds 1.bias, 1.weight, which Sequential lacks: it is a checkpoint of "
                                         "another model"):
        load_sparse(good, model=other)
    with pytest.raises(ValueError, match="has a sparse layer 2, which Sequential lacks"):
        load_sparse(good, model=nn.Sequential(nn.Linear(256, 256)))
    with pytest.raises(ValueError, match="holds a plain nn.Module"):
        load_sparse(good)
    folder = save_sparse(llama[1], tmp_path / "llama")
    with pytest.raises(ValueError, match="has a sparse layer model.layers.0.self_attn.q_proj, which Sequential lacks"):
        load_sparse(folder, model=mlp_skeleton())


def safetensors_load(path: Path) -> dict[str, torch.Tensor]:
    reader = SafetensorsWeights(path, out=lambda tensors: None)
    return {name: reader.load(name) for name in reader.keys()}


def test_a_killed_save_leaves_nothing_that_loads(tmp_path, monkeypatch):
    """Saving over a finished checkpoint and failing at the second shard (a kill, a full disk): the old metadata
    was removed first, the new shards are gone, no metadata is written, and load_sparse refuses the folder; the
    next save succeeds. Foreign files and meta tensors are refused before anything is written."""
    sparse = sparse_mlp()
    folder = save_sparse(sparse, tmp_path / "ckpt", max_shard_bytes=100_000)
    calls = []
    real = checkpoint_module.write_safetensors

    def failing(path, tensors):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("No space left on device")
        real(path, tensors)

    monkeypatch.setattr(checkpoint_module, "write_safetensors", failing)
    with pytest.raises(OSError, match="No space left"):
        save_sparse(sparse, folder, max_shard_bytes=100_000)
    assert sorted(p.name for p in folder.iterdir()) == []
    with pytest.raises(ValueError, match="has no fx_sparsity.json"):
        load_sparse(folder, model=mlp_skeleton())
    monkeypatch.undo()
    save_sparse(sparse, folder, max_shard_bytes=100_000)
    x = torch.randn(2, 256)
    with torch.no_grad():
        assert torch.equal(load_sparse(folder, model=mlp_skeleton())(x), sparse(x))

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model.safetensors").write_bytes(b"mine")
    with pytest.raises(ValueError, match=r"holds files a sparse checkpoint does not write \(model.safetensors\)"):
        save_sparse(sparse, tmp_path / "other")
    assert (tmp_path / "other" / "model.safetensors").read_bytes() == b"mine"
    with pytest.raises(ValueError, match="tensor 0.weight of Sequential is on the meta device"):
        save_sparse(mlp_skeleton(), tmp_path / "meta")
    assert not (tmp_path / "meta").exists()


def test_decompress_to_a_dense_transformers_checkpoint(llama, tmp_path):
    """densify_model of a loaded sparse Llama saves with save_pretrained as a plain dense checkpoint that
    transformers loads alone, computing the sparse model's logits (the dense kernel's rounding aside)."""
    transformers = pytest.importorskip("transformers")
    _, sparse, ids = llama
    loaded = load_sparse(save_sparse(sparse, tmp_path / "sparse"))
    densify_model(loaded).save_pretrained(tmp_path / "dense")
    dense = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "dense")
    assert (dense.model.layers[0].mlp.up_proj.weight == 0).float().mean() == 0.5
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, sparse(ids).logits)
