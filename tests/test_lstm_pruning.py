"""nn.LSTM hidden units as channel groups: the dependency pass, shrinking, and torch.ao.pruning's LSTM tests."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.ao.pruning._experimental.pruner import BaseStructuredSparsifier
from torch.ao.pruning._experimental.pruner.parametrization import FakeStructuredSparsity
from torch.testing._internal import common_pruning

from fx_sparsity.structured import ChannelPruner
from helpers import shrunk_copy
from passes import find_channel_groups
from passes.masking import masked_lstm


class _LSTMNet(nn.Module):
    """Linear -> ReLU -> LSTM -> (LayerNorm) -> Linear; only the last Linear's output is returned."""

    def __init__(self, layers: int = 2, proj: int = 0, bidirectional: bool = False, batch_first: bool = False,
                 norm: bool = False, bias: bool = True) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.lstm = nn.LSTM(8, 6, layers, bias=bias, proj_size=proj, bidirectional=bidirectional,
                            batch_first=batch_first)
        width = (proj or 6) * (2 if bidirectional else 1)
        self.norm = nn.LayerNorm(width) if norm else nn.Identity()
        self.out = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.lstm(torch.relu(self.inp(x)))
        return self.out(self.norm(y))


class _FirstOutput(nn.Module):
    """torch.ao.pruning's LSTM test models return the LSTM output or state too; keep the Linear's output only."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[0]


def _units_group(groups):
    return next(g for g in groups if any(m.kind == "producer" and ".weight_hh_l0" in m.target for m in g.members))


def _zero_readers(gm: nn.Module, group, channels: torch.Tensor) -> nn.Module:
    """A copy of ``gm`` whose weight columns reading ``channels`` of ``group`` are zero: the units are cut off."""
    ref = copy.deepcopy(gm)
    with torch.no_grad():
        for m in group.consumers:
            ref.get_parameter(m.target).index_fill_(1, m.indices(channels), 0)
    return ref


def test_lstm_units_group_members():
    """A 2-layer LSTM -> Linear: one group of 6 units holds, per layer, the 4 gate row blocks of weight_ih and weight_hh
    (offsets 0, H, 2H, 3H), both biases, weight_hh's columns, layer 1's weight_ih columns and the Linear's columns;
    the input features group reaches layer 0's weight_ih columns."""
    gm = torch.fx.symbolic_trace(_LSTMNet().eval())
    groups = find_channel_groups(gm, torch.randn(4, 2, 5))
    units = _units_group(groups)
    assert units.size == 6 and units.prunable
    rows = sorted((m.target, m.offset) for m in units.producers)
    assert rows == sorted((f"lstm.weight_{w}_l{l}", k * 6) for w in ("ih", "hh") for l in (0, 1) for k in range(4))
    params = {(m.target, m.offset) for m in units.members if m.kind == "param"}
    assert params == {(f"lstm.bias_{b}_l{l}", k * 6) for b in ("ih", "hh") for l in (0, 1) for k in range(4)}
    assert {(m.target, m.dim) for m in units.consumers} == {
        ("lstm.weight_hh_l0", 1), ("lstm.weight_hh_l1", 1), ("lstm.weight_ih_l1", 1), ("out.weight", 1)
    }
    inputs = next(g for g in groups if any(p.target == "inp.weight" for p in g.producers))
    assert [(m.target, m.dim) for m in inputs.consumers] == [("lstm.weight_ih_l0", 1)]


