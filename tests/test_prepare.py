"""The prepare recipe's contracts: typed groups under the torch.ao dict view, one sparsifier per prepared
module, hooks refused before anything is built, and sparsifiers that pickle."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

from fx_sparsity import (
    CubicSL,
    LambdaSL,
    MagnitudeSparsifier,
    NMSparsifier,
    SparseGPTSparsifier,
    WandaSparsifier,
    WeightNormSparsifier,
    get_lowering,
    get_sparsifier,
    get_unmatched,
    prepare,
)
from fx_sparsity.calibration import calibrate
from fx_sparsity.lowering import lower
from fx_sparsity.report import sparsity_table
from fx_sparsity.sparsifier import GroupView, WeightGroup
from helpers import ImplementedSparsifier, SimpleLinear, snapshot


@torch.fx.wrap
def _hidden_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, weight)


class HiddenWeightNet(nn.Module):
    """fc is called as a module; proj's weight is only used inside a torch.fx.wrap'ed function (as swin_t does)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _hidden_linear(self.fc(x), self.proj.weight)


def test_groups_are_typed_records_under_a_dict_view():
    """SimpleLinear: each group is a GroupView over a frozen WeightGroup; writing an argument validates it first."""
    sparsifier = WeightNormSparsifier(sparsity_level=0.5)
    gm = prepare(SimpleLinear(), ["linear1"], sparsifier=sparsifier)
    (view,) = sparsifier.groups
    assert isinstance(view, GroupView) and isinstance(view.record, WeightGroup)
    assert sparsifier.records == (view.record,)
    assert view.record == WeightGroup("linear1.weight", "linear", (4, 4), {
        "sparsity_level": 0.5, "sparse_block_shape": (1, 4), "zeros_per_block": None})
    assert dict(view) == {"tensor_fqn": "linear1.weight", "module_fqn": "linear1", "tensor_name": "weight",
                          "module": gm.linear1, **view.record.args}
    view["sparsity_level"] = 0.75
    assert sparsifier.records[0].args["sparsity_level"] == 0.75
    with pytest.raises(ValueError, match="sparsity_level of linear1.weight must be a number, got NaN"):
        view["sparsity_level"] = float("nan")
    with pytest.raises(KeyError, match="names the weight"):
        view["tensor_fqn"] = "linear2.weight"
    with pytest.raises(KeyError, match="not an argument"):
        view["sparsity"] = 0.5
    with pytest.raises(TypeError):
        view.record.args["sparsity_level"] = 0.1
    assert sparsifier.records[0].args["sparsity_level"] == 0.75
    sparsifier.update_group("linear1.weight", sparsity_level=0.25)
    sparsifier.step()
    assert gm.get_buffer("linear1.weight_mask").float().mean().item() == 0.75


def test_scheduler_levels_are_checked_before_any_is_set():
    """A LambdaSL whose factor drives a level above 1 raises at scheduler.step() for a sparsifier that refuses such
    levels (fx_sparsity's own; WeightNormSparsifier clamps them, as torch.ao.pruning does), and a NaN level for any,
    leaving every level as it was."""
    sparsifier = MagnitudeSparsifier(sparsity_level=0.8)
    prepare(SimpleLinear(), None, sparsifier=sparsifier)
    scheduler = LambdaSL(sparsifier, lambda epoch: 1.0 + epoch)  # epoch 0: 0.8; epoch 1: 1.6
    sparsifier.step()
    before = sparsifier.records
    with pytest.raises(ValueError, match="must be in"):
        scheduler.step()
    assert sparsifier.records == before
    sparsifier = WeightNormSparsifier(sparsity_level=0.8)
    prepare(SimpleLinear(), None, sparsifier=sparsifier)
    scheduler = LambdaSL(sparsifier, lambda epoch: float("nan") if epoch else 1.0)
    sparsifier.step()
    before = sparsifier.records
    with pytest.raises(ValueError, match="got NaN"):
        scheduler.step()
    assert sparsifier.records == before
    with pytest.raises(TypeError, match="sparsifier must be an fx_sparsity BaseSparsifier"):
        CubicSL(object())


