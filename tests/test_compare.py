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


@pytest.mark.parametrize("function", [compare, print_compare])
@pytest.mark.parametrize("batches, match", [
    (None, "batches must be an iterable of model inputs.*got NoneType"),
    (5, "batches must be an iterable of model inputs.*got int"),
    (torch.randn(4, 16), r"got Tensor \(wrap one tensor in a list: \[x\]; alone it would run row by row\)"),
])
def test_batches_that_are_no_iterable_of_inputs_are_refused(function, batches, match, capsys):
    """compare / print_compare with batches=None, 5 (a TypeError not naming batches) or one tensor (run row by row,
    each row a batch of its own, where calibrate refuses it): a TypeError naming batches and the fix, nothing
    printed."""
    model = Net()
    gm = prepare(model)
    with pytest.raises(TypeError, match=match):
        function(model, gm, batches)
    assert capsys.readouterr().out == ""


def test_one_layer_given_as_a_string_is_that_layer():
    """layers='fc1' on a Sequential of fc1, relu, fc2 is the layer fc1 (it was read as ['f', 'c', '1'], which are not
    modules); an unknown name lists the closest FQNs, a non-string entry is refused."""
    from collections import OrderedDict

    model = nn.Sequential(OrderedDict(fc1=nn.Linear(16, 32), relu=nn.ReLU(), fc2=nn.Linear(32, 8)))
    gm = prepare(model)
    fx_sparsity.get_sparsifier(gm).step()
    batches = [torch.randn(4, 16)]
    report = compare(model, gm, batches, layers="fc1")
    assert report == compare(model, gm, batches, layers=["fc1"])
    assert [e.name for e in report.layers] == ["fc1"] and report.layers[0].relative_error > 0
    with pytest.raises(ValueError, match=r"layers \['fc3'\] are not modules of the reference Sequential; closest FQNs: fc2, fc1"):
        compare(model, gm, batches, layers="fc3")
    with pytest.raises(TypeError, match="layers must hold module FQNs"):
        compare(model, gm, batches, layers=[0])


@pytest.mark.parametrize("reference, candidate, match", [
    ("model", "gm", "reference must be an nn.Module .*got str 'model'"),
    ("net", None, "candidate must be an nn.Module .*got NoneType None"),
])
def test_a_reference_or_candidate_that_is_no_module_is_refused(reference, candidate, match):
    """compare(reference='model') or candidate=None (AttributeError on named_modules / a call of None): a TypeError
    naming the argument and its value."""
    model = Net()
    gm = prepare(model)
    values = {"net": model, "gm": gm, "model": "model", None: None}
    with pytest.raises(TypeError, match=match):
        compare(values[reference], values[candidate], [torch.randn(4, 16)])


def test_a_batch_with_inputs_the_models_do_not_take_is_refused():
    """A batch with an extra input: the prepared GraphModule (run by an fx.Interpreter) would drop it silently and
    the reference would fail with its own error; compare refuses it naming the batch and the extra input."""
    model = Net()
    gm = prepare(model)
    with pytest.raises(TypeError, match=r"batch 0 of batches holds 2 positional inputs, but Net's forward takes 1 "
                                        r"\(x\): batch 0 of batches\[1\] \(a tensor of shape \(3,\)\)"):
        compare(model, gm, [(torch.randn(4, 16), torch.randn(3))])


def test_compare_table_refuses_a_value_that_is_no_report():
    """compare_table({'prepared': report, 'lowered': 'x'}): a TypeError naming reports['lowered'] (an AttributeError
    on .layers before)."""
    from fx_sparsity.report import compare_table

    model = Net()
    gm = prepare(model)
    report = compare(model, gm, [torch.randn(4, 16)])
    with pytest.raises(TypeError, match=r"reports\['lowered'\] must be a CompareReport .*got str"):
        compare_table({"prepared": report, "lowered": "x"})
    with pytest.raises(TypeError, match=r"reports\['prepared'\] must be a CompareReport .*got NoneType"):
        compare_table({"prepared": None})