@pytest.mark.parametrize("kwargs", [
    {}, {"layers": 1}, {"proj": 4}, {"bidirectional": True}, {"batch_first": True}, {"bias": False},
])
def test_shrunk_lstm_equals_the_model_with_its_units_cut_off(kwargs):
    """Removing units 1 and 4 (and input channel 2, whose ReLU(bias) constant folds into bias_ih_l0) gives an LSTM
    of H - 2 units whose output equals the unshrunk model's with every column reading those units zero; it exports."""
    torch.manual_seed(0)
    model = _LSTMNet(**kwargs).eval()
    with torch.no_grad():
        model.inp.bias[2] = 0.7 if kwargs.get("bias", True) else 0.0  # a constant to fold (into bias_ih_l0)
        model.inp.weight[2] = 0
    x = torch.randn(7, 2, 5)
    gm = torch.fx.symbolic_trace(model)
    groups = find_channel_groups(gm, x)
    units = _units_group(groups)
    inputs = next(g for g in groups if any(p.target == "inp.weight" for p in g.producers))
    removed = torch.tensor([1, 4]) if not kwargs.get("proj") else torch.tensor([1])  # proj_size 4 < hidden_size
    ref = _zero_readers(gm, units, removed)
    small, report = shrunk_copy(ref, groups, {units.index: removed, inputs.index: [2]}, x)
    assert small.lstm.hidden_size == 6 - len(removed) and small.lstm.input_size == 7
    assert small.lstm.weight_hh_l0.shape == (4 * (6 - len(removed)), kwargs.get("proj") or 6 - len(removed))
    assert report.exact, report.inexact
    assert report.folded == ((("lstm.weight_ih_l0", "lstm.weight_ih_l0_reverse") if kwargs.get("bidirectional")
                              else ("lstm.weight_ih_l0",)) if kwargs.get("bias", True) else ())
    torch.testing.assert_close(small(x), ref(x), rtol=1e-5, atol=1e-6)
    exported = torch.export.export(small, (x,))
    torch.testing.assert_close(exported.module()(x), small(x))


def test_unit_removal_that_is_not_exact_is_reported():
    """Zeroing the units' gate rows (as a producer mask does) leaves them running on their biases: their state
    varies over time, so the report names the LSTM's internal readers and the Linear as not folded; a LayerNorm
    after the LSTM is reported too, and a missing bias_ih to fold the input constant into."""
    torch.manual_seed(0)
    x = torch.randn(5, 2, 5)
    gm = torch.fx.symbolic_trace(_LSTMNet(norm=True, bias=False).eval())
    groups = find_channel_groups(gm, x)
    units = _units_group(groups)
    inputs = next(g for g in groups if any(p.target == "inp.weight" for p in g.producers))
    with torch.no_grad():
        for p in units.producers:
            gm.get_parameter(p.target).index_fill_(0, p.indices(torch.tensor([0])), 0)
        gm.inp.weight[3] = 0
        gm.inp.bias[3] = 1.0
    _, report = shrunk_copy(gm, groups, {units.index: [0], inputs.index: [3]}, x)
    notes = "\n".join(report.inexact)
    for fqn in ("lstm.weight_hh_l0", "lstm.weight_hh_l1", "lstm.weight_ih_l1"):
        assert f"still feed {fqn} inside the LSTM" in notes
    assert "vary with the input or the position into out.weight" in notes
    assert "LayerNorm norm" in notes
    assert "lstm.weight_ih_l0 has no bias to fold" in notes


