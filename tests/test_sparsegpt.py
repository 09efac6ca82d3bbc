"""SparseGPT: the pure math against a direct per-column OBS reference, then the sparsifier."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fx_sparsity
from fx_sparsity import prepare
from fx_sparsity.calibration import calibrate
from fx_sparsity.quantization import QuantSpec, dequantize, get_quantization
from fx_sparsity.sparsifier import SparseGPTSparsifier
from fx_sparsity.sparsifier.magnitude import magnitude_keep
from fx_sparsity.sparsifier.nm import nm_keep
from fx_sparsity.sparsifier.sparsegpt import sparsegpt_prune
from fx_sparsity.sparsifier.sparsegpt.obs import sparsegpt_quantize
from helpers import (
    ConvNet1d3d,
    MixedNet,
    ThreeLinear,
    TiedEmbeddingNet,
    correlated_inputs,
    grid_reference,
    snapshot,
    to_grid_reference,
)
from passes.calibration import accumulate_hessian, input_rows


def sparsegpt_reference(w, h, level, nm, block_size, dampening, spec=None):
    """The published algorithm, one column at a time, with explicit inverses (float64, slow, obvious).

    Column j is fixed after columns < j; its OBS saliency and update use the inverse of the damped
    Hessian restricted to the columns not yet fixed, ``inv(H[j:, j:])``. Unstructured masks are chosen
    when a block starts (the round(level * numel) smallest saliencies ``w^2 / inv(H[b:, b:])[0, 0]`` of
    the block's columns b); N:M masks when a group of m columns starts. With a quantization ``spec``
    (the joint mode), column j's target is its kept entries on the grid (pruned ones 0) instead of its
    kept entries as they are: a row's scale (int8) from the weight before the first column, a group's
    (int4) when its first column is reached, from the current weights with the entries already chosen
    for pruning as zero.
    """
    w, h = w.double().clone(), h.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h += dampening * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    w[:, dead] = 0
    rows, cols = w.shape
    pruned = torch.zeros(rows, cols, dtype=torch.bool)
    if spec is not None:
        size = spec.group_columns(cols)
        scale, zero = grid_reference(w, spec)

    def saliency(b):
        return w[:, b] ** 2 / torch.linalg.inv(h[b:, b:])[0, 0]

    for j in range(cols):
        if nm is None and j % block_size == 0:
            block = range(j, min(j + block_size, cols))
            scores = torch.stack([saliency(b) for b in block], 1)
            k = round(level * scores.numel())
            order = scores.reshape(-1).argsort(stable=True)[:k]
            flat = torch.zeros(scores.numel(), dtype=torch.bool)
            flat[order] = True
            pruned[:, block.start : block.stop] = flat.view(scores.shape)
        if nm is not None and j % nm[1] == 0:
            group = range(j, min(j + nm[1], cols))
            scores = torch.stack([saliency(b) for b in group], 1)
            drop = len(group) - nm[0]
            for r in range(rows):
                for c in scores[r].argsort(stable=True)[:drop]:
                    pruned[r, j + c] = True
        target = w[:, j]
        if spec is not None:
            if spec.group_size is not None and j % size == 0:
                scale, zero = grid_reference(torch.where(pruned[:, j : j + size], 0.0, w[:, j : j + size]), spec)
            target = to_grid_reference(w[:, j], scale, zero, spec)
        target = torch.where(pruned[:, j], 0.0, target)
        hinv = torch.linalg.inv(h[j:, j:])
        err = (w[:, j] - target) / hinv[0, 0]
        w[:, j:] -= err[:, None] * hinv[0][None, :]
        w[:, j] = target
    return w, ~pruned


@pytest.mark.parametrize("nm", [None, (2, 4), (1, 4), (4, 8)])
@pytest.mark.parametrize("block_size", [8, 16, 128])
def test_math_equals_direct_reference(nm, block_size):
    """sparsegpt_prune on a 12x40 layer: same mask and weights as the per-column OBS reference."""
    torch.manual_seed(0)
    x = correlated_inputs(200, 40)
    w = torch.randn(12, 40)
    h = accumulate_hessian(None, input_rows(x, w.shape))[0]
    new, keep = sparsegpt_prune(w, h, 0.5, nm=nm, block_size=block_size, dampening=0.01)
    ref_w, ref_keep = sparsegpt_reference(w, h, 0.5, nm, block_size, 0.01)
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(new, ref_w.float(), rtol=1e-4, atol=1e-4)
    assert (new[~keep] == 0).all()
    if nm is not None:
        assert (keep.view(12, -1, nm[1]).sum(-1) == nm[0]).all()


def test_math_dead_inputs_and_level_edges():
    """Inputs that never fire: their weights become 0 and no NaN appears; levels 0 and 1 work."""
    torch.manual_seed(0)
    x = correlated_inputs(100, 16)
    x[:, [3, 7]] = 0
    w = torch.randn(6, 16)
    h = accumulate_hessian(None, input_rows(x, w.shape))[0]
    new, keep = sparsegpt_prune(w, h, 0.5, block_size=4)
    ref_w, ref_keep = sparsegpt_reference(w, h, 0.5, None, 4, 0.01)
    assert torch.isfinite(new).all() and (new[:, [3, 7]] == 0).all()
    torch.testing.assert_close(new, ref_w.float(), rtol=1e-4, atol=1e-4)
    assert torch.equal(keep, ref_keep)
    dense, keep_all = sparsegpt_prune(w, h, 0.0)
    assert keep_all.all() and torch.equal(dense[:, [0, 1, 2]], w[:, [0, 1, 2]])
    empty, keep_none = sparsegpt_prune(w, h, 1.0)
    assert not keep_none.any() and (empty == 0).all()
    zeros, _ = sparsegpt_prune(w, torch.zeros(16, 16), 0.5)  # a layer whose input never fired at all
    assert torch.isfinite(zeros).all() and (zeros == 0).all()


def test_math_bad_inputs():
    """Wrong Hessian shape, non-finite Hessian, bad block size and dampening: ValueErrors naming them."""
    w, h = torch.randn(4, 8), torch.eye(8)
    with pytest.raises(ValueError, match="does not fit weight"):
        sparsegpt_prune(w, torch.eye(6))
    bad = h.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        sparsegpt_prune(w, bad)
    with pytest.raises(ValueError, match="multiple of m=4"):
        sparsegpt_prune(w, h, nm=(2, 4), block_size=6)
    with pytest.raises(ValueError, match="dampening"):
        sparsegpt_prune(w, h, dampening=-1.0)
    with pytest.raises(ValueError, match="not positive definite"):
        sparsegpt_prune(w, -torch.eye(8), dampening=0.0)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_conv_rows_equal_unfold(groups):
    """input_rows of a Conv2d (stride, padding, dilation, groups) reproduce the conv with the weight's view."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 9)
    w = torch.randn(8, 4 // groups, 3, 3)
    y = F.conv2d(x.double(), w.double(), None, 2, 1, 2, groups)
    rows = input_rows(x, w.shape, stride=2, padding=1, dilation=2, groups=groups)
    per = 8 // groups
    out = torch.cat([rows[g] @ w[g * per : (g + 1) * per].reshape(per, -1).double().T for g in range(groups)], 1)
    torch.testing.assert_close(out, y.permute(0, 2, 3, 1).reshape(-1, 8))
    unfold = F.unfold(x, 3, dilation=2, padding=1, stride=2).transpose(1, 2).reshape(-1, 36).double()
    if groups == 1:
        torch.testing.assert_close(rows[0], unfold)


def test_conv1d_and_padding_mode_rows():
    """Conv1d rows and an explicit circular pad give the conv's outputs."""
    torch.manual_seed(0)
    x, w = torch.randn(3, 5, 11), torch.randn(6, 5, 3)
    y = F.conv1d(F.pad(x.double(), (1, 1), mode="circular"), w.double())
    rows = input_rows(x, w.shape, pad=((1, 1), "circular"))
    torch.testing.assert_close(rows[0] @ w.reshape(6, -1).double().T, y.permute(0, 2, 1).reshape(-1, 6))


def wanda_keep(w, x, level=None, nm=None):
    score = w.abs() * x.double().norm(dim=0).float()
    if nm is not None:
        return nm_keep(w, *nm, scores=score)
    k = round(level * w.shape[1])
    keep = torch.ones_like(w, dtype=torch.bool)
    keep.scatter_(1, score.topk(k, dim=1, largest=False).indices, False)
    return keep


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_reconstruction_error_below_wanda_and_magnitude(nm):
    """On a 64x128 layer with correlated inputs, ||XW^T - XW'^T|| of SparseGPT < Wanda's < magnitude's."""
    torch.manual_seed(0)
    x = correlated_inputs(1024, 128, seed=1)
    w = torch.randn(64, 128)
    h = accumulate_hessian(None, input_rows(x, w.shape))[0]
    new, keep = sparsegpt_prune(w, h, 0.5, nm=nm)
    magnitude = nm_keep(w, *nm) if nm else magnitude_keep(w, 0.5)
    wanda = wanda_keep(w, x, 0.5, nm)

    def error(candidate):
        return ((x @ w.T - x @ candidate.T).norm() / (x @ w.T).norm()).item()

    e_gpt, e_wanda, e_mag = error(new), error(w * wanda), error(w * magnitude)
    assert keep.float().mean().item() == 0.5
    assert e_gpt < e_wanda < e_mag, (e_gpt, e_wanda, e_mag)


# ---------------------------------------------------------------- the sparsifier


def eager_inputs(model: nn.Module, batches, names) -> dict[str, list[torch.Tensor]]:
    """The input of each named module on each batch, recorded with forward pre-hooks on the dense model."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [
        model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach()))
        for n in names
    ]
    with torch.no_grad():
        for batch in batches:
            model(*batch) if isinstance(batch, tuple) else model(batch)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsifier_equals_math_per_layer(nm):
    """ThreeLinear: calibrate + step give, per layer, sparsegpt_prune of the dense inputs' Hessian; the user's
    model is unchanged and keeps its own tensors."""
    torch.manual_seed(0)
    model = ThreeLinear()
    before = snapshot(model)
    batches = [torch.randn(16, 24) for _ in range(3)]
    sparsifier = SparseGPTSparsifier(0.5, nm=nm, block_size=8)
    gm = prepare(model, sparsifier=sparsifier)
    hessians = calibrate(gm, batches, progress_bar=False)
    sparsifier.step()
    inputs = eager_inputs(model, batches, ["a", "b", "c"])
    for name in ("a", "b", "c"):
        h = None
        for x in inputs[name]:
            h = accumulate_hessian(h, input_rows(x, (1, x.shape[-1])))
        torch.testing.assert_close(hessians[f"{name}.weight"], h)
        w, keep = sparsegpt_prune(getattr(model, name).weight, h, 0.5, nm, 8, 0.01)
        assert torch.equal(gm.get_buffer(f"{name}.weight_mask"), keep.float())
        assert torch.equal(gm.get_parameter(f"{name}.weight"), w)
        assert gm.get_parameter(f"{name}.weight") is not getattr(model, name).weight
        assert torch.equal(gm.get_parameter(f"{name}.bias"), getattr(model, name).bias)
    assert_snapshot_equal(snapshot(model), before)


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_step_releasing_statistics_holds_one_hessian_at_a_time(monkeypatch, quantization):
    """step(release_statistics=True) prunes one weight at a time: each Hessian has left ``state`` when its weight
    is pruned (and is factorised in its own memory), later ones are still there; masks, weights and quantization
    records are bit for bit those of step()."""
    from fx_sparsity.sparsifier.sparsegpt import sparsifier as module

    torch.manual_seed(0)
    model = ThreeLinear()
    batches = [torch.randn(16, 24) for _ in range(3)]
    results = []
    for release in (False, True):
        sparsifier = SparseGPTSparsifier(0.5, block_size=8, quantization=quantization)
        gm = prepare(model, sparsifier=sparsifier)
        calibrate(gm, batches, progress_bar=False)
        held = []
        real = module.sparsegpt_quantize if quantization else module.sparsegpt_prune

        def spy(weight, hessian, *args, real=real, held=held, sparsifier=sparsifier, **kwargs):
            held.append(sorted(f for f, s in sparsifier.state.items() if "input_hessian" in s))
            return real(weight, hessian, *args, **kwargs)

        monkeypatch.setattr(module, "sparsegpt_quantize" if quantization else "sparsegpt_prune", spy)
        sparsifier.step(release_statistics=release)
        monkeypatch.undo()
        everything = ["a.weight", "b.weight", "c.weight"]
        assert held == ([everything] * 3 if not release else [everything[1:], everything[2:], []])
        assert not release or not any("input_hessian" in s for s in sparsifier.state.values())
        records = {fqn: r.quantized.values for fqn, r in get_quantization(gm).items()}
        results.append((gm.state_dict(), records))
    (kept, kept_records), (released, released_records) = results
    assert kept.keys() == released.keys() and kept_records.keys() == released_records.keys()
    assert all(torch.equal(kept[k], released[k]) for k in kept)
    assert all(torch.equal(kept_records[k], released_records[k]) for k in kept_records)
    assert bool(quantization) == bool(kept_records)


def test_inverse_hessian_factor_in_place_equals_copy():
    """overwrite=True factorises the Hessian in its own memory: the same dead columns and factor, bit for bit."""
    from fx_sparsity.quantization.gptq import inverse_hessian_factor

    x = correlated_inputs(64, 12)
    h = x.T.double() @ x.double()
    h[3, :] = h[:, 3] = 0
    dead, upper = inverse_hessian_factor(h, 0.01)
    own = h.clone()
    dead_own, upper_own = inverse_hessian_factor(own, 0.01, overwrite=True)
    assert torch.equal(dead, dead_own) and torch.equal(upper, upper_own) and dead[3]
    assert not torch.equal(own, h)  # its memory was used


def assert_snapshot_equal(after, before):
    assert after["ids"] == before["ids"] and after["modules"] == before["modules"] and after["attrs"] == before["attrs"]
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k


def updated_reference(model: nn.Module, gm, sparsifier) -> nn.Module:
    """An eager copy of ``model`` holding the prepared module's updated weights times their masks."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for group in sparsifier.groups:
            fqn = group["tensor_fqn"]
            reference.get_parameter(fqn).copy_(gm.get_parameter(fqn) * gm.get_buffer(f"{fqn}_mask"))
    return reference


def test_tied_and_shared_weights_squash_lower_state_dict():
    """MixedNet (a Linear used twice and tied to another, a reflect-padded conv): one Hessian over all uses, the
    updated weight under every alias in the prepared module only; masked, squashed and lowered ('fuse') modules and
    the state dict all carry it; the user's model is unchanged."""
    torch.manual_seed(0)
    model = MixedNet()
    before = snapshot(model)
    batches = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    sparsifier = SparseGPTSparsifier(0.5, block_size=4)
    gm = prepare(model, sparsifier=sparsifier)
    calibrate(gm, batches, progress_bar=False)
    sparsifier.step()
    assert gm.shared.weight is gm.tied.weight
    assert not torch.equal(gm.shared.weight, model.shared.weight)
    assert torch.equal(gm.shared.weight == 0, gm.shared.weight_mask == 0)  # zeros exactly where pruned
    reference = updated_reference(model, gm, sparsifier)
    x = torch.randn(2, 3, 8, 8)
    expected = reference(x)
    torch.testing.assert_close(gm(x), expected)
    lowered = fx_sparsity.lower(gm, "fuse")
    torch.testing.assert_close(lowered(x), expected)
    state = gm.state_dict()
    for group in sparsifier.groups:
        fqn = group["tensor_fqn"]
        assert torch.equal(state[fqn], gm.get_parameter(fqn))
    squashed = sparsifier.squash_mask()
    torch.testing.assert_close(squashed(x), expected)
    assert_snapshot_equal(snapshot(model), before)


def test_conv_hessians_grouped_padded_and_3d():
    """ConvNet1d3d (grouped, dilated, strided Conv1d with circular padding; Conv3d with padding='same'): the
    calibrated Hessians equal those of the unfolded inputs, and 2:4 SparseGPT keeps 2 of every 4."""
    torch.manual_seed(0)
    model = ConvNet1d3d()
    batches = [(torch.randn(2, 4, 16), torch.randn(2, 2, 4, 6, 6)) for _ in range(2)]
    sparsifier = SparseGPTSparsifier(nm=(2, 4), block_size=4)
    gm = prepare(model, sparsifier=sparsifier)
    hessians = calibrate(gm, batches, progress_bar=False)
    c1 = torch.cat([b[0] for b in batches])
    rows = input_rows(c1, model.c1.weight.shape, stride=2, dilation=2, groups=2, pad=((2, 2), "circular"))
    torch.testing.assert_close(hessians["c1.weight"], accumulate_hessian(None, rows))
    assert hessians["c1.weight"].shape == (2, 6, 6)
    c3 = torch.cat([b[1] for b in batches])
    rows = input_rows(c3, model.c3.weight.shape, padding="same")
    torch.testing.assert_close(hessians["c3.weight"], accumulate_hessian(None, rows))
    sparsifier.step()
    for fqn in ("c1.weight", "c3.weight"):
        mask = gm.get_buffer(f"{fqn}_mask")
        full = mask.reshape(mask.shape[0], -1)[:, : 4 * (mask[0].numel() // 4)]  # c1 has 6 columns: one group of 4
        assert (full.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all(), fqn
    reference = updated_reference(model, gm, sparsifier)
    for got, want in zip(gm(*batches[0]), reference(*batches[0])):
        torch.testing.assert_close(got, want)


def test_sparsifier_errors_leave_everything_alone():
    """step() before calibrate, bad arguments, and a weight tied to an unmasked embedding: clear errors, and a
    failing step changes no mask and no weight."""
    with pytest.raises(ValueError, match="multiple of m=4"):
        SparseGPTSparsifier(nm=(2, 4), block_size=6)
    with pytest.raises(ValueError, match="dampening must be"):
        SparseGPTSparsifier(dampening=-0.1)
    with pytest.raises(ValueError, match="sparsity_level must be in"):
        SparseGPTSparsifier(1.5)
    with pytest.raises(TypeError, match="nm must be a pair"):
        SparseGPTSparsifier(nm=4)
    with pytest.raises(ValueError, match="multiple of m=4 .* of a.weight"):
        prepare(ThreeLinear(), {"a": {"block_size": 6}}, sparsifier=SparseGPTSparsifier(nm=(2, 4)))
    sparsifier = SparseGPTSparsifier()
    gm = prepare(ThreeLinear(), sparsifier=sparsifier)
    with pytest.raises(RuntimeError, match=r"run fx_sparsity.calibrate\(gm, batches\) before step"):
        sparsifier.step()
    torch.manual_seed(0)
    model = TiedEmbeddingNet()
    sparsifier = SparseGPTSparsifier()
    gm = prepare(model, sparsifier=sparsifier)
    calibrate(gm, [torch.randint(0, 64, (4, 8))], progress_bar=False)
    weights = {g["tensor_fqn"]: gm.get_parameter(g["tensor_fqn"]) for g in sparsifier.groups}
    with pytest.raises(ValueError, match="unmasked ops also read"):
        sparsifier.step()
    for fqn, w in weights.items():
        assert gm.get_parameter(fqn) is w and (gm.get_buffer(f"{fqn}_mask") == 1).all()
    bad = SparseGPTSparsifier()
    gm = prepare(ThreeLinear(), sparsifier=bad)
    calibrate(gm, [torch.randn(4, 24)], progress_bar=False)
    bad.state["b.weight"]["input_hessian"][0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="SparseGPT cannot prune b.weight: hessian has non-finite"):
        bad.step()
    assert all((gm.get_buffer(f"{g['tensor_fqn']}_mask") == 1).all() for g in bad.groups)


@pytest.mark.parametrize("dampening", [float("inf"), float("nan"), -float("inf")])
def test_non_finite_dampening_is_refused(dampening):
    """SparseGPTSparsifier(dampening=inf) was accepted, and step() then failed advising to raise dampening; inf, NaN
    and -inf are refused when set, in the constructor and in a config entry, naming the weight there."""
    with pytest.raises(ValueError, match=r"dampening must be a finite number >= 0 .*got " + repr(dampening)):
        SparseGPTSparsifier(dampening=dampening)
    with pytest.raises(ValueError, match="dampening of a.weight must be a finite number >= 0"):
        prepare(ThreeLinear(), {"a": {"dampening": dampening}}, sparsifier=SparseGPTSparsifier())
    sparsifier = SparseGPTSparsifier()
    prepare(ThreeLinear(), sparsifier=sparsifier)
    with pytest.raises(ValueError, match="dampening of a.weight must be a finite number"):
        sparsifier.update_group("a.weight", dampening=dampening)
    assert sparsifier.groups[0]["dampening"] == 0.01


def test_sparsegpt_prune_refuses_non_finite_dampening_called_directly():
    """The pure function refuses infinite or NaN dampening too (the sparsifier refuses it when set), naming it."""
    w, h = torch.randn(4, 8), torch.eye(8)
    for bad in (float("inf"), float("nan"), -0.1):
        with pytest.raises(ValueError, match="dampening must be a finite number >= 0"):
            sparsegpt_prune(w, h, sparsity_level=0.5, dampening=bad)


# ------------------------------------------------------------------------------- pruned and quantized in one pass
@pytest.mark.parametrize("name", ["int8", "int4-g32", "int4-g32-zp"])
@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_joint_math_equals_direct_reference(name, nm):
    """sparsegpt_quantize on a 12x64 layer with correlated inputs: the mask and weights of the per-column reference
    in its joint mode; the values in the grid's range, pruned entries exactly 0 (their values 0, or the zero point
    of their group), N:M counts kept."""
    spec = QuantSpec.parse(name)
    x = correlated_inputs(300, 64, seed=3)
    w = torch.randn(12, 64)
    h = accumulate_hessian(None, input_rows(x, w.shape))[0]
    q, keep = sparsegpt_quantize(w, h, spec, 0.5, nm=nm, block_size=32)
    ref_w, ref_keep = sparsegpt_reference(w, h, 0.5, nm, 32, 0.01, spec)
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(dequantize(q), ref_w.float(), rtol=1e-4, atol=1e-4)
    assert (dequantize(q)[~keep] == 0).all()
    assert spec.qmin <= q.values.min() and q.values.max() <= spec.qmax
    if spec.zero_point:
        zeros = q.zeros.repeat_interleave(32, 1)
        assert torch.equal(q.values[~keep], zeros[~keep])
    else:
        assert (q.values[~keep] == 0).all()
    if nm is not None:
        assert (keep.view(12, -1, 4).sum(-1) == 2).all()
    else:
        assert keep.float().mean().item() == 0.5


def test_joint_mode_beats_pruning_then_rounding():
    """The joint pass compensates the quantization error too: on correlated inputs its output error
    ||X (W_new - W)^T|| is below SparseGPT's pruning followed by round-to-nearest of the kept weights (same
    level), for int8 and int4."""
    x = correlated_inputs(512, 128, seed=4)
    w = torch.randn(16, 128)
    h = accumulate_hessian(None, input_rows(x, w.shape))[0]

    def error(v):
        return (x @ (v - w).T).square().sum().item()

    from fx_sparsity.quantization import quantize_weight

    for name in ("int8", "int4-g32"):
        q, keep = sparsegpt_quantize(w, h, name, 0.5)
        pruned, pruned_keep = sparsegpt_prune(w, h, 0.5)
        rounded = dequantize(quantize_weight(pruned, name, mask=pruned_keep))
        assert error(dequantize(q)) < error(rounded), name


def test_sparsifier_joint_mode_writes_dequantized_weights_and_records():
    """ThreeLinear with quantization="int8": per layer, calibrate + step give sparsegpt_quantize of the dense
    inputs' Hessian; the prepared weight is exactly dequantize(record) (zero where masked), a new tensor, the mask
    its keep, the record's method "sparsegpt"; the prepared module computes with those weights; the user's model
    is unchanged; a weight set back to quantization=None and stepped again loses its record."""
    model = ThreeLinear()
    before = snapshot(model)
    batches = [torch.randn(16, 24) for _ in range(3)]
    sparsifier = SparseGPTSparsifier(0.5, block_size=8, quantization="int8")
    gm = prepare(model, sparsifier=sparsifier)
    hessians = calibrate(gm, batches, progress_bar=False)
    sparsifier.step()
    records = get_quantization(gm)
    assert sorted(records) == ["a.weight", "b.weight", "c.weight"]
    for fqn, record in records.items():
        q, keep = sparsegpt_quantize(model.get_parameter(fqn), hessians[fqn], "int8", 0.5, None, 8, 0.01)
        assert record.method == "sparsegpt" and record.quantized.spec == QuantSpec(8)
        assert torch.equal(record.quantized.values, q.values) and torch.equal(record.quantized.scales, q.scales)
        weight = gm.get_parameter(fqn)
        assert torch.equal(weight, dequantize(record.quantized)) and weight is not model.get_parameter(fqn)
        assert torch.equal(gm.get_buffer(f"{fqn}_mask").bool(), keep) and (weight[~keep] == 0).all()
    x = torch.randn(5, 24)
    torch.testing.assert_close(gm(x), updated_reference(model, gm, sparsifier)(x))
    assert_snapshot_equal(snapshot(model), before)
    sparsifier.update_group("b.weight", quantization=None)
    calibrate(gm, batches, progress_bar=False)
    sparsifier.step()
    assert sorted(get_quantization(gm)) == ["a.weight", "c.weight"]


def test_sparsifier_joint_mode_per_weight_specs_and_refusals():
    """A config entry sets one weight's grid (int4 groups of 32 on a 64-column layer, the other weight pruned only);
    int4 on columns its groups do not tile, a block size that is not a multiple of the group, and a bad name are
    refused when set, naming the weight; a QuantSpec is kept as its name (state dicts load with weights_only=True);
    a state dict saved before the argument existed loads as pruning only."""
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    sparsifier = SparseGPTSparsifier(0.5)
    gm = prepare(model, {"0": {"quantization": "int4-g32"}, "2": {}}, sparsifier=sparsifier)
    calibrate(gm, [torch.randn(16, 64)], progress_bar=False)
    sparsifier.step()
    record = get_quantization(gm)["0.weight"]
    assert list(get_quantization(gm)) == ["0.weight"] and record.quantized.scales.shape == (32, 2)
    assert torch.equal(gm.get_parameter("0.weight"), dequantize(record.quantized))
    with pytest.raises(ValueError, match=r"int4-g32 cannot quantize a\.weight: its 24 columns"):
        prepare(ThreeLinear(), sparsifier=SparseGPTSparsifier(quantization="int4-g32"))
    with pytest.raises(ValueError, match="block_size=48 must be a multiple of the group size 32 of int4-g32"):
        SparseGPTSparsifier(block_size=48, quantization="int4-g32")
    with pytest.raises(ValueError, match=r"quantization of 0\.weight: quantization spec 'int3'"):
        prepare(model, {"0": {"quantization": "int3"}}, sparsifier=SparseGPTSparsifier())
    with pytest.raises(TypeError, match="quantization must be a QuantSpec or a name"):
        SparseGPTSparsifier(quantization=8)
    spec = SparseGPTSparsifier(quantization=QuantSpec(4, 32, True))
    prepare(model, sparsifier=spec)
    saved = io.BytesIO()
    torch.save(spec.state_dict(), saved)
    saved.seek(0)
    assert [g["quantization"] for g in torch.load(saved, weights_only=True)["groups"]] == ["int4-g32-zp"] * 2
    state = sparsifier.state_dict()
    for group in state["groups"]:
        group.pop("quantization")
    fresh = SparseGPTSparsifier(0.5, quantization="int8")
    prepare(model, sparsifier=fresh)
    fresh.load_state_dict(state)
    assert all(g["quantization"] is None for g in fresh.groups)
