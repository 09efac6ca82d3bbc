"""Streaming a checkpoint through prune_sequential without losing data (fx_sparsity/calibration/streaming.py):
bad checkpoints and output folders refused before the first block, the source never overwritten, a killed or
failed run leaving nothing that loads as a finished checkpoint, the checkpoint's dtype kept; a transformers Llama
streamed from its save_pretrained checkpoint equal to in-memory pruning, one block resident at a time, its
non-persistent rotary buffers computed (fx_sparsity/calibration/meta_device.py).

The written files are read back with ``safetensors.torch.load_file``, an independent reader."""

from __future__ import annotations

import copy
import json
import os
import re
import resource
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from fx_sparsity import MagnitudeSparsifier, WandaSparsifier, prepare
from fx_sparsity.calibration import SafetensorsWeights, calibrate, prepare_on_meta, prune_sequential
from fx_sparsity.levels import set_owl_levels
from helpers import snapshot

safetensors_torch = pytest.importorskip("safetensors.torch")

# ---------------------------------------------------------------- a small stack of blocks and its checkpoint


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.fc(self.norm(x)))


class Stack(nn.Module):
    """``layers`` residual blocks (LayerNorm, Linear) and a head: stages layers.0, layers.1, layers.2, head."""

    def __init__(self, layers: int = 3, d: int = 16, classes: int = 64) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Block(d) for _ in range(layers)])
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _model() -> Stack:
    torch.manual_seed(0)
    return Stack().eval()


def _meta_gm(sparsifier=None):
    with torch.device("meta"):
        model = Stack().eval()
    return prepare_on_meta(model, sparsifier=sparsifier or WandaSparsifier(0.5))


def _batches(count: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(4, 16, generator=generator) for _ in range(count)]


def _state(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}


def _save(state: dict[str, torch.Tensor], directory: Path, sharded: bool = False) -> Path:
    """Write ``state`` with safetensors' own writer: one model.safetensors, or two shards and an index."""
    directory.mkdir(parents=True, exist_ok=True)
    if not sharded:
        safetensors_torch.save_file(state, str(directory / "model.safetensors"))
        return directory / "model.safetensors"
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in halves.items():
        safetensors_torch.save_file({k: state[k] for k in keys}, str(directory / file))
    weight_map = {k: file for file, keys in halves.items() for k in keys}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory / "model.safetensors.index.json"


def _edit_header(path: Path, edit) -> None:
    """Rewrite the JSON header of safetensors file ``path`` with ``edit(header)``, keeping its data bytes."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    edit(header)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length :])


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())} if directory.exists() else {}


def _read_checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    """The tensors of the checkpoint in ``directory``, through its index, each shard read by load_file."""
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(set(index["weight_map"].values())):
        shard = safetensors_torch.load_file(str(directory / file))
        assert set(shard) == {k for k, f in index["weight_map"].items() if f == file}
        tensors.update(shard)
    return tensors


def _pruned_in_memory(state: dict[str, torch.Tensor], sparsifier) -> dict[str, torch.Tensor]:
    """The checkpoint a run in memory gives: Stack holding ``state`` (as float32), pruned, ``weight * mask``."""
    model = Stack().eval()
    model.load_state_dict({k: v.float() for k, v in state.items()})
    gm = prepare(model, sparsifier=sparsifier)
    prune_sequential(gm, _batches(), progress_bar=False)
    out = dict(state)
    for group in sparsifier.groups:
        fqn = group["tensor_fqn"]
        out[fqn] = (gm.get_parameter(fqn) * gm.get_buffer(fqn + "_mask")).to(state[fqn].dtype)
    return out


def _assert_all_meta(gm) -> None:
    real = [n for n, t in [*gm.named_parameters(), *gm.named_buffers()] if not t.is_meta]
    assert not real, real


def _assert_no_checkpoint(directory: Path) -> None:
    """No index, and nothing named *.safetensors, in ``directory``: no loader can take it for a checkpoint."""
    names = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
    assert "model.safetensors.index.json" not in names, names
    assert not [n for n in names if n.endswith(".safetensors")], names


# ---------------------------------------------------------------- the module streamed into


def test_module_prepared_in_memory_is_refused_before_anything_is_read(tmp_path):
    """Stack prepared by prepare (real weights) given weights=: ValueError naming prepare_on_meta; the user's
    weights are bit-identical, gm's stay real and unpruned, and the output directory is not created."""
    model = _model()
    source = _save(_state(model), tmp_path / "src")
    before = snapshot(model)
    gm = prepare(model, sparsifier=WandaSparsifier(0.5))
    with pytest.raises(ValueError, match=r"gm's layers\.0\.fc\.weight .*real tensor.*prepare_on_meta"):
        prune_sequential(gm, _batches(), weights=SafetensorsWeights(source, tmp_path / "out"), progress_bar=False)
    after = snapshot(model)
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
    assert not any(t.is_meta for t in gm.parameters())
    assert torch.equal(gm.get_parameter("head.weight"), model.head.weight)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the output directory