@pytest.mark.parametrize("forward, reason", [
    (lambda m, x: m.out(m.lstm(x)[0]) + m.lstm(x)[1][0].sum(), "final state (h_n, c_n) is read"),
    (lambda m, x: m.out(m.lstm(x, (torch.zeros(1, 2, 6), torch.zeros(1, 2, 6)))[0]), "given an initial state hx"),
    (lambda m, x: m.lstm(x), "output tuple is used whole"),
])
def test_state_in_or_out_freezes_the_units(forward, reason):
    """h_n/c_n read, an initial state passed, or the whole output tuple used: every unit space of the LSTM freezes
    with the reason (h_n stacks every layer's units on one axis; a given hx would need slicing too)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm, self.out = nn.LSTM(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            return forward(self, x)

    groups = find_channel_groups(torch.fx.symbolic_trace(Net()), torch.randn(3, 2, 4))
    units = _units_group(groups)
    assert not units.prunable and reason in units.frozen_reason


def test_projection_shrinking_below_hidden_size_is_refused():
    """nn.LSTM needs proj_size < hidden_size: removing hidden units down to the projection size is a ValueError."""
    x = torch.randn(3, 2, 5)
    gm = torch.fx.symbolic_trace(_LSTMNet(proj=4).eval())
    groups = find_channel_groups(gm, x)
    with pytest.raises(ValueError, match="hidden_size 4 and proj_size 4.*proj_size < hidden_size"):
        shrunk_copy(gm, groups, {_units_group(groups).index: [0, 1]}, x)


class _BottomHalfLSTMPruner(BaseStructuredSparsifier):
    """torch.ao.pruning's test pruner: the bottom half of each gate block's rows go (the same units in every gate)."""

    def update_mask(self, module, tensor_name, **kwargs):
        for p in getattr(module.parametrizations, tensor_name):
            if isinstance(p, FakeStructuredSparsity):
                for block in torch.split(p.mask, len(p.mask) // 4):
                    block[len(block) // 2 :] = False


@pytest.mark.parametrize("name, layers", [
    ("LSTMLinearModel", 1), ("LSTMLinearModel", 2), ("LSTMLayerNormLinearModel", 1), ("LSTMLayerNormLinearModel", 2),
])
def test_matches_torch_ao_lstm_pruning(name, layers):
    """Port of torch.ao.pruning's test_prune_lstm_(layernorm_)linear_(single|multiple)_layer: its pruner removes the
    bottom half of the units in every gate of every layer, and prune() slices the LSTM, LayerNorm and Linear. Ours
    removes the same units (one group across layers) and gives the same module: same parameters, and the same output
    on a sequence (torch.ao.pruning's test compares outputs only for one time step, where the recurrence is idle)."""
    torch.manual_seed(0)
    model = getattr(common_pruning, name)(8, 8, 8, layers).eval()
    ours_in = _FirstOutput(copy.deepcopy(model)).eval()
    config = [{"tensor_fqn": f"lstm.weight_{w}_l{l}"} for l in range(layers) for w in ("ih", "hh")]
    pruner = _BottomHalfLSTMPruner({"sparsity_level": 0.5})
    pruner.prepare(model, config)
    pruner.enable_mask_update = True
    pruner.step()
    theirs = pruner.prune().eval()

    x = torch.randn(6, 2, 8)
    gm = torch.fx.symbolic_trace(ours_in)
    groups = find_channel_groups(gm, x)
    small, report = shrunk_copy(gm, groups, {_units_group(groups).index: torch.arange(4, 8)}, x)
    lstm = small.get_submodule("model.lstm")
    assert lstm.hidden_size == theirs.lstm.hidden_size == 4
    for pname, param in theirs.named_parameters():
        torch.testing.assert_close(small.get_parameter(f"model.{pname}"), param, rtol=0, atol=0)
    torch.testing.assert_close(small(x), theirs(x)[0])
    # Ours reports why its result is not the unshrunk model's: the cut units still fed the others.
    assert "still feed model.lstm.weight_hh_l0 inside the LSTM" in "\n".join(report.inexact)


def _masked_reference(model: nn.Module, gm: nn.Module, pruner: ChannelPruner) -> nn.Module:
    """A copy of the eager ``model`` whose parameters are multiplied by the masks ``pruner`` set in ``gm``."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for record in pruner.records:
            ref.get_parameter(record.tensor_fqn).mul_(gm.get_buffer(f"{record.tensor_fqn}_mask"))
    return ref


def _prepared(kwargs=None, mask_consumers=False, x=None):
    torch.manual_seed(0)
    model = _LSTMNet(**(kwargs or {})).eval()
    with torch.no_grad():
        model.inp.bias.uniform_(0.1, 1.0)  # removed features carry ReLU(bias) > 0 into the LSTM
    pruner = ChannelPruner(0.5, mask_consumers=mask_consumers)
    gm = pruner.prepare(model, example_inputs=x if x is not None else torch.randn(7, 2, 5))
    return model, pruner, gm


@pytest.mark.parametrize("mask_consumers", [False, True])
@pytest.mark.parametrize("kwargs", [{}, {"layers": 1}, {"proj": 4, "bidirectional": True}, {"batch_first": True}])
def test_channel_pruner_masks_lstm_units_and_shrink_is_exact(kwargs, mask_consumers):
    """ChannelPruner on Linear -> LSTM -> Linear masks half the hidden units: their rows in the 4 gate blocks of
    every layer's weight_ih/weight_hh (and weight_hr's rows with a projection) and both biases (with mask_consumers,
    the columns reading them too). The masked module equals the eager model with those entries zeroed; shrink removes
    the units (h = c = 0 for a unit whose gate rows and biases are zero, so the report is exact) with the masked
    module's output; both export; the user's model is untouched."""
    x = torch.randn(7, 2, 5)
    model, pruner, gm = _prepared(kwargs, mask_consumers, x)
    before = copy.deepcopy(model.state_dict())
    units = _units_group(pruner.channel_groups)
    assert units.index not in pruner.frozen and units.index in pruner.pruned_groups()
    masked = {r.tensor_fqn for r in pruner.records}
    assert {m.target for m in units.members if m.kind in ("producer", "param")} <= masked
    assert pruner.unfollowed == {}
    pruner.step()
    removed = pruner.removed_channels()[units.index]
    assert len(removed) == 3
    for m in units.members:
        if m.kind in ("producer", "param") or (mask_consumers and m.kind == "consumer"):
            mask = gm.get_buffer(f"{m.target}_mask")
            assert not mask.movedim(m.dim, 0)[m.indices(removed)].any(), m
    ref = _masked_reference(model, gm, pruner)
    torch.testing.assert_close(gm(x), ref(x))
    assert not torch.allclose(gm(x), model(x))

    from fx_sparsity import shrink_report
    from fx_sparsity.structured import shrink

    small = shrink(gm)
    assert small.lstm.hidden_size == 3 and small.lstm.input_size == 4
    assert shrink_report(small).exact, shrink_report(small).inexact
    torch.testing.assert_close(small(x), gm(x), rtol=1e-5, atol=1e-6)
    for module in (gm, small):
        exported = torch.export.export(module, (x,))
        torch.testing.assert_close(exported.module()(x), module(x))
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_lstm_units_are_masked_through_fine_tuning():
    """Fine-tuning the masked module: gradients reach the LSTM's weights (zero on masked entries), an optimizer step
    keeps the output equal to the eager model with the masked entries zeroed, the next step() keeps the removed units
    (their masked rows score 0) and shrink stays exact."""
    x, target = torch.randn(7, 2, 5), torch.randn(7, 2, 3)
    model, pruner, gm = _prepared(x=x)
    model = copy.deepcopy(model)  # the prepared module trains the user's parameters: keep a copy to compare with
    pruner.step()
    units = _units_group(pruner.channel_groups)
    removed = pruner.removed_channels()[units.index]
    gm.train()
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        nn.MSELoss()(gm(x), target).backward()
        grad, mask = gm.lstm.weight_hh_l1.grad, gm.lstm.weight_hh_l1_mask.bool()
        assert grad is not None and bool(grad[mask].any()) and not grad[~mask].any()
        assert gm.lstm.bias_ih_l0.grad is not None
        optimizer.step()
    gm.eval()
    pruner.step()
    torch.testing.assert_close(pruner.removed_channels()[units.index], removed)
    torch.testing.assert_close(gm(x), _masked_reference(gm, gm, pruner)(x))

    from fx_sparsity import shrink_report
    from fx_sparsity.structured import shrink

    small = shrink(gm)
    assert shrink_report(small).exact
    torch.testing.assert_close(small(x), gm(x), rtol=1e-5, atol=1e-6)


def test_lstm_masks_state_dict_round_trip_squash_and_save(tmp_path):
    """The pruner's state dict carries the LSTM masks: a second pruner loading it gives the same masks and output;
    the masked module saves and loads; squash_mask turns the functional LSTM back into its call_module with fused
    weights (no mask buffer left) and the same output, leaving the user's weights dense."""
    x = torch.randn(7, 2, 5)
    model, pruner, gm = _prepared(x=x)
    pruner.step()
    state = pruner.state_dict()
    assert "lstm.weight_hh_l0" in state["state"] and "lstm.bias_hh_l1" in state["state"]
    other = ChannelPruner(0.5)
    gm2 = other.prepare(model, example_inputs=x)
    other.load_state_dict(state)
    for record in pruner.records:
        assert torch.equal(gm2.get_buffer(f"{record.tensor_fqn}_mask"), gm.get_buffer(f"{record.tensor_fqn}_mask"))
    torch.testing.assert_close(gm2(x), gm(x), rtol=0, atol=0)
    torch.save(gm, tmp_path / "masked.pt")
    torch.testing.assert_close(torch.load(tmp_path / "masked.pt", weights_only=False)(x), gm(x), rtol=0, atol=0)

    expected = gm(x)
    dense = model.lstm.weight_hh_l0.detach().clone()
    squashed = pruner.squash_mask()
    calls = [(n.op, n.target) for n in squashed.graph.nodes if n.op in ("call_module", "call_function")]
    assert ("call_module", "lstm") in calls and not any(t is masked_lstm for _, t in calls)
    assert not [name for name, _ in squashed.named_buffers() if name.endswith("_mask")]
    torch.testing.assert_close(squashed(x), expected, rtol=0, atol=0)
    assert torch.equal(model.lstm.weight_hh_l0, dense) and bool(model.lstm.weight_hh_l0.all())


