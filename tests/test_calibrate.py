"""calibrate's protocol: the sparsifier chooses the observer and what is kept of it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fx_sparsity
from fx_sparsity import MagnitudeSparsifier, prepare
from fx_sparsity.calibration import calibrate
from helpers import MixedNet, TinyResNet, count_nodes, snapshot
from passes import insert_input_observers
from passes.calibration import InputHessianObserver


class CountingSparsifier(MagnitudeSparsifier):
    """Magnitude pruning that also counts the rows each weight's ops saw, through the calibration protocol."""

    calibration_key = "rows"

    def calibration_observer(self, group, target, ops):
        self.seen_ops = getattr(self, "seen_ops", {}) | {group["tensor_fqn"]: ops}
        return InputHessianObserver.for_target(target, ops)

    def calibration_statistic(self, group, observer):
        return observer.rows


def test_sparsifier_chooses_observer_and_statistic():
    """MixedNet: the sparsifier's observer sees every use of a weight (shared Linear used 3 times, tied), gets each
    op's conv arguments (the reflect pad included), and its statistic lands under its key; the graph is unchanged."""
    torch.manual_seed(0)
    sparsifier = CountingSparsifier(0.5)
    gm = prepare(MixedNet(), sparsifier=sparsifier)
    code = gm.code
    rows = calibrate(gm, [torch.randn(2, 3, 8, 8), torch.randn(3, 3, 8, 8)], progress_bar=False)
    assert gm.code == code
    assert rows["fc.weight"] == 5 and rows["shared.weight"] == 15 and rows["conv.weight"] == 5 * 64
    assert sparsifier.state["shared.weight"]["rows"] == 15 and "input_norm" not in sparsifier.state["fc.weight"]
    assert sparsifier.seen_ops["conv_reflect.weight"] == [
        {"stride": (1, 1), "padding": (0, 0), "dilation": (1, 1), "groups": 1, "pad": ((1, 1, 1, 1), "reflect")}
    ]
    assert sparsifier.seen_ops["fc.weight"] == [{}]


def test_sparsifier_without_protocol_gets_input_norms():
    """A sparsifier that does not say what it observes gets input-channel norms, as before."""
    sparsifier = MagnitudeSparsifier(0.5)
    gm = prepare(nn.Sequential(nn.Linear(4, 3)), sparsifier=sparsifier)
    x = torch.randn(5, 4)
    norms = calibrate(gm, [x], progress_bar=False)
    torch.testing.assert_close(norms["0.weight"], x.norm(dim=0))
    assert torch.equal(sparsifier.state["0.weight"]["input_norm"], norms["0.weight"])


def test_refusing_factory_leaves_graph_unchanged():
    """A factory that raises stops insert_input_observers before any node or module is added."""
    gm = prepare(MixedNet(), sparsifier=MagnitudeSparsifier())
    nodes, modules = count_nodes(gm), set(dict(gm.named_modules()))

    def refuse(target, ops):
        raise ValueError(f"no observer for {target.tensor_fqn}")

    with pytest.raises(ValueError, match="no observer for fc.weight"):
        insert_input_observers(gm, {"conv.weight": InputHessianObserver.for_target, "fc.weight": refuse})
    assert count_nodes(gm) == nodes and set(dict(gm.named_modules())) == modules


def test_calibrate_leaves_batchnorm_statistics_alone():
    """TinyResNet in training mode: calibrate runs the batches in eval mode, so the user's BatchNorm running
    statistics and num_batches_tracked do not move, and every module's training flag is restored."""
    model = TinyResNet().train()
    before = snapshot(model)
    gm = fx_sparsity.prepare(model, sparsifier=fx_sparsity.WandaSparsifier(0.5))
    fx_sparsity.calibrate(gm, [torch.randn(2, 3, 16, 16) for _ in range(2)], progress_bar=False)
    after = snapshot(model)
    assert all(torch.equal(before["state"][k], v) for k, v in after["state"].items())
    assert all(m.training for m in gm.modules())


@pytest.mark.parametrize(
    "batches, error, match",
    [
        (None, TypeError, "batches must be an iterable of model inputs"),
        (torch.randn(2, 24), TypeError, r"wrap one tensor in a list: \[x\]"),
        ([torch.randn(2, 24), "text"], TypeError, "batch 1 of batches must be a tensor, a tuple"),
        ([[]], TypeError, "batch 0 of batches holds no tensor"),
        ([], ValueError, "at least one batch"),
    ],
)
def test_calibrate_checks_its_batches(batches, error, match):
    """Bad batches get a TypeError naming the batch (a list used to fail with "'list' object has no attribute
    'dim'", None with a bare NoneType error); the observers are gone afterwards and no statistic is stored."""
    model = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 4))
    sparsifier = fx_sparsity.WandaSparsifier(0.5)
    gm = fx_sparsity.prepare(model, sparsifier=sparsifier)
    code = gm.code
    with pytest.raises(error, match=match):
        fx_sparsity.calibrate(gm, batches, progress_bar=False)
    assert gm.code == code and not any("input_norm" in s for s in sparsifier.state.values())


def test_calibrate_batch_forms():
    """A tensor, a tuple, a list (as a DataLoader of a TensorDataset yields) and a dict of keyword inputs per batch
    give the same norms."""
    model = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(4, 24)
    norms = []
    for batch in (x, (x,), [x], {"input": x}):
        gm = fx_sparsity.prepare(model, sparsifier=fx_sparsity.WandaSparsifier(0.5))
        norms.append(fx_sparsity.calibrate(gm, [batch], progress_bar=False)["0.weight"])
    assert all(torch.equal(n, norms[0]) for n in norms)