def _out_cases(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    state = _state(_model())
    single = _save(state, tmp_path / "single")
    sharded = _save(state, tmp_path / "sharded", sharded=True)
    earlier = tmp_path / "earlier"
    prune_sequential(_meta_gm(), _batches(), weights=SafetensorsWeights(single, earlier), progress_bar=False)
    _save(state, tmp_path / "other")
    return {
        "single file's folder": (single, single.parent),
        "sharded checkpoint's folder": (sharded, sharded.parent),
        "earlier output pruned again in place": (earlier / "model.safetensors.index.json", earlier),
        "folder of another model.safetensors": (single, tmp_path / "other"),
    }


OUT_CASES = {
    "single file's folder": "holds the source checkpoint's files",
    "sharded checkpoint's folder": "holds the source checkpoint's files",
    "earlier output pruned again in place": "holds the source checkpoint's files",
    "folder of another model.safetensors": r"holds another checkpoint \(\['model.safetensors'\]\)",
}


@pytest.mark.parametrize("case", list(OUT_CASES))
def test_out_holding_the_source_or_another_checkpoint_is_refused(case, tmp_path):
    """out= the folder of the source (a model.safetensors, a sharded checkpoint's index and shards, an earlier
    output re-pruned in place) or of another model.safetensors (loaders read it before an index): ValueError
    naming out, and every file of those folders is byte-identical afterwards."""
    source, out = _out_cases(tmp_path)[case]
    match = OUT_CASES[case]
    folders = {source.parent, out}
    before = {f: _files(f) for f in folders}
    with pytest.raises(ValueError, match=re.escape(f"out {str(out)!r} ") + match):
        prune_sequential(_meta_gm(), _batches(), weights=SafetensorsWeights(source, out), progress_bar=False)
    assert {f: _files(f) for f in folders} == before


@pytest.mark.parametrize("case", ["a file", "under a file", "not writable"])
def test_bad_out_path_is_refused(case, tmp_path):
    """out that is a file, lies under a file, or cannot be written (/proc/self): ValueError naming out, raised by
    SafetensorsWeights, before anything is read or written."""
    source = _save(_state(_model()), tmp_path / "src")
    (tmp_path / "file").write_text("x")
    out, match = {
        "a file": (tmp_path / "file", "is a file"),
        "under a file": (tmp_path / "file" / "pruned", "lies under .* which is a file"),
        "not writable": (Path("/proc/self/pruned"), "is not writable"),
    }[case]
    if case == "not writable" and not Path("/proc/self").is_dir():
        pytest.skip("needs Linux's /proc, a directory no process may create files in")
    with pytest.raises(ValueError, match=re.escape(f"out {str(out)!r} ") + match):
        SafetensorsWeights(source, out)
    assert (tmp_path / "file").read_text() == "x"


def test_rerun_into_an_earlier_output_replaces_it(tmp_path):
    """A second run (magnitude) into the folder of a first one (Wanda, plus a stray pruned-00099 shard of a
    killed run): the folder then holds exactly the second run's checkpoint, equal to magnitude pruning in
    memory, and config.json the user put there; the files get the umask's permissions, as config.json does."""
    state = _state(_model())
    source = _save(state, tmp_path / "src")
    out = tmp_path / "out"
    prune_sequential(_meta_gm(), _batches(), weights=SafetensorsWeights(source, out), progress_bar=False)
    safetensors_torch.save_file({"stale": torch.ones(2)}, str(out / "pruned-00099.safetensors"))
    (out / "config.json").write_text("{}")
    prune_sequential(_meta_gm(MagnitudeSparsifier(0.5)), _batches(), weights=SafetensorsWeights(source, out),
                     progress_bar=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted({*index["weight_map"].values(), "config.json",
                                                           "model.safetensors.index.json"})
    mode = (out / "config.json").stat().st_mode  # what the umask gives a file created the usual way
    assert all(p.stat().st_mode == mode for p in out.iterdir())
    written, expected = _read_checkpoint(out), _pruned_in_memory(state, MagnitudeSparsifier(0.5))
    assert set(written) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(written[name], tensor), name


# ---------------------------------------------------------------- killed and failed runs

_KILLED_RUN = """
import resource, signal, sys, torch
sys.path.insert(0, {tests!r})
from test_streaming import _batches, _meta_gm
from fx_sparsity.calibration import SafetensorsWeights, prune_sequential
gm, batches = _meta_gm(), _batches()
weights = SafetensorsWeights({source!r}, {out!r})
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it; the kernel's default kills the process
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
prune_sequential(gm, batches, weights=weights, progress_bar=False)
"""


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGXFSZ"), reason="needs POSIX file size limits")
def test_killed_run_leaves_no_index_and_no_partial_shard(tmp_path):
    """A run into an earlier run's folder is killed by the kernel while it writes the head's shard (a file-size
    limit between a block's shard and the head's): the earlier index is gone, so nothing loads as a checkpoint
    mixing the two runs; every file named *.safetensors is complete (load_file reads it) and holds only tensors
    of this run; the source is intact. Running again gives the whole checkpoint, and no leftover."""
    state = _state(_model())
    source = _save(state, tmp_path / "src")
    source_bytes = source.read_bytes()
    out = tmp_path / "out"
    prune_sequential(_meta_gm(MagnitudeSparsifier(0.5)), _batches(), weights=SafetensorsWeights(source, out),
                     progress_bar=False)
    block = sum(v.nbytes for k, v in state.items() if k.startswith("layers.0."))
    head = state["head.weight"].nbytes + state["head.bias"].nbytes
    assert 2 * block < head
    script = _KILLED_RUN.format(tests=str(Path(__file__).parent), source=str(source), out=str(out), limit=2 * block)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, env=env)
    assert done.returncode == -__import__("signal").SIGXFSZ, done.stderr[-2000:]
    assert source.read_bytes() == source_bytes
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" not in names
    assert [n for n in names if n.endswith(".partial")], names  # the head's shard, killed mid-write
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) == 3, names  # the three blocks'
    expected = _pruned_in_memory(state, WandaSparsifier(0.5))
    for name in shards:
        for key, tensor in safetensors_torch.load_file(str(out / name)).items():
            assert torch.equal(tensor, expected[key]), key
    prune_sequential(_meta_gm(), _batches(), weights=SafetensorsWeights(source, out), progress_bar=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted({*index["weight_map"].values(), "model.safetensors.index.json"})
    written = _read_checkpoint(out)
    for name, tensor in expected.items():
        assert torch.equal(written[name], tensor), name


def test_failed_write_leaves_no_shard_and_the_source_intact(tmp_path):
    """A write that fails part-way through the head's shard (a file-size limit: the operating system's "File too
    large", as a full disk gives "No space left on device"): the OSError reaches the caller, the folder of an
    earlier run holds no index, no shard and no partial file, gm is back on the meta device, the source is intact."""
    state = _state(_model())
    source = _save(state, tmp_path / "src")
    source_bytes = source.read_bytes()
    out = tmp_path / "out"
    prune_sequential(_meta_gm(), _batches(), weights=SafetensorsWeights(source, out), progress_bar=False)
    gm, batches, weights = _meta_gm(), _batches(), SafetensorsWeights(source, out)
    block = sum(v.nbytes for k, v in state.items() if k.startswith("layers.0."))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 * block, hard))
    try:
        with pytest.raises(OSError, match="File too large"):
            prune_sequential(gm, batches, weights=weights, progress_bar=False)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert sorted(p.name for p in out.iterdir()) == []
    assert source.read_bytes() == source_bytes
    _assert_all_meta(gm)