def test_lstm_masks_in_tables_and_lowering():
    """sparsity_table and graph_table list every LSTM mask; lower(gm, "fuse") fuses them (same output, call_module
    restored); a sparse backend fuses them too and says why in the lowering table; lower(gm, "shrink") removes units;
    calibrate observes the Linear only (the LSTM parameters have no input of their own)."""
    import fx_sparsity

    x = torch.randn(7, 2, 5)
    _, pruner, gm = _prepared(x=x)
    pruner.step()
    fqns = [r.tensor_fqn for r in pruner.records if r.tensor_fqn.startswith("lstm.")]
    assert len(fqns) == 8
    table, graph = fx_sparsity.report.sparsity_table(gm), fx_sparsity.report.graph_table(gm)
    for fqn in fqns:
        module, _, name = fqn.rpartition(".")
        assert f"{module} [{name}]" in table and f"MASK {fqn}_mask" in graph
    lowered = fx_sparsity.lower(gm, "fuse")
    assert [n.target for n in lowered.graph.nodes if n.op == "call_module"].count("lstm") == 1
    torch.testing.assert_close(lowered(x), gm(x), rtol=0, atol=0)
    assert all(fqn in fx_sparsity.report.lowering_table(lowered) for fqn in fqns)
    sparse = fx_sparsity.lower(gm, "csr")
    assert "no sparse LSTM kernel" in fx_sparsity.report.lowering_table(sparse)
    torch.testing.assert_close(sparse(x), gm(x))
    small = fx_sparsity.lower(gm, "shrink", example_inputs=(x,))
    assert small.lstm.hidden_size == 3
    assert sorted(fx_sparsity.calibrate(gm, [x], progress_bar=False)) == ["inp.weight"]  # an LSTM has no input to observe
    torch.testing.assert_close(small(x), gm(x), rtol=1e-5, atol=1e-6)


