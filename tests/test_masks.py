"""Mask math against torch.ao.pruning (bit for bit) and property-based mask invariants."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.ao.pruning import NearlyDiagonalSparsifier as AONearlyDiagonal
from torch.ao.pruning import WeightNormSparsifier as AOWeightNorm

from fx_sparsity import NearlyDiagonalSparsifier, WeightNormSparsifier
from fx_sparsity.sparsifier.mask_utils import smallest_k_mask
from fx_sparsity.sparsifier.nearly_diagonal import nearly_diagonal_mask
from fx_sparsity.sparsifier.weight_norm import resolve_norm, weight_norm_mask


def ao_weight_norm_masks(weight, steps=1, **kwargs):
    """torch.ao.pruning's masks after each of ``steps`` steps on a Linear holding ``weight``."""
    model = nn.Sequential(nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    model[0].weight = nn.Parameter(weight.clone())
    sparsifier = AOWeightNorm(**kwargs)
    sparsifier.prepare(model, None)
    masks = []
    for _ in range(steps):
        sparsifier.step()
        masks.append(model[0].parametrizations.weight[0].mask.float().clone())
    return masks


def our_weight_norm_masks(weight, steps=1, **kwargs):
    model = nn.Sequential(nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    model[0].weight = nn.Parameter(weight.clone())
    sparsifier = WeightNormSparsifier(**kwargs)
    gm = sparsifier.prepare(model, None)
    masks = []
    for _ in range(steps):
        sparsifier.step()
        masks.append(gm.get_buffer("0.weight_mask").clone())
    return masks


WEIGHTS = {
    "randn": lambda shape: torch.randn(shape),
    "ones": lambda shape: torch.ones(shape),
    "integers": lambda shape: torch.randint(-2, 3, shape).float(),
}


class WeightNormPair:
    """torch.ao.pruning's WeightNormSparsifier and ours, each prepared once on a Linear holding ``weight``; each
    ``masks(...)`` sets the group's arguments, resets both masks to all-ones (what a fresh ``prepare`` holds) and
    steps both. A prepare per case would spend the test's time capturing the same model again."""

    def __init__(self, weight: torch.Tensor, norm) -> None:
        ao_model = nn.Sequential(nn.Linear(weight.shape[1], weight.shape[0], bias=False))
        ao_model[0].weight = nn.Parameter(weight.clone())
        self.ao = AOWeightNorm(norm=norm)
        self.ao.prepare(ao_model, None)
        self.ao_mask = ao_model[0].parametrizations.weight[0].mask
        model = nn.Sequential(nn.Linear(weight.shape[1], weight.shape[0], bias=False))
        model[0].weight = nn.Parameter(weight.clone())
        self.ours = WeightNormSparsifier(norm=norm)
        self.mask = self.ours.prepare(model, None).get_buffer("0.weight_mask")

    def masks(self, **args) -> tuple[torch.Tensor, torch.Tensor]:
        self.ao.groups[0].update(args)
        self.ours.update_group("0.weight", **args)
        with torch.no_grad():
            self.ao_mask.fill_(1)
            self.mask.fill_(True)
        self.ao.step()
        self.ours.step()
        return self.mask.clone(), self.ao_mask.clone()


@pytest.mark.parametrize("shape", [(8, 8), (12, 16), (32, 24)])
@pytest.mark.parametrize("block", [(1, 1), (1, 4), (2, 2), (4, 1), (4, 4)])
@pytest.mark.parametrize("weights", sorted(WEIGHTS))
def test_weight_norm_matches_torch_ao(shape, block, weights):
    """Divisible 2-D weights: masks equal torch.ao.pruning's bit for bit over the level/zeros grid, ties included."""
    torch.manual_seed(hash((shape, block, weights)) % 2**31)
    weight = WEIGHTS[weights](shape)
    for norm in (None, 1):
        pair = WeightNormPair(weight, norm)
        for level, zeros in itertools.product([0, 0.1, 0.3, 0.5, 0.77, 1.0], range(block[0] * block[1] + 1)):
            args = dict(sparsity_level=level, sparse_block_shape=block, zeros_per_block=zeros)
            ours, theirs = pair.masks(**args)
            assert torch.equal(ours, theirs), (args, norm)


@pytest.mark.parametrize("level", [-1, 1.5, 2, 5.0, float("inf"), -float("inf")])
@pytest.mark.parametrize("block, zeros", [((1, 1), 1), ((1, 4), 2), ((2, 2), 3), ((2, 2), 4)])
def test_weight_norm_clamps_levels_outside_0_1_as_torch_ao(level, block, zeros):
    """A level outside [0, 1], in the constructor or a config entry, is kept as given in the group and clamped when
    masks are computed, exactly as torch.ao.pruning's WeightNormSparsifier does (masks equal bit for bit)."""
    torch.manual_seed(0)
    weight = torch.randn(8, 16)
    ours = WeightNormPair(weight, None)
    masks, theirs = ours.masks(sparsity_level=level, sparse_block_shape=block, zeros_per_block=zeros)
    assert torch.equal(masks, theirs)
    sparsifier = WeightNormSparsifier(sparsity_level=level, sparse_block_shape=block, zeros_per_block=zeros)
    gm = sparsifier.prepare(nn.Sequential(nn.Linear(16, 8)), {"0": {"sparsity_level": level}})
    assert sparsifier.groups[0]["sparsity_level"] == level
    sparsifier.step()
    block_size = block[0] * block[1]
    expected = min(max(level, 0), 1) * zeros / block_size
    assert sparsifier.target_sparsity(sparsifier.groups[0]) == expected
    assert float((gm.get_buffer("0.weight_mask") == 0).float().mean()) == expected


def test_weight_norm_refuses_nan_levels():
    """NaN is no level: refused in the constructor and a config entry, naming it (torch.ao.pruning fails at step())."""
    with pytest.raises(ValueError, match="sparsity_level must be a number, got NaN"):
        WeightNormSparsifier(sparsity_level=float("nan"))
    with pytest.raises(ValueError, match=r"sparsity_level of 0.weight must be a number, got NaN"):
        WeightNormSparsifier().prepare(nn.Sequential(nn.Linear(4, 4)), {"0": {"sparsity_level": float("nan")}})


def test_weight_norm_matches_torch_ao_over_steps():
    """Masks stay identical over several steps (both score the masked weight) with a callable norm."""
    torch.manual_seed(1)
    weight = torch.randn(24, 32)
    for level in (0.3, 0.6, 0.9):
        kwargs = dict(sparsity_level=level, sparse_block_shape=(2, 4), zeros_per_block=5, norm=lambda t: t.abs() ** 3)
        for ours, theirs in zip(our_weight_norm_masks(weight, 3, **kwargs), ao_weight_norm_masks(weight, 3, **kwargs)):
            assert torch.equal(ours, theirs)


@pytest.mark.parametrize("level", [0.5, 0.9])
def test_large_weight_threshold_path_matches_torch_ao(level):
    """512x512 1x1 blocks takes the threshold path; ties in w*w are resolved as topk resolves them."""
    torch.manual_seed(0)
    weight = torch.randn(512, 512).half().float()  # coarse values: many exact ties
    kwargs = dict(sparsity_level=level, sparse_block_shape=(1, 1))
    assert torch.equal(our_weight_norm_masks(weight, **kwargs)[0], ao_weight_norm_masks(weight, **kwargs)[0])


@pytest.mark.parametrize("seed", range(5))
def test_smallest_k_mask_equals_topk(seed):
    """smallest_k_mask picks exactly topk's set, with and without ties, on both code paths."""
    torch.manual_seed(seed)
    with_nan = torch.rand(300_000)
    with_nan[::7] = float("nan")  # topk ranks NaN above every number
    for scores in (torch.rand(300_000), torch.randint(0, 1000, (300_000,)).float(), torch.rand(1000), with_nan):
        for k in (0, 1, scores.numel() // 3, scores.numel() // 2, scores.numel() * 9 // 10, scores.numel() - 1):
            expected = torch.zeros(scores.numel(), dtype=torch.bool)
            if k:
                expected[torch.topk(scores, k, largest=False).indices] = True
            assert torch.equal(smallest_k_mask(scores, k), expected), (seed, k)


@pytest.mark.parametrize("shape, block", [((10, 10), (1, 4)), ((7, 13), (2, 4)), ((5, 6), (4, 4)), ((9, 3), (4, 1))])
def test_ragged_blocks_give_weight_shaped_masks(shape, block):
    """Blocks that do not divide the weight: torch.ao.pruning fails or pads, ours has the weight's shape
    and its zeros are exactly torch.ao.pruning's padded mask cropped, where it computes one."""
    torch.manual_seed(3)
    weight = torch.randn(shape)
    for level, zeros in itertools.product([0.3, 0.5, 1.0], range(1, block[0] * block[1] + 1)):
        ours = weight_norm_mask(weight, level, block, zeros)
        assert ours.shape == weight.shape
        try:
            theirs = ao_weight_norm_masks(weight, sparsity_level=level, sparse_block_shape=block, zeros_per_block=zeros)[0]
        except RuntimeError:
            continue  # torch.ao.pruning's mask/shape mismatch: nothing to compare against
        assert torch.equal(ours, theirs[: shape[0], : shape[1]])


def test_conv_weight_is_masked_as_out_by_rest():
    """A conv weight is scored as its [out, in*kh*kw] view."""
    torch.manual_seed(4)
    weight = torch.randn(8, 4, 3, 3)
    ours = weight_norm_mask(weight, 0.5, (1, 4), 2)
    flat = ao_weight_norm_masks(weight.reshape(8, -1), sparsity_level=0.5, sparse_block_shape=(1, 4), zeros_per_block=2)[0]
    assert torch.equal(ours, flat.reshape(weight.shape))


@pytest.mark.parametrize("nearliness", [-1, 0, 1, 3, 5, 7])
@pytest.mark.parametrize("shape", [(8, 8), (6, 10), (10, 6)])
def test_nearly_diagonal_matches_torch_ao(nearliness, shape):
    """NearlyDiagonal masks equal torch.ao.pruning's on square and rectangular weights."""
    model = nn.Sequential(nn.Linear(shape[1], shape[0], bias=False))
    sparsifier = AONearlyDiagonal(nearliness=nearliness)
    sparsifier.prepare(model, None)
    sparsifier.step()
    theirs = model[0].parametrizations.weight[0].mask
    ours = NearlyDiagonalSparsifier(nearliness)
    gm = ours.prepare(nn.Sequential(nn.Linear(shape[1], shape[0], bias=False)), None)
    ours.step()
    assert torch.equal(gm.get_buffer("0.weight_mask"), theirs)


def test_errors():
    """Bad arguments raise ValueError/TypeError naming them."""
    with pytest.raises(ValueError, match="zeros_per_block=5"):
        WeightNormSparsifier(sparse_block_shape=(1, 4), zeros_per_block=5)
    with pytest.raises(ValueError, match="should be positive"):
        WeightNormSparsifier(zeros_per_block=-1)
    with pytest.raises(TypeError, match="sparse_block_shape"):
        WeightNormSparsifier(sparse_block_shape=(1, 2, 3))
    with pytest.raises(ValueError, match="sparse_block_shape"):
        WeightNormSparsifier(sparse_block_shape=(0, 4))
    with pytest.raises(TypeError, match="sparsity_level"):
        WeightNormSparsifier(sparsity_level="half")
    with pytest.raises(ValueError, match="norm"):
        WeightNormSparsifier(norm=3)
    with pytest.raises(ValueError, match="odd"):
        nearly_diagonal_mask(torch.ones(4, 4), 2)
    with pytest.raises(ValueError, match="nearliness=9"):
        nearly_diagonal_mask(torch.ones(4, 4), 9)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 20),
    cols=st.integers(1, 20),
    block=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    level=st.floats(-0.5, 1.5, allow_nan=False),
    zeros_fraction=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_weight_norm_mask_invariants(rows, cols, block, level, zeros_fraction, seed):
    """Any shape: the mask has the weight's shape, is 0/1, keeps every entry at level <= 0, and each block
    has at most zeros_per_block zeros; at level >= 1 every full block has exactly zeros_per_block."""
    torch.manual_seed(seed)
    weight = torch.randn(rows, cols)
    zeros = round(zeros_fraction * block[0] * block[1])
    mask = weight_norm_mask(weight, level, block, zeros)
    assert mask.shape == weight.shape and mask.dtype == weight.dtype
    assert torch.all((mask == 0) | (mask == 1))
    if level <= 0 or zeros == 0:
        assert torch.all(mask == 1)
    full_rows, full_cols = rows // block[0] * block[0], cols // block[1] * block[1]
    blocks = (1 - mask[:full_rows, :full_cols]).reshape(full_rows // block[0], block[0], full_cols // block[1], block[1])
    zeros_per_block = blocks.sum(dim=(1, 3))
    assert torch.all(zeros_per_block <= zeros)
    if level >= 1:
        assert torch.all(zeros_per_block == zeros)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3000), k_fraction=st.floats(0, 1), distinct=st.integers(1, 50), seed=st.integers(0, 2**16))
def test_smallest_k_mask_property(n, k_fraction, distinct, seed):
    """Exactly k picked, and every picked score <= every unpicked score."""
    torch.manual_seed(seed)
    scores = torch.randint(0, distinct, (n,)).float()
    k = min(n, round(k_fraction * n))
    picked = smallest_k_mask(scores, k)
    assert int(picked.sum()) == k
    if 0 < k < n:
        assert scores[picked].max() <= scores[~picked].min()


def test_resolve_norm():
    """norm None/2 squares, 1 takes abs, a callable is used as given."""
    t = torch.tensor([-2.0, 3.0])
    assert torch.equal(resolve_norm(None)(t), t * t)
    assert torch.equal(resolve_norm(2)(t), t * t)
    assert torch.equal(resolve_norm(1)(t), t.abs())
    assert torch.equal(resolve_norm(torch.exp)(t), torch.exp(t))
