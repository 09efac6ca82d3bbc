"""``lower(gm, "auto", decisions=path)``: auto's picks kept per layer kind and machine (fx_sparsity/lowering/decisions.py).

A second lowering with the file takes every pick from it without timing the formats against each other (the
timer's sampling is made to fail to prove it), computes what the prepared module computes, and says so in its
notes; a layer of another kind (another density), or the file's picks for another machine, are timed and added;
a pick the file holds is followed even where timing would pick otherwise; a file that is not ours, not JSON,
of another version, or a folder is refused naming it before anything is built, and left as it was.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import fx, nn

from fx_sparsity import WeightNormSparsifier, get_lowering, get_sparsifier, prepare
from fx_sparsity.lowering import lower
from fx_sparsity.lowering.decisions import DECISIONS_VERSION, Decisions, machine_key
from fx_sparsity.lowering.timing import LayerTimer
from passes.lowering import LAYOUTS


def _prepared(level: float, seed: int = 0) -> fx.GraphModule:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 64)).eval()
    gm = prepare(model, sparsifier=WeightNormSparsifier(level))
    get_sparsifier(gm).step()
    return gm


def _no_sampling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Timing a layer's formats against each other fails; timing its masked form and one other (the report's
    before and after) still runs."""
    samples = LayerTimer.samples

    def only_before_and_after(self, variants):
        if len(set(variants) - {"masked"}) > 1:
            raise AssertionError(f"{self.target.tensor_fqn} was timed against the other formats: {sorted(variants)}")
        return samples(self, variants)

    monkeypatch.setattr(LayerTimer, "samples", only_before_and_after)


def test_second_lowering_takes_the_picks_without_timing_them(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "auto.json"
    gm, x = _prepared(0.9), torch.randn(4, 128)
    first = lower(gm, "auto", example_inputs=(x,), repeats=2, progress_bar=False, decisions=path)
    picks = [r.backend for r in get_lowering(first)]
    assert all(p in ("fuse", *LAYOUTS) for p in picks)
    data = json.loads(path.read_text())
    assert data["version"] == DECISIONS_VERSION and list(data["machines"]) == [machine_key()]
    assert sorted(e["backend"] for e in data["machines"][machine_key()].values()) == sorted(picks)
    assert not list(path.parent.glob(".*.tmp"))  # written under a temporary name, then renamed

    _no_sampling(monkeypatch)
    again = lower(gm, "auto", example_inputs=(x,), repeats=2, progress_bar=False, decisions=path)
    records = get_lowering(again)
    assert [r.backend for r in records] == picks
    assert all("decided before on this machine (auto.json)" in r.note for r in records)
    assert all(r.time_before > 0 and r.time_after > 0 for r in records)
    torch.testing.assert_close(again(x), gm(x))
    # Another model of the same layer kinds (shapes, density, inputs) takes the same picks, untimed.
    other = _prepared(0.9, seed=1)
    assert [r.backend for r in get_lowering(lower(other, "auto", example_inputs=(x,), decisions=path,
                                                   progress_bar=False))] == picks


def test_another_kind_or_machine_is_timed_and_added(tmp_path, monkeypatch):
    path = tmp_path / "auto.json"
    x = torch.randn(4, 128)
    lower(_prepared(0.9), "auto", example_inputs=(x,), repeats=2, progress_bar=False, decisions=path)
    assert len(json.loads(path.read_text())["machines"][machine_key()]) == 2
    lower(_prepared(0.5), "auto", example_inputs=(x,), repeats=2, progress_bar=False, decisions=path)
    assert len(json.loads(path.read_text())["machines"][machine_key()]) == 4  # other densities: two new kinds
    # The same picks recorded for another machine are not this machine's: timed again, this machine's added.
    data = json.loads(path.read_text())
    data["machines"] = {"another CPU | isa=avx2 | threads=64": data["machines"][machine_key()]}
    path.write_text(json.dumps(data))
    timed = []
    samples = LayerTimer.samples
    monkeypatch.setattr(LayerTimer, "samples", lambda self, v: timed.append(self.target.tensor_fqn) or samples(self, v))
    lower(_prepared(0.9), "auto", example_inputs=(x,), repeats=2, progress_bar=False, decisions=path)
    assert timed == ["0.weight", "2.weight"]
    assert set(json.loads(path.read_text())["machines"]) == {"another CPU | isa=avx2 | threads=64", machine_key()}


def test_a_kept_pick_is_followed_and_one_the_layer_cannot_take_is_timed_again(tmp_path, monkeypatch):
    path = tmp_path / "auto.json"
    gm, x = _prepared(0.9), torch.randn(4, 128)
    lower(gm, "auto", example_inputs=(x,), repeats=2, progress_bar=False, decisions=path)
    data = json.loads(path.read_text())
    layers = data["machines"][machine_key()]
    keys = sorted(layers, key=lambda k: json.loads(k)["weight"][0])  # [64, 96] ("2.weight") first
    layers[keys[1]]["backend"] = "csr"  # 0.weight: a format it can take, whatever timing said
    layers[keys[0]]["backend"] = "semi_structured_cuda"  # 2.weight: none of its candidates
    path.write_text(json.dumps(data))
    lowered = lower(gm, "auto", example_inputs=(x,), repeats=2, progress_bar=False, decisions=path)
    records = {r.tensor_fqn: r for r in get_lowering(lowered)}
    assert records["0.weight"].backend == "csr" and "decided before" in records["0.weight"].note
    assert "decided before" not in records["2.weight"].note  # timed again, and its pick written over the bad one
    assert json.loads(path.read_text())["machines"][machine_key()][keys[0]]["backend"] == records["2.weight"].backend
    torch.testing.assert_close(lowered(x), gm(x))


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", r"cannot be read as JSON .*delete it or give another path"),
        (json.dumps({"model": "llama"}), r"is not an fx_sparsity decisions file: give another path"),
        (json.dumps({"format": "fx_sparsity auto decisions", "version": 99, "machines": {}}),
         r"has version 99, this fx_sparsity reads version 1: delete it"),
        (json.dumps({"format": "fx_sparsity auto decisions", "version": 1, "machines": {"m": {"k": 3}}}),
         r"is damaged"),
    ],
)
def test_a_file_that_is_not_a_decisions_file_is_refused_and_left_alone(tmp_path, content, match):
    path = tmp_path / "auto.json"
    path.write_text(content)
    gm = _prepared(0.9)
    with pytest.raises(ValueError, match=rf"'{path}'.*" if "JSON" in match else match):
        lower(gm, "auto", example_inputs=(torch.randn(4, 128),), progress_bar=False, decisions=path)
    assert path.read_text() == content


def test_bad_paths_are_refused():
    with pytest.raises(TypeError, match=r"decisions must be a path to a JSON file"):
        lower(_prepared(0.9), "auto", example_inputs=(torch.randn(4, 128),), decisions=3)
    with pytest.raises(ValueError, match=r"is a folder: give a file path"):
        Decisions(".")