def test_only_channel_pruner_masks_lstm_weights():
    """Unstructured sparsifiers keep selecting Linear/Conv weights by default, and a config naming an LSTM weight for
    them is a ValueError naming it; ChannelPruner with a config naming one LSTM weight prunes that LSTM's units."""
    import fx_sparsity

    x = torch.randn(7, 2, 5)
    model = _LSTMNet().eval()
    gm = fx_sparsity.prepare(model, example_inputs=(x,))
    assert [r.tensor_fqn for r in fx_sparsity.get_sparsifier(gm).records] == ["inp.weight", "out.weight"]
    with pytest.raises(ValueError, match="'lstm.weight_ih_l0' is a Parameter of LSTM module.*only ChannelPruner masks"):
        fx_sparsity.prepare(model, {"lstm.weight_ih_l0": {}}, example_inputs=(x,))
    pruner = ChannelPruner(0.5)
    pruner.prepare(model, {"lstm.weight_hh_l1": {"sparsity_level": 0.34}}, example_inputs=x)
    pruner.step()
    units = _units_group(pruner.channel_groups)
    assert list(pruner.removed_channels()) == [units.index] and len(pruner.removed_channels()[units.index]) == 2


@pytest.mark.parametrize("kwargs", [{}, {"batch_first": True, "proj_size": 2, "num_layers": 2}])
def test_masked_lstm_equals_nn_lstm(kwargs):
    """masked_lstm with the LSTM's own parameters equals nn.LSTM exactly: batched, unbatched, and with a given hx."""
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, **kwargs)
    layers, h = kwargs.get("num_layers", 1), kwargs.get("proj_size") or 4
    params = list(lstm._flat_weights)
    x, x1 = torch.randn(*((2, 5) if kwargs.get("batch_first") else (5, 2)), 3), torch.randn(5, 3)
    hx = (torch.randn(layers, 2, h), torch.randn(layers, 2, 4))
    hx1 = (torch.randn(layers, h), torch.randn(layers, 4))
    for args in ((x,), (x1,), (x, hx), (x1, hx1)):
        ours, theirs = masked_lstm(lstm, *args[:1], params, *args[1:]), lstm(*args)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs", [{}, {"proj": 4, "bidirectional": True}])
