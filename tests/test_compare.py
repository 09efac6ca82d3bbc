"""compare: per-layer and output errors of pruned forms against a dense reference, checked by hand."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fx_sparsity
from fx_sparsity import WandaSparsifier, prepare
from fx_sparsity.calibration import calibrate
from fx_sparsity.report import compare, print_compare
from fx_sparsity.sparsifier import SparseGPTSparsifier
from helpers import ConvNet1d3d, TinyResNet, snapshot


class Net(nn.Module):
    """Two Linears and a Linear called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.a(x))
        return self.c(torch.relu(self.b(torch.relu(self.b(x)))))


def by_hand(reference: nn.Module, candidate: nn.Module, batches) -> dict[str, float]:
    """Relative errors from forward hooks on two eager modules, summed over batches and calls."""
    sums = {}
    for model, slot in ((reference, 0), (candidate, 1)):
        outs = {}
        hooks = [getattr(model, n).register_forward_hook(lambda m, i, o, n=n: outs.setdefault(n, []).append(o))
                 for n in "abc"]
        with torch.no_grad():
            outs["output"] = [model(x) for x in batches]
        for h in hooks:
            h.remove()
        sums[slot] = outs
    return {
        n: (sum((c.double() - r.double()).square().sum() for c, r in zip(sums[1][n], sums[0][n]))
            / sum(r.double().square().sum() for r in sums[0][n])).sqrt().item()
        for n in sums[0]
    }


def test_errors_equal_hand_computation_for_every_form():
    """Net pruned by SparseGPT: compare's errors for the prepared, squashed, 'fuse'- and 'csr'-lowered forms equal
    those of an eager copy holding the pruned weights; the dense model against itself gives zeros."""
    torch.manual_seed(0)
    model = Net()
    batches = [torch.randn(8, 16) for _ in range(3)]
    sparsifier = SparseGPTSparsifier(0.5, block_size=8)
    gm = prepare(model, sparsifier=sparsifier)
    calibrate(gm, batches, progress_bar=False)
    sparsifier.step()
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for n in "abc":
            getattr(pruned, n).weight.copy_(gm.get_parameter(f"{n}.weight") * gm.get_buffer(f"{n}.weight_mask"))
    expected = by_hand(model, pruned, batches)
    assert expected["b"] > 0
    forms = {"prepared": gm, "csr": fx_sparsity.lower(gm, "csr"), "fuse": fx_sparsity.lower(gm, "fuse"),
             "eager": pruned}
    for form, candidate in forms.items():
        report = compare(model, candidate, batches)
        assert [e.name for e in report.layers] == ["a", "b", "c"], form
        assert [e.calls for e in report.layers] == [3, 6, 3], form
        for e in report.layers:
            assert e.relative_error == pytest.approx(expected[e.name], rel=1e-5, abs=1e-7), (form, e)
        assert report.output_error == pytest.approx(expected["output"], rel=1e-5, abs=1e-7), form
    squashed = sparsifier.squash_mask()
    assert compare(model, squashed, batches).output_error == pytest.approx(expected["output"], rel=1e-5)
    same = compare(model, copy.deepcopy(model), batches)
    assert same.output_error == 0 and all(e.relative_error == 0 for e in same.layers)


def test_conv_layers_and_reports(capsys):
    """ConvNet1d3d with Wanda, lowered to csr (channels moved last around the kernel): conv errors equal the
    prepared module's; print_compare prints every layer and the output."""
    torch.manual_seed(0)
    model = ConvNet1d3d()
    batches = [(torch.randn(2, 4, 16), torch.randn(2, 2, 4, 6, 6))]
    sparsifier = WandaSparsifier(0.5)
    gm = prepare(model, sparsifier=sparsifier)
    calibrate(gm, batches, progress_bar=False)
    sparsifier.step()
    prepared = compare(model, gm, batches)
    lowered = compare(model, fx_sparsity.lower(gm, "csr"), batches)
    for p, q in zip(prepared.layers, lowered.layers):
        assert p.relative_error > 0 and q.relative_error == pytest.approx(p.relative_error, rel=1e-5)
    print_compare(model, gm, batches)
    out = capsys.readouterr().out
    assert "c1" in out and "c3" in out and "(output)" in out


