"""SparseGPT: the pure math against a direct per-column OBS reference, then the sparsifier."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fx_sparsity.masks import magnitude_keep, nm_keep
from fx_sparsity.sparsegpt import accumulate_hessian, input_rows, sparsegpt_prune


def sparsegpt_reference(w, h, level, nm, block_size, dampening):
    """The published algorithm, one column at a time, with explicit inverses (float64, slow, obvious).

    Column j is fixed after columns < j; its OBS saliency and update use the inverse of the damped
    Hessian restricted to the columns not yet fixed, ``inv(H[j:, j:])``. Unstructured masks are chosen
    when a block starts (the round(level * numel) smallest saliencies ``w^2 / inv(H[b:, b:])[0, 0]`` of
    the block's columns b); N:M masks when a group of m columns starts.
    """
    w, h = w.double().clone(), h.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h += dampening * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    w[:, dead] = 0
    rows, cols = w.shape
    pruned = torch.zeros(rows, cols, dtype=torch.bool)

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
        hinv = torch.linalg.inv(h[j:, j:])
        err = torch.where(pruned[:, j], w[:, j], 0.0) / hinv[0, 0]
        w[:, j:] -= err[:, None] * hinv[0][None, :]
        w[pruned[:, j], j] = 0
    return w, ~pruned


def correlated_inputs(n, d, seed=0):
    """Inputs with correlated channels of very different scales (what makes OBS updates matter)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    scale = torch.logspace(-1, 1, d)[torch.randperm(d, generator=g)]
    return (torch.randn(n, d, generator=g) @ mix) * scale


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
