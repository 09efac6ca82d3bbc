"""Magnitude, global magnitude, N:M and Wanda sparsifiers, and calibrate, against independent references."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.pruning import WeightNormSparsifier as AOWeightNorm
from torch.nn.utils import prune

import fx_sparsity
from fx_sparsity import (
    GlobalMagnitudeSparsifier,
    MagnitudeSparsifier,
    NMSparsifier,
    WandaSparsifier,
    get_sparsifier,
    prepare,
)
from fx_sparsity.calibration import calibrate
from helpers import MixedNet, PointwiseConvNet, ThreeLinear, count_nodes


def masks_of(gm, sparsifier) -> dict[str, torch.Tensor]:
    return {g["tensor_fqn"]: gm.get_buffer(f"{g['tensor_fqn']}_mask").clone() for g in sparsifier.groups}


@pytest.mark.parametrize("level", [0.0, 0.3, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("integers", [False, True])
def test_magnitude_equals_prune_l1_unstructured(level, integers):
    """Per-layer magnitude masks equal torch.nn.utils.prune.l1_unstructured's, with ties (integer weights)."""
    model = ThreeLinear()
    if integers:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randint(-3, 4, p.shape))
    sparsifier = MagnitudeSparsifier(level)
    gm = prepare(model, sparsifier=sparsifier)
    sparsifier.step()
    reference = copy.deepcopy(model)
    for name in ("a", "b", "c"):
        prune.l1_unstructured(getattr(reference, name), "weight", amount=level)
        assert torch.equal(gm.get_buffer(f"{name}.weight_mask"), getattr(reference, name).weight_mask), name


@pytest.mark.parametrize("level", [0.2, 0.5, 0.8])
def test_global_magnitude_equals_prune_global_unstructured(level):
    """One threshold over all layers: the masks of prune.global_unstructured (L1), per-layer levels reported."""
    model = ThreeLinear()
    sparsifier = GlobalMagnitudeSparsifier(level)
    gm = prepare(model, sparsifier=sparsifier)
    sparsifier.step()
    reference = copy.deepcopy(model)
    params = [(getattr(reference, name), "weight") for name in ("a", "b", "c")]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=level)
    total = zeros = 0
    for name in ("a", "b", "c"):
        mask = gm.get_buffer(f"{name}.weight_mask")
        assert torch.equal(mask, getattr(reference, name).weight_mask), name
        total, zeros = total + mask.numel(), zeros + int((mask == 0).sum())
    levels = sparsifier.layer_sparsity()
    assert len(set(levels.values())) > 1  # one threshold, different levels per layer
    assert zeros == round(level * total)


def test_global_magnitude_rejects_per_layer_levels():
    """A config entry setting its own level: ValueError at prepare, saying to remove it."""
    with pytest.raises(ValueError, match="one sparsity_level for all weights.*remove sparsity_level"):
        prepare(ThreeLinear(), {"a": {"sparsity_level": 0.9}, "b": {}}, sparsifier=GlobalMagnitudeSparsifier(0.5))


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4), (0, 4), (3, 4)])
def test_nm_equals_torch_ao_block_sparsity(n, m, monkeypatch):
    """On full groups, N:M masks equal torch.ao.pruning's WeightNorm with (1, m) blocks and m - n zeros (L1);
    without the C++ kernels (FX_SPARSITY_NO_NATIVE=1) 2:4 warns that it will not run fast here."""
    monkeypatch.setenv("FX_SPARSITY_NO_NATIVE", "1")
    model = ThreeLinear()
    sparsifier = NMSparsifier(n, m)
    with pytest.warns(UserWarning, match="2:4 masks run fast only") if (n, m) == (2, 4) else _no_warning():
        gm = prepare(model, sparsifier=sparsifier)
    sparsifier.step()
    ao_model = copy.deepcopy(model)
    ao = AOWeightNorm(sparsity_level=1.0, sparse_block_shape=(1, m), zeros_per_block=m - n, norm=1)
    ao.prepare(ao_model, [{"tensor_fqn": f"{k}.weight"} for k in ("a", "b", "c")])
    ao.step()
    for name in ("a", "b", "c"):
        mask = gm.get_buffer(f"{name}.weight_mask")
        assert torch.equal(mask, getattr(ao_model, name).parametrizations.weight[0].mask.to(mask.dtype)), name
        assert (mask.view(mask.shape[0], -1, m).sum(-1) == n).all()