class NoB(nn.Module):
    """Net without its middle layer."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.c = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.a(x)))


def test_missing_layers_and_errors():
    """A layer the candidate does not run, or the reference never calls, is reported with a note, not dropped;
    unknown layers and no batches raise."""
    torch.manual_seed(0)
    model = Net()
    model.unused = nn.Linear(3, 3)
    report = compare(model, NoB(), [torch.randn(2, 16)])
    notes = {e.name: (e.relative_error, e.note) for e in report.layers}
    assert notes["b"] == (None, "not found in the candidate")
    assert notes["unused"] == (None, "not run by the reference")
    assert notes["a"][0] > 0 and report.output_error > 0
    with pytest.raises(ValueError, match=r"layers \['zz'\] are not modules"):
        compare(model, model, [torch.randn(2, 16)], layers=["zz"])
    with pytest.raises(ValueError, match="at least one batch"):
        compare(model, model, [])


def test_compare_leaves_the_users_model_alone():
    """compare(model, gm, ...) on a TinyResNet in training mode runs both in eval mode: BatchNorm statistics and
    hooks of the user's model are as before, and its training flags are restored."""
    model = TinyResNet().train()
    gm = fx_sparsity.prepare(model)
    fx_sparsity.get_sparsifier(gm).step()
    before = snapshot(model)
    report = fx_sparsity.compare(model, gm, [torch.randn(2, 3, 16, 16)])
    after = snapshot(model)
    assert all(torch.equal(before["state"][k], v) for k, v in after["state"].items())
    assert all(m.training and not m._forward_hooks for m in model.modules())
    assert 0 < report.output_error < 1


def test_compare_table_lines_up_forms_and_to_model_matches_prepared():
    """Net pruned by Wanda: compare_table puts the prepared, csr-lowered and to_model forms side by side, each
    column the report's own numbers (to_model's equal to the prepared module's, it holds the same weights); reports
    on different layers and an empty dict raise."""
    from fx_sparsity.deploy import to_model
    from fx_sparsity.report import compare_table

    torch.manual_seed(0)
    model = Net()
    batches = [torch.randn(8, 16) for _ in range(2)]
    sparsifier = WandaSparsifier(0.5)
    gm = prepare(model, sparsifier=sparsifier)
    calibrate(gm, batches, progress_bar=False)
    sparsifier.step()
    reports = {"prepared": compare(model, gm, batches), "csr": compare(model, fx_sparsity.lower(gm, "csr"), batches),
               "to_model": compare(model, to_model(gm), batches)}
    assert reports["to_model"] == reports["prepared"]
    lines = compare_table(reports).splitlines()
    assert lines[0].split() == ["layer", "prepared", "csr", "to_model", "note"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert list(rows) == ["a", "b", "c", "(output)"]
    for i, form in enumerate(reports):
        for e in reports[form].layers:
            assert rows[e.name][i] == f"{e.relative_error:.3e}"
        assert rows["(output)"][i] == f"{reports[form].output_error:.3e}"
    with pytest.raises(ValueError, match=r"reports\['other'\] lists the layers \['a'\]"):
        compare_table({"prepared": reports["prepared"], "other": compare(model, gm, batches, layers=["a"])})
    with pytest.raises(ValueError, match="non-empty dict"):
        compare_table({})


def test_lowered_tied_weights_are_credited_to_the_calling_layer():
    """DemoNet's mix and mix_t share one weight (mix called twice): lowered to csr, each sparse-kernel call is
    credited to the module that called it (the lowering keeps the layer on the node), so every layer's error and
    call count equal the prepared module's, with no layer missing."""
    from fx_sparsity.cli import DemoNet

    torch.manual_seed(0)
    model = DemoNet().eval()
    gm = fx_sparsity.prepare(model)
    fx_sparsity.get_sparsifier(gm).step()
    batches = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    prepared = compare(model, gm, batches)
    lowered = compare(model, fx_sparsity.lower(gm, "csr"), batches)
    assert [layer.name for layer in lowered.layers] == ["conv1", "conv2", "proj", "mix", "mix_t"]
    for p, q in zip(prepared.layers, lowered.layers):
        assert (q.name, q.calls, q.note) == (p.name, p.calls, p.note)
        assert q.relative_error == pytest.approx(p.relative_error, rel=1e-4)
    assert [layer.calls for layer in lowered.layers] == [2, 2, 2, 4, 2]
