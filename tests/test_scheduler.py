"""LambdaSL and CubicSL against torch.ao.pruning's schedulers, errors, and gradual pruning during fine-tuning."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.ao.pruning import CubicSL as AOCubicSL
from torch.ao.pruning import LambdaSL as AOLambdaSL
from torch.ao.pruning import WeightNormSparsifier as AOWeightNorm

from fx_sparsity import CubicSL, LambdaSL, NearlyDiagonalSparsifier, WeightNormSparsifier, prepare
from helpers import SimpleLinear

CONFIG = [{"tensor_fqn": "seq.0.weight"}, {"tensor_fqn": "linear1.weight", "sparsity_level": 0.7}]


def pair(make_scheduler, make_ao_scheduler, epochs: int = 25):
    """Run ours and torch.ao.pruning's side by side; return both level histories and check masks every epoch."""
    model = SimpleLinear()
    ao_model = copy.deepcopy(model)
    ours = WeightNormSparsifier(sparsity_level=0.9, sparse_block_shape=(1, 1))
    gm = prepare(model, CONFIG, sparsifier=ours)
    theirs = AOWeightNorm(sparsity_level=0.9, sparse_block_shape=(1, 1))
    theirs.prepare(ao_model, copy.deepcopy(CONFIG))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.pruning warns about get_sl
        scheduler, ao_scheduler = make_scheduler(ours), make_ao_scheduler(theirs)
    levels, ao_levels = [scheduler.get_last_sl()], [ao_scheduler.get_last_sl()]
    for _ in range(epochs):
        ours.step()
        theirs.step()
        for group in ours.groups:
            ao_mask = ao_model.get_submodule(group["module_fqn"]).parametrizations.weight[0].mask
            assert torch.equal(gm.get_buffer(f"{group['tensor_fqn']}_mask").bool(), ao_mask), group["tensor_fqn"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scheduler.step()
            ao_scheduler.step()
        levels.append(scheduler.get_last_sl())
        ao_levels.append(ao_scheduler.get_last_sl())
    return levels, ao_levels


def test_lambda_sl_matches_torch_ao():
    """LambdaSL: base level times lambda(epoch), per group; levels and masks equal torch.ao.pruning's."""
    ramp = lambda epoch: min(1.0, epoch / 10)  # noqa: E731
    levels, ao_levels = pair(lambda s: LambdaSL(s, ramp), lambda s: AOLambdaSL(s, ramp))
    assert levels == ao_levels
    assert levels[0] == [0.0, 0.0] and levels[-1] == [0.9, 0.7]


@pytest.mark.parametrize("kwargs", [
    {"init_sl": 0.0, "init_t": 0, "delta_t": 2, "total_t": 5},
    {"init_sl": 0.1, "init_t": 3, "delta_t": 1, "total_t": 10, "initially_zero": True},
    {"init_sl": [0.0, 0.2], "init_t": [0, 2], "delta_t": 3, "total_t": [4, 6]},
])
def test_cubic_sl_matches_torch_ao(kwargs):
    """CubicSL: the cubic ramp, clamped, with scalar or per-group arguments; equal to torch.ao.pruning's."""
    levels, ao_levels = pair(lambda s: CubicSL(s, **kwargs), lambda s: AOCubicSL(s, **kwargs))
    assert levels == ao_levels
    assert levels[-1] == [0.9, 0.7]


def test_scheduler_state_dict_round_trip():
    """state_dict / load_state_dict restore the epoch, so the next level is the same."""
    sparsifier = WeightNormSparsifier(0.8, (1, 1))
    prepare(SimpleLinear(), sparsifier=sparsifier)
    scheduler = CubicSL(sparsifier, delta_t=1, total_t=10)
    for _ in range(3):
        sparsifier.step()
        scheduler.step()
    state = scheduler.state_dict()
    assert "sparsifier" not in state and state["last_epoch"] == 3
    other_sparsifier = WeightNormSparsifier(0.8, (1, 1))
    prepare(SimpleLinear(), sparsifier=other_sparsifier)
    other = CubicSL(other_sparsifier, delta_t=1, total_t=10)
    other.load_state_dict(state)
    scheduler.step()
    other.step()
    assert other.get_last_sl() == scheduler.get_last_sl()


def test_scheduler_errors_and_order_warning():
    """Bad arguments raise naming them; scheduler.step() before sparsifier.step() warns."""
    sparsifier = WeightNormSparsifier(0.5)
    with pytest.raises(ValueError, match="prepare a model with it before"):
        LambdaSL(sparsifier, lambda e: 1.0)
    prepare(SimpleLinear(), sparsifier=sparsifier)
    with pytest.raises(ValueError, match="delta_t must be positive, got 0"):
        CubicSL(sparsifier, delta_t=0)
    with pytest.raises(ValueError, match="init_sl has 2 entries but the sparsifier has 5 groups"):
        CubicSL(sparsifier, init_sl=[0.1, 0.2])
    with pytest.raises(ValueError, match="expected 5 sl_lambda callables, got 2"):
        LambdaSL(sparsifier, [lambda e: 1.0, lambda e: 1.0])
    with pytest.raises(TypeError, match="sl_lambda must be a callable"):
        LambdaSL(sparsifier, 0.5)
    other = NearlyDiagonalSparsifier()
    prepare(SimpleLinear(), sparsifier=other)
    with pytest.raises(ValueError, match="no sparsity_level to schedule"):
        LambdaSL(other, lambda e: 1.0)
    scheduler = LambdaSL(sparsifier, lambda e: 1.0)
    with pytest.warns(UserWarning, match=r"before sparsifier.step\(\)"):
        scheduler.step()


def test_gradual_pruning_fine_tune_loss_falls():
    """The README's example: fine-tune with CubicSL raising sparsity to 80%; the loss still falls and the
    final masks hold the target."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(512, 16)
    with torch.no_grad():
        y = teacher(x)
    sparsifier = WeightNormSparsifier(sparsity_level=0.8, sparse_block_shape=(1, 1))
    gm = prepare(model, sparsifier=sparsifier)
    scheduler = CubicSL(sparsifier, init_sl=0.0, delta_t=1, total_t=15)  # full level at the 15th of 20 prunings
    optimizer = torch.optim.Adam(gm.parameters(), lr=1e-2)
    losses = []
    for step in range(200):
        loss = nn.functional.mse_loss(gm(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 10 == 9:
            sparsifier.step()
            scheduler.step()
    assert losses[-1] < 0.5 * losses[0]
    assert all(abs(1 - gm.get_buffer(f"{g['tensor_fqn']}_mask").float().mean().item() - 0.8) < 0.01 for g in sparsifier.groups)