def test_a_sparsifier_serves_one_prepared_module():
    """Preparing a second model with a bound sparsifier is refused before capture: it used to retarget silently,
    so get_sparsifier(gm1).step() updated gm2."""
    sparsifier = MagnitudeSparsifier(0.5)
    gm1 = prepare(SimpleLinear(), sparsifier=sparsifier)
    second = SimpleLinear()
    before = snapshot(second)
    with pytest.raises(ValueError, match="serves one prepared module"):
        prepare(second, sparsifier=sparsifier)
    with pytest.raises(ValueError, match="serves one prepared module"):
        sparsifier.prepare(second, None)
    assert snapshot(second)["attrs"] == before["attrs"]
    assert get_sparsifier(gm1) is sparsifier and sparsifier.model is gm1


@pytest.mark.parametrize("hook", ["forward", "pre"])
def test_hooks_on_a_masked_layer_are_refused(hook):
    """A forward hook or pre-hook on a Linear that prepare would rewrite raises ValueError naming the layer and the
    remedies (the masked op would not run it, while fuse/squash_mask would run it again); the model keeps its hook,
    and leaving the layer out of the config works."""
    model = SimpleLinear()
    calls = []
    register = model.linear1.register_forward_hook if hook == "forward" else model.linear1.register_forward_pre_hook
    register(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=r"'linear1' \(Linear\) has 1 forward hook.*leave 'linear1.weight' out"):
        prepare(model)
    gm = prepare(model, ["linear2", "seq.*"])
    gm(torch.randn(2, 7))
    assert calls == [1], "the unmasked layer runs its hook in the prepared module"


def test_sparsifier_and_state_dict_pickle():
    """A WeightNormSparsifier (default norm included) and its state dict pickle and load."""
    sparsifier = WeightNormSparsifier(norm=2)
    pickle.loads(pickle.dumps(sparsifier))
    prepare(SimpleLinear(), sparsifier=sparsifier)
    sparsifier.step()
    state = pickle.loads(pickle.dumps(sparsifier.state_dict()))
    fresh = WeightNormSparsifier()
    gm = prepare(SimpleLinear(), sparsifier=fresh)
    fresh.load_state_dict(state)
    assert fresh.records == sparsifier.records
    assert torch.equal(gm.get_buffer("linear1.weight_mask"), sparsifier.model.get_buffer("linear1.weight_mask"))


def test_defaults_cannot_shadow_group_keys():
    """A sparsifier whose defaults name a structural key or 'mask' is refused."""
    for key in ("module", "tensor_fqn", "mask"):
        with pytest.raises(ValueError, match="defaults may not set"):
            ImplementedSparsifier(**{key: None})


def test_weights_left_dense_are_reported():
    """HiddenWeightNet: proj.weight hides in a torch.fx.wrap'ed function. prepare warns (naming it, the reason and
    the export remedy) when the config selects it, lists it in get_unmatched and under the sparsity table; a config
    that selects only fc does not warn. Export capture finds it."""
    with pytest.warns(UserWarning, match=r"proj.weight: .*remedy"):
        gm = prepare(HiddenWeightNet())
    assert [u.tensor_fqn for u in get_unmatched(gm)] == ["proj.weight"]
    assert "Left dense" in sparsity_table(gm) and "proj.weight" in sparsity_table(gm)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gm = prepare(HiddenWeightNet(), ["fc"])
    assert [u.tensor_fqn for u in get_unmatched(gm)] == ["proj.weight"]
    gm = prepare(HiddenWeightNet(), capture_method="export", example_inputs=(torch.randn(2, 8),))
    assert get_unmatched(gm) == () and len(get_sparsifier(gm).records) == 2