def test_failed_stage_keeps_the_calibrated_statistics(tmp_path):
    """calibrate + set_owl_levels, then prune_sequential with a second batch the model cannot compute: the error
    is the model's, every calibrated input norm is still in state (identical), step() prunes with them as it
    would have; streamed, gm is back on the meta device and the output holds no checkpoint."""
    model, batches = _model(), _batches()
    sparsifier = WandaSparsifier(0.5)
    gm = prepare(model, sparsifier=sparsifier)
    calibrate(gm, batches, progress_bar=False)
    set_owl_levels(gm, 0.5, m=2.0, lam=0.2)
    norms = {g["tensor_fqn"]: sparsifier.state[g["tensor_fqn"]]["input_norm"] for g in sparsifier.groups}
    bad = [batches[0], torch.randn(4, 15)]
    with pytest.raises(RuntimeError):
        prune_sequential(gm, bad, progress_bar=False)
    for fqn, norm in norms.items():
        assert sparsifier.state[fqn]["input_norm"] is norm, fqn
    sparsifier.step()
    reference = WandaSparsifier(0.5)
    reference_gm = prepare(model, sparsifier=reference)
    calibrate(reference_gm, batches, progress_bar=False)
    set_owl_levels(reference_gm, 0.5, m=2.0, lam=0.2)
    reference.step()
    for g in sparsifier.groups:
        fqn = g["tensor_fqn"] + "_mask"
        assert torch.equal(gm.get_buffer(fqn), reference_gm.get_buffer(fqn)), fqn

    source = _save(_state(model), tmp_path / "src")
    meta = _meta_gm()
    with pytest.raises(RuntimeError):
        prune_sequential(meta, bad, weights=SafetensorsWeights(source, tmp_path / "out"), progress_bar=False)
    _assert_all_meta(meta)
    _assert_no_checkpoint(tmp_path / "out")