class _no_warning:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def test_nm_ragged_rows_and_convs():
    """A row not divisible by m: every group (the short tail too) keeps at most n, the tail its n largest;
    conv weights group along in_channels x kernel."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 6), nn.Conv2d(6, 8, 3))
    sparsifier = NMSparsifier(2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # whether 2:4 runs fast here is not this test's subject
        gm = prepare(model, sparsifier=sparsifier)
    sparsifier.step()
    mask = gm.get_buffer("0.weight_mask")
    assert mask.shape == (6, 10)
    assert (mask[:, :8].view(6, 2, 4).sum(-1) == 2).all() and (mask[:, 8:].sum(-1) == 2).all()
    conv_mask = gm.get_buffer("1.weight_mask").view(8, -1)  # 54 = 13 groups of 4 + a tail of 2
    assert (conv_mask[:, :52].view(8, 13, 4).sum(-1) == 2).all() and (conv_mask[:, 52:] == 1).all()
    scores = model[0].weight.detach().abs()
    kept = scores * mask
    assert torch.equal(kept[:, :4].topk(2, dim=1).values.sort(1).values, scores[:, :4].topk(2, dim=1).values.sort(1).values)


@pytest.mark.parametrize("args, error, match", [
    ({"n": 4, "m": 4}, ValueError, r"0 <= n < m, got n=4, m=4"),
    ({"n": 2.0, "m": 4}, TypeError, r"n must be an int, got 2.0"),
])
def test_nm_bad_arguments(args, error, match):
    """Bad n, m: an error naming them, at construction."""
    with pytest.raises(error, match=match):
        NMSparsifier(**args)


def wanda_reference(model: nn.Module, batches, level: float) -> dict[str, torch.Tensor]:
    """Eager Wanda: input norms via forward pre-hooks, per-row pruning of |W| * ||X_j|| by sorting."""
    sums: dict[str, torch.Tensor] = {}

    def hook(name, module):
        def fn(_, inputs):
            x = inputs[0].double()
            if isinstance(module, nn.Linear):
                s = x.pow(2).reshape(-1, x.shape[-1]).sum(0)
            else:
                s = x.pow(2).transpose(0, 1).reshape(x.shape[1], -1).sum(1)
            sums[name] = sums.get(name, 0) + s
        return fn

    handles = [m.register_forward_pre_hook(hook(n, m)) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in handles:
        h.remove()
    masks = {}
    for name, module in model.named_modules():
        if name not in sums:
            continue
        w = module.weight.detach()
        norm = sums[name].sqrt().float()
        groups = norm.numel() // w.shape[1]
        per_in = norm.view(groups, -1).repeat_interleave(w.shape[0] // groups, 0)
        score = (w.abs() * per_in.view(*per_in.shape, *([1] * (w.dim() - 2)))).reshape(w.shape[0], -1)
        k = round(level * score.shape[1])
        order = score.argsort(dim=1, stable=True)
        mask = torch.ones_like(score)
        mask.scatter_(1, order[:, :k], 0.0)
        masks[f"{name}.weight"] = mask.view_as(w)
    return masks


def test_wanda_matches_eager_reference_linear_and_conv():
    """Wanda masks on PointwiseConvNet (1x1 convs, 3x3 conv, Linear) equal an eager hook-based reference."""
    torch.manual_seed(0)
    model = PointwiseConvNet()
    model.pw1d = nn.Identity()  # Conv1d on a reshaped input: the reference hooks handle Linear/Conv2d only
    batches = [torch.randn(2, 16, 8, 8) for _ in range(3)]
    sparsifier = WandaSparsifier(0.5)
    gm = prepare(model, sparsifier=sparsifier)
    calibrate(gm, batches, progress_bar=False)
    sparsifier.step()
    reference = wanda_reference(model, batches, 0.5)
    assert set(reference) == {g["tensor_fqn"] for g in sparsifier.groups} - {"pw3d.weight"}
    for fqn, mask in reference.items():
        assert torch.equal(gm.get_buffer(f"{fqn}_mask"), mask), fqn


def test_wanda_differs_from_magnitude_when_activations_are_skewed():
    """Scaling one input channel up makes Wanda keep its weights, where plain magnitude would not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4))
    batches = [torch.randn(16, 8) * torch.tensor([100.0] + [1.0] * 7) for _ in range(2)]
    with torch.no_grad():
        model[0].weight[:, 0] = 0.01  # tiny weights on the loud channel
    sparsifier = WandaSparsifier(0.5)
    gm = prepare(model, sparsifier=sparsifier)
    calibrate(gm, batches, progress_bar=False)
    sparsifier.step()
    assert (gm.get_buffer("0.weight_mask")[:, 0] == 1).all()