def test_pickled_prepared_module_keeps_its_own_sparsifier():
    """A pickled and loaded prepared module comes with a copy of its sparsifier, bound to the copy: stepping it
    changes the loaded module's masks, not the original's, and outputs agree before the step."""
    gm = prepare(SimpleLinear(), sparsifier=WeightNormSparsifier(0.5, (1, 1)))
    loaded = pickle.loads(pickle.dumps(gm))
    x = torch.randn(3, 7)
    torch.testing.assert_close(loaded(x), gm(x))
    sparsifier = get_sparsifier(loaded)
    assert sparsifier is not get_sparsifier(gm) and sparsifier.model is loaded
    assert sparsifier.groups[0].module is loaded.get_submodule("seq.0")
    sparsifier.step()
    assert loaded.get_buffer("linear1.weight_mask").float().mean().item() == 0.5
    assert gm.get_buffer("linear1.weight_mask").all()


class Conv1DLike(nn.Module):
    """transformers' Conv1D: the weight is stored [in, out] and applied as addmm(bias, x, W)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out))
        self.bias = nn.Parameter(torch.randn(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x, self.weight)  # 2-D inputs only, unlike transformers' Conv1D


class GPT2MLPLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_fc = Conv1DLike(16, 32)
        self.c_proj = Conv1DLike(32, 32)  # square, as GPT-2's c_proj: a wrong axis would pass unnoticed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(torch.relu(self.c_fc(x)))


@pytest.mark.parametrize("method", ["nm", "wanda", "sparsegpt", "weight_norm_rows"])
def test_weights_stored_in_out_are_pruned_along_their_input(method):
    """GPT2MLPLike (weights stored [in, out], square c_proj included): N:M groups, Wanda's per-row competition and
    (1, 4) blocks run along each output's inputs, i.e. along dim 0 of the stored weight; outputs equal the
    masked eager model, and lower('auto') times and fuses them."""
    model = GPT2MLPLike()
    x = torch.randn(4, 16)
    if method == "nm":
        sparsifier = NMSparsifier(2, 4)
    elif method == "wanda":
        sparsifier = WandaSparsifier(0.5)
    elif method == "sparsegpt":
        sparsifier = SparseGPTSparsifier(0.5, nm=(2, 4), block_size=16)
    else:
        sparsifier = WeightNormSparsifier(1.0, (1, 4), zeros_per_block=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NM's note that 2:4 will not run on a fast path here
        gm = prepare(model, sparsifier=sparsifier)
    assert all(r.transposed for r in sparsifier.records)
    if method in ("wanda", "sparsegpt"):
        calibrate(gm, [torch.randn(8, 16) for _ in range(2)], progress_bar=False)
    sparsifier.step()
    for record in sparsifier.records:
        view = gm.get_buffer(f"{record.tensor_fqn}_mask").t()  # [out, in]
        if method == "wanda":
            assert bool((view.sum(1) == view.shape[1] // 2).all())
        else:
            kept_per_group = 2 if method in ("nm", "sparsegpt") else 1
            assert bool((view.reshape(view.shape[0], -1, 4).sum(-1) == kept_per_group).all())
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for record in sparsifier.records:
            # SparseGPT updates the kept weights: the reference takes the prepared module's (new) tensors.
            reference.get_parameter(record.tensor_fqn).copy_(gm.get_parameter(record.tensor_fqn))
            reference.get_parameter(record.tensor_fqn).mul_(gm.get_buffer(f"{record.tensor_fqn}_mask"))
    torch.testing.assert_close(gm(x), reference(x))
    lowered = lower(gm, "auto", example_inputs=(x,), repeats=1, progress_bar=False)
    assert [r.backend for r in get_lowering(lowered)] == ["fuse", "fuse"]
    torch.testing.assert_close(lowered(x), reference(x))


@pytest.mark.parametrize("capture_method", ["auto", "symbolic_trace", "export"])
def test_a_meta_device_model_points_to_prepare_on_meta(capture_method):
    """A model built under torch.device('meta'): prepare refuses it before anything is built, naming a meta tensor
    and pointing to fx_sparsity.calibration.prepare_on_meta (the path for models larger than memory) as well as to
    materialising the weights; the message said only the latter."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"meta device \(0.weight, \.\.\.\).*fx_sparsity.calibration.prepare_on_meta"
                                         r"\(model, config, sparsifier=\.\.\.\).*model.to_empty"):
        prepare(model, example_inputs=(torch.randn(2, 8),), capture_method=capture_method)