# ---------------------------------------------------------------- the checkpoint checked before the first block


def _bad_checkpoints(state: dict[str, torch.Tensor], directory: Path) -> dict[str, Path]:
    wrong_shape = {**state, "layers.1.fc.weight": torch.zeros(16, 15)}
    paths = {"shape": _save(wrong_shape, directory / "shape")}
    paths["dtype"] = _save(state, directory / "dtype")
    _edit_header(paths["dtype"], lambda h: h["layers.1.fc.weight"].update(dtype="F4"))
    paths["entry"] = _save(state, directory / "entry")
    _edit_header(paths["entry"], lambda h: h["layers.1.fc.bias"].update(shape="16"))
    paths["truncated"] = _save(state, directory / "truncated")
    paths["truncated"].write_bytes(paths["truncated"].read_bytes()[:-8])
    paths["sharded"] = _save(wrong_shape, directory / "sharded", sharded=True)
    return paths


BAD_CHECKPOINTS = {
    "shape": r"tensor 'layers\.1\.fc\.weight' of .*shape/model\.safetensors has shape \(16, 15\), the model's "
    r"layers\.1\.fc\.weight \(16, 16\)",
    "dtype": r"tensor 'layers\.1\.fc\.weight' of .* has dtype F4, which torch cannot read",
    "entry": r"source '.*entry/model\.safetensors' is not a safetensors file: tensor 'layers\.1\.fc\.bias' has the entry",
    "truncated": r"source '.*truncated/model\.safetensors' is not a safetensors file: tensor '.*' has data_offsets",
    "sharded": r"tensor 'layers\.1\.fc\.weight' of .*sharded/model-0000\d-of-00002\.safetensors has shape \(16, 15\)",
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_refused_before_the_first_block(case, tmp_path):
    """A checkpoint whose layers.1 tensors are bad (shape (16, 15) for (16, 16), also sharded; a dtype torch
    cannot read; a malformed header entry; a truncated file): ValueError naming the file and the tensor before
    layers.0 is pruned: no output directory, gm on the meta device, no statistic in state."""
    paths = _bad_checkpoints(_state(_model()), tmp_path)
    sparsifier = WandaSparsifier(0.5)
    gm = _meta_gm(sparsifier)
    with pytest.raises(ValueError, match=BAD_CHECKPOINTS[case]):
        prune_sequential(gm, _batches(), weights=SafetensorsWeights(paths[case], tmp_path / "out"), progress_bar=False)
    assert not (tmp_path / "out").exists()
    _assert_all_meta(gm)
    assert not any(sparsifier.state.get(g["tensor_fqn"]) for g in sparsifier.groups)


# ---------------------------------------------------------------- dtypes


def test_checkpoint_dtype_is_kept(tmp_path):
    """A float32 meta Stack over a bfloat16 checkpoint: every written tensor is bfloat16, the pruned ones equal
    (weight * mask) of the run in memory on the same values, the others the checkpoint's bits; the index's
    total_size is the checkpoint's size, not twice it."""
    state = _state(_model(), torch.bfloat16)
    source = _save(state, tmp_path / "src")
    out = tmp_path / "out"
    prune_sequential(_meta_gm(), _batches(), weights=SafetensorsWeights(source, out), progress_bar=False)
    written = _read_checkpoint(out)
    expected = _pruned_in_memory(state, WandaSparsifier(0.5))
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    for name, tensor in expected.items():
        assert torch.equal(written[name], tensor), name
    assert (written["layers.0.fc.weight"] == 0).float().mean().item() == 0.5
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in state.values())