def test_wanda_nm_and_grouped_conv():
    """Wanda 2:4 keeps 2 of every 4; a depthwise/grouped conv uses the norm of the channel each weight reads."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 16, 1, groups=2), nn.Flatten(), nn.Linear(16 * 36, 8))
    batches = [torch.randn(2, 8, 8, 8) for _ in range(2)]
    sparsifier = WandaSparsifier(nm=(2, 4))
    gm = prepare(model, {"1": {}, "3": {}}, sparsifier=sparsifier)
    norms = calibrate(gm, batches, progress_bar=False)
    assert norms["1.weight"].shape == (8,) and norms["3.weight"].shape == (16 * 36,)
    sparsifier.step()
    assert (gm.get_buffer("3.weight_mask").view(8, -1, 4).sum(-1) == 2).all()
    conv = gm.get_buffer("1.weight_mask").view(16, 4)  # 2 groups: outputs 0-7 read channels 0-3
    assert (conv.sum(-1) == 2).all()
    with torch.no_grad():
        x = model[0](torch.cat(batches))
    norm = x.double().pow(2).sum((0, 2, 3)).sqrt().float()
    torch.testing.assert_close(norms["1.weight"], norm)
    score = model[1].weight.detach().view(16, 4).abs() * norm.view(2, 4).repeat_interleave(8, 0)
    assert torch.equal(conv.bool(), score >= score.topk(2, dim=1).values[:, 1:])


def test_calibrate_leaves_graph_and_outputs_alone():
    """calibrate inserts observers, runs the batches and removes them: same code, same modules, same output."""
    torch.manual_seed(0)
    sparsifier = WandaSparsifier(0.5)
    gm = prepare(MixedNet(), sparsifier=sparsifier)
    code, modules = gm.code, dict(gm.named_modules()).keys()
    x = torch.randn(2, 3, 8, 8)
    before = gm(x)
    norms = calibrate(gm, [(x,), (x,)], progress_bar=False)
    assert gm.code == code and dict(gm.named_modules()).keys() == modules
    assert torch.equal(gm(x), before)
    assert set(norms) == {g["tensor_fqn"] for g in sparsifier.groups}
    assert norms["shared.weight"].shape == (12,)  # two uses of the shared Linear, one observer
    sparsifier.step()
    assert count_nodes(gm) == count_nodes(prepare(MixedNet(), sparsifier=WandaSparsifier()))


def test_calibrate_and_step_errors():
    """step() before calibrate and calibrate on no batches: errors saying what to do."""
    sparsifier = WandaSparsifier(0.5)
    gm = prepare(ThreeLinear(), sparsifier=sparsifier)
    with pytest.raises(RuntimeError, match=r"run fx_sparsity.calibrate\(gm, batches\) before step"):
        sparsifier.step()
    with pytest.raises(ValueError, match="at least one batch"):
        calibrate(gm, [], progress_bar=False)
    with pytest.raises(ValueError, match="sparsity_level must be in"):
        WandaSparsifier(1.5)


def test_new_sparsifiers_lower_and_export():
    """Masks of every new sparsifier lower (fuse and csr) and export with outputs of the prepared module."""
    torch.manual_seed(0)
    x = torch.randn(4, 24)
    for sparsifier in (MagnitudeSparsifier(0.7), GlobalMagnitudeSparsifier(0.7), NMSparsifier(1, 4), WandaSparsifier(0.6)):
        gm = prepare(ThreeLinear(), sparsifier=sparsifier)
        if isinstance(sparsifier, WandaSparsifier):
            calibrate(gm, [x], progress_bar=False)
        sparsifier.step()
        for backend in ("fuse", "csr"):
            lowered = fx_sparsity.lower(gm, backend)
            torch.testing.assert_close(torch.export.export(lowered, (x,)).module()(x), gm(x))


def test_public_names():
    """The new sparsifiers, calibrate and the schedulers are exported; BaseScheduler from fx_sparsity.levels (the 0.1.0
    top-level name still resolves, with a DeprecationWarning)."""
    for name in ("MagnitudeSparsifier", "GlobalMagnitudeSparsifier", "NMSparsifier", "WandaSparsifier",
                 "calibrate", "LambdaSL", "CubicSL"):
        assert name in fx_sparsity.__all__
    assert {"BaseScheduler", "LambdaSL", "CubicSL"} <= set(fx_sparsity.levels.__all__)
    with pytest.warns(DeprecationWarning, match="use fx_sparsity.levels.BaseScheduler"):
        assert fx_sparsity.BaseScheduler is fx_sparsity.levels.BaseScheduler
    assert get_sparsifier is fx_sparsity.get_sparsifier
    assert F.linear is torch.nn.functional.linear


def test_calibrate_failure_leaves_graph_as_it_was():
    """A batch that fails mid-calibration raises, and the observers are gone again."""
    sparsifier = WandaSparsifier(0.5)
    gm = prepare(ThreeLinear(), sparsifier=sparsifier)
    code, modules = gm.code, set(dict(gm.named_modules()))
    with pytest.raises(RuntimeError):
        calibrate(gm, [torch.randn(2, 24), torch.randn(2, 5)], progress_bar=False)
    assert gm.code == code and set(dict(gm.named_modules())) == modules
    assert all("input_norm" not in sparsifier.state[g["tensor_fqn"]] for g in sparsifier.groups)


def test_nm_warning_points_at_the_callers_line(monkeypatch):
    """The 2:4 warning (here: no C++ kernels) names the user's line, whether prepare is called on the sparsifier
    or through fx_sparsity."""
    monkeypatch.setenv("FX_SPARSITY_NO_NATIVE", "1")
    for call in (lambda s: s.prepare(ThreeLinear(), None), lambda s: prepare(ThreeLinear(), sparsifier=s)):
        with pytest.warns(UserWarning, match="2:4 masks run fast only") as record:
            call(NMSparsifier(2, 4))
        assert record[0].filename == __file__