def test_macs_count_lstm_weight_products_and_shrunk_module_saves(kwargs, tmp_path):
    """count_macs adds, per LSTM, steps x (every weight matrix's entries): 7 steps x batch 2 here; the shrunk LSTM's
    MACs follow its smaller matrices, and the shrunk module saves and loads with the same output."""
    x = torch.randn(7, 2, 5)
    gm = torch.fx.symbolic_trace(_LSTMNet(**kwargs).eval())
    groups = find_channel_groups(gm, x)
    units = _units_group(groups)
    small, report = shrunk_copy(gm, groups, {units.index: [0]}, x)

    def expected(module):
        lstm_weights = sum(w.numel() for n, w in module.lstm.named_parameters() if n.startswith("weight_"))
        return 14 * (module.inp.weight.numel() + lstm_weights + module.out.weight.numel())

    assert (report.macs_before, report.macs_after) == (expected(gm), expected(small))
    assert report.macs_after < report.macs_before
    torch.save(small, tmp_path / "small.pt")
    loaded = torch.load(tmp_path / "small.pt", weights_only=False)
    torch.testing.assert_close(loaded(x), small(x))


def test_taylor_scores_read_the_lstm_input_columns():
    """criterion='taylor' on Linear -> LSTM: the features group's score includes |w x grad| of lstm.weight_ih_l0's
    columns (a consumer member), checked against a direct computation."""
    torch.manual_seed(0)
    from fx_sparsity.structured import accumulate_gradients

    x, target = torch.randn(7, 2, 5), torch.randn(7, 2, 3)
    model = _LSTMNet(layers=1).eval()
    pruner = ChannelPruner(0.5, criterion="taylor")
    gm = pruner.prepare(model, example_inputs=x)
    grads = accumulate_gradients(gm, [(x, target)], nn.MSELoss())
    inputs = next(g for g in pruner.channel_groups if any(p.target == "inp.weight" for p in g.producers))
    score = pruner.importance()[inputs.index]
    loss = nn.MSELoss()(model(x), target)
    gi, gb, gl = torch.autograd.grad(loss, [model.inp.weight, model.inp.bias, model.lstm.weight_ih_l0])
    direct = ((model.inp.weight * gi).abs().sum(1) + (model.inp.bias * gb).abs()
              + (model.lstm.weight_ih_l0 * gl).abs().sum(0))
    assert "lstm.weight_ih_l0" in grads
    torch.testing.assert_close(score, direct.detach(), rtol=1e-4, atol=1e-6)