def _raw_tensors(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """Each tensor of safetensors file ``path`` as (dtype name, shape, bytes), read without interpreting them."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    header.pop("__metadata__", None)
    data = raw[8 + length :]
    return {k: (e["dtype"], e["shape"], data[e["data_offsets"][0] : e["data_offsets"][1]]) for k, e in header.items()}


def test_tensors_no_stage_reads_are_copied_byte_for_byte(tmp_path):
    """Checkpoint tensors the model does not have, of dtypes U16 (which torch holds) and F4 (which it does not),
    are copied to the output with their dtype, shape and bytes (read back from the written file's header); with a
    callback out, which receives torch tensors, the F4 one is refused before the first block."""
    state = {**_state(_model()), "extra.ids": torch.arange(6, dtype=torch.int32).to(torch.uint16),
             "extra.packed": torch.arange(8, dtype=torch.uint8)}
    source = _save(state, tmp_path / "src")
    _edit_header(source, lambda h: h["extra.packed"].update(dtype="F4", shape=[16]))
    out = tmp_path / "out"
    prune_sequential(_meta_gm(), _batches(), weights=SafetensorsWeights(source, out), progress_bar=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    expected = _raw_tensors(source)
    for name in ("extra.ids", "extra.packed"):
        assert _raw_tensors(out / index["weight_map"][name])[name] == expected[name], name
    assert expected["extra.packed"] == ("F4", [16], bytes(range(8)))
    assert expected["extra.ids"][0] == "U16"
    collected: dict[str, torch.Tensor] = {}  # a callback receives torch tensors: F4 is refused before the first block
    with pytest.raises(ValueError, match=r"tensor 'extra\.packed' of .* has dtype F4, which torch cannot read"):
        prune_sequential(_meta_gm(), _batches(), weights=SafetensorsWeights(source, collected.update), progress_bar=False)
    assert not collected


# ---------------------------------------------------------------- bad arguments


def _bad_sources(tmp_path: Path) -> dict[str, Path]:
    good = _save({"w": torch.ones(2)}, tmp_path / "good")
    paths = {}
    paths["text"] = tmp_path / "notes.safetensors"
    paths["text"].write_text("these are not the weights you are looking for\n")
    paths["huge header"] = tmp_path / "huge.safetensors"
    paths["huge header"].write_bytes(struct.pack("<Q", 10**12) + b"{}")
    paths["header list"] = tmp_path / "list.safetensors"
    paths["header list"].write_bytes(struct.pack("<Q", 8) + b"[1, 2]  ")
    paths["index list"] = tmp_path / "list.index.json"
    paths["index list"].write_text("[1, 2]")
    paths["index not JSON"] = tmp_path / "broken.index.json"
    paths["index not JSON"].write_text('{"weight_map": {"w": ')
    paths["index missing shard"] = tmp_path / "missing.index.json"
    paths["index missing shard"].write_text(json.dumps({"weight_map": {"w": "gone.safetensors"}}))
    paths["index wrong shard"] = good.parent / "wrong.index.json"
    paths["index wrong shard"].write_text(json.dumps({"weight_map": {"v": good.name}}))
    return paths


BAD_SOURCES = {
    "text": (ValueError, r"source '.*notes\.safetensors' is not a safetensors file: its first 8 bytes give a header of \d+ bytes"),
    "huge header": (ValueError, r"source '.*huge\.safetensors' is not a safetensors file: its first 8 bytes give a header of 1000000000000 bytes"),
    "header list": (ValueError, r"source '.*list\.safetensors' is not a safetensors file: its header is a JSON list"),
    "index list": (ValueError, r"source '.*list\.index\.json' has no 'weight_map' object \(it is a JSON list"),
    "index not JSON": (ValueError, r"source '.*broken\.index\.json' is not JSON \(Expecting value"),
    "index missing shard": (FileNotFoundError, r"source '.*missing\.index\.json': weight_map puts tensor 'w' in '.*gone\.safetensors', which is not a file"),
    "index wrong shard": (ValueError, r"source '.*wrong\.index\.json': weight_map puts tensor 'v' in model\.safetensors, whose header has no such tensor"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_source_file_gets_a_clear_error(case, tmp_path):
    """SafetensorsWeights on a text file, a 10^12 header length, a header or an index that is a JSON list, an index
    that is not JSON or lists a missing shard or a tensor its shard lacks: an error naming source, the file and
    the problem (not MemoryError, AttributeError, a bare JSONDecodeError)."""
    error, match = BAD_SOURCES[case]
    with pytest.raises(error, match=match):
        SafetensorsWeights(_bad_sources(tmp_path)[case], tmp_path / "out")


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: SafetensorsWeights(None, "out"), r"source must be the path of a \.safetensors file .*got NoneType"),
        (lambda: SafetensorsWeights(3, "out"), r"source must be the path .*got int '3'"),
        (lambda: prepare_on_meta(None, sparsifier=WandaSparsifier(0.5)), r"model must be an nn\.Module .*got NoneType"),
        (lambda: prepare_on_meta("Stack", sparsifier=WandaSparsifier(0.5)), r"model must be an nn\.Module .*got str 'Stack'"),
    ],
    ids=["source None", "source int", "prepare_on_meta None", "prepare_on_meta str"],
)
def test_bad_argument_types_name_the_argument(call, match):
    """SafetensorsWeights(source=None or 3), prepare_on_meta(None or "Stack"): TypeError naming the argument and
    the value (not a bare Path or AttributeError message)."""
    with pytest.raises(TypeError, match=match):
        call()


# ---------------------------------------------------------------- a transformers causal LM larger than memory


def test_transformers_llama_streamed_equals_in_memory(tmp_path):
    """A tiny Llama (grouped-query attention, use_cache=True) saved with save_pretrained and built again on the meta
    device is prepared there from a dict example (an export capture on fake weights; its rotary inv_freq, which no
    checkpoint holds, computed from the config) and pruned by SparseGPT block by block from the checkpoint, on padded
    dict batches of two lengths: LlamaForCausalLM.from_pretrained loads the written folder (with the config saved
    beside it), its weights equal those of in-memory pruning (to_model of prepare + prune_sequential on the same
    batches) bit for bit, and so do its logits. While each stage ran, the prepared module's only real tensors were
    that stage's own (the embedding; one decoder layer's weights and masks; the final norm and the head) besides the
    computed rotary buffers; afterwards all are back on meta, and the user's meta model is unchanged."""
    transformers = pytest.importorskip("transformers")
    from fx_sparsity import SparseGPTSparsifier, to_model
    from helpers import tiny_hf_model, token_batch

    model = tiny_hf_model("llama")
    model.save_pretrained(tmp_path / "source")
    meta_model = tiny_hf_model("llama", device="meta")
    batches = [token_batch(2, 7, padding=2, seed=1), token_batch(3, 12, padding=5, seed=2)]
    example = token_batch(2, 10)
    gm = prepare_on_meta(meta_model, sparsifier=SparseGPTSparsifier(0.5, block_size=32), example_inputs=example)
    rotary = {"model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"}
    for fqn in rotary:
        assert torch.equal(gm.get_buffer(fqn), model.get_buffer(fqn)), fqn
    weights = SafetensorsWeights(tmp_path / "source" / "model.safetensors", tmp_path / "pruned")
    resident: list[set[str]] = []
    save = weights.save

    def recording_save(tensors):  # called after each stage ran, its tensors still loaded
        real = [(n, t) for n, t in [*gm.named_parameters(), *gm.named_buffers()] if not t.is_meta]
        resident.append({n for n, _ in real} - rotary)
        save(tensors)

    weights.save = recording_save
    report = prune_sequential(gm, batches, weights=weights, progress_bar=False)
    assert report.blocks == ("(before model.layers.0)", "model.layers.0", "model.layers.1", "(after model.layers.1)")
    masked = {n for n in model.state_dict() if n.endswith("_proj.weight") or n == "lm_head.weight"}
    stages = [{"model.embed_tokens.weight"}]
    stages += [{n for n in model.state_dict() if n.startswith(f"model.layers.{i}.")} for i in range(2)]
    stages += [{"model.norm.weight", "lm_head.weight"}]
    assert resident == [s | {f"{n}_mask" for n in s & masked} for s in stages]
    assert all(t.is_meta for n, t in [*gm.named_parameters(), *gm.named_buffers()] if n not in rotary)
    assert all(t.is_meta for t in [*meta_model.parameters(), *meta_model.buffers()])
    meta_model.config.save_pretrained(tmp_path / "pruned")
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "pruned").eval()

    reference = prepare(model, sparsifier=SparseGPTSparsifier(0.5, block_size=32), example_inputs=example)
    prune_sequential(reference, batches, progress_bar=False)
    expected = to_model(reference).state_dict()
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    for fqn, tensor in expected.items():
        assert torch.equal(got[fqn], tensor), fqn
    assert (got["model.layers.1.mlp.up_proj.weight"] == 0).float().mean() == 0.5
    batch = token_batch(2, 9, padding=3, seed=3)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, to_model(reference)(**batch).logits)


class _Rotary(nn.Module):
    """A non-persistent buffer computed at construction, as transformers' rotary embeddings: never in a checkpoint."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.register_buffer("inv_freq", 1 / 2 ** torch.arange(float(d)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.inv_freq


class _RotaryStack(Stack):
    def __init__(self) -> None:
        super().__init__()
        self.rotary = _Rotary()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.rotary(x))


class _InitialisedRotaryStack(_RotaryStack):
    """With transformers' hook for what a checkpoint does not hold: ``_init_weights(module)``."""

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, _Rotary):
            module.inv_freq.copy_(1 / 2 ** torch.arange(16.0))


def test_non_persistent_buffers_are_computed_by_the_models_init_or_named(tmp_path):
    """A meta model whose non-persistent buffer (a rotary table, not in the checkpoint) has no init to compute it:
    compute_buffers names it, prepare_on_meta leaves it on meta and prune_sequential refuses before the first block,
    naming it and saying checkpoints do not hold such buffers; with an _init_weights computing it (transformers'
    hook), prepare_on_meta computes it on the CPU (equal to the eagerly built one; the user's model stays on meta),
    and the streamed checkpoint equals in-memory pruning."""
    from fx_sparsity.calibration.meta_device import compute_buffers

    torch.manual_seed(0)
    eager = _InitialisedRotaryStack().eval()
    assert "rotary.inv_freq" not in eager.state_dict()
    source = _save(_state(eager), tmp_path / "source")
    with torch.device("meta"):
        plain, initialised = _RotaryStack().eval(), _InitialisedRotaryStack().eval()
    assert compute_buffers(copy.deepcopy(plain)) == ["rotary.inv_freq"]
    gm = prepare_on_meta(plain, sparsifier=WandaSparsifier(0.5))
    with pytest.raises(ValueError, match=r"\['rotary\.inv_freq'\] are on the meta device and not in the checkpoint.*"
                                         r"non-persistent buffers.*not saved in checkpoints"):
        prune_sequential(gm, _batches(), weights=SafetensorsWeights(source, tmp_path / "out"), progress_bar=False)
    assert not (tmp_path / "out").exists()
    sparsifier = WandaSparsifier(0.5)
    gm = prepare_on_meta(initialised, sparsifier=sparsifier)
    assert torch.equal(gm.get_buffer("rotary.inv_freq"), eager.rotary.inv_freq)
    assert initialised.rotary.inv_freq.is_meta
    prune_sequential(gm, _batches(), weights=SafetensorsWeights(source, tmp_path / "out"), progress_bar=False)
    out = _read_checkpoint(tmp_path / "out")
    reference_sparsifier = WandaSparsifier(0.5)
    reference = prepare(eager, sparsifier=reference_sparsifier)
    prune_sequential(reference, _batches(), progress_bar=False)
    masked = {g["tensor_fqn"] for g in reference_sparsifier.groups}
    assert masked == {g["tensor_fqn"] for g in sparsifier.groups} and len(masked) == 4
    for fqn, tensor in eager.state_dict().items():
        expected = reference.get_parameter(fqn) * reference.get_buffer(fqn + "_mask") if fqn in masked else tensor
        assert torch.equal(out[fqn], expected), fqn
