"""OWL layer-wise levels: the pure functions against a direct computation, then on prepared modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fx_sparsity import MagnitudeSparsifier, WandaSparsifier, get_sparsifier, prepare
from fx_sparsity.calibration import calibrate
from fx_sparsity.levels import outlier_ratio, owl_levels, set_owl_levels
from fx_sparsity.sparsifier import SparseGPTSparsifier


def paper_levels(ratios: list[float], sparsity: float, lam: float) -> list[float]:
    """The OWL reference code's arithmetic (prune_wanda_outlier), written out with Python floats."""
    lo, hi = min(ratios), max(ratios)
    scaled = [(r - lo) * (1 / (hi - lo) * lam * 2) for r in ratios]
    mean = sum(scaled) / len(scaled)
    return [1 - (s - mean + (1 - sparsity)) for s in scaled]


def test_outlier_ratio_counts_scores_above_m_times_mean():
    """outlier_ratio equals a direct count on heavy-tailed scores, for several m."""
    torch.manual_seed(0)
    scores = torch.randn(64, 64).exp() ** 2
    for m in (2.0, 5.0, 7.0):
        count = sum(1 for v in scores.reshape(-1).tolist() if v > m * scores.double().mean().item())
        assert outlier_ratio(scores, m) == pytest.approx(count / scores.numel(), abs=0)
    with pytest.raises(ValueError, match="m must be a number > 0"):
        outlier_ratio(scores, 0)


@pytest.mark.parametrize("sparsity,lam", [(0.5, 0.08), (0.7, 0.05), (0.6, 0.2)])
def test_owl_levels_equal_paper_arithmetic(sparsity, lam):
    """Unweighted levels equal the reference code's, average to the level, span 2 * lam, and fall as the
    outlier ratio rises; size-weighted levels average (weighted) to the level."""
    torch.manual_seed(0)
    ratios = {f"l{i}": r for i, r in enumerate(torch.rand(7).mul(0.05).tolist())}
    levels = owl_levels(ratios, sparsity, lam)
    expected = paper_levels(list(ratios.values()), sparsity, lam)
    assert list(levels.values()) == pytest.approx(expected, abs=1e-12)
    assert sum(levels.values()) / len(levels) == pytest.approx(sparsity, abs=1e-12)
    assert max(levels.values()) - min(levels.values()) == pytest.approx(2 * lam, abs=1e-12)
    order = sorted(ratios, key=ratios.get)
    assert [levels[k] for k in order] == sorted(levels.values(), reverse=True)
    sizes = {k: 100 * (i + 1) for i, k in enumerate(ratios)}
    weighted = owl_levels(ratios, sparsity, lam, sizes)
    total = sum(sizes.values())
    assert sum(weighted[k] * sizes[k] for k in ratios) / total == pytest.approx(sparsity, abs=1e-12)
    assert owl_levels(dict.fromkeys("abc", 0.02), sparsity, lam) == dict.fromkeys("abc", sparsity)


class Skewed(nn.Module):
    """Three Linears; the first one's input has a few very loud channels (activation outliers)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def skewed_batches():
    g = torch.Generator().manual_seed(1)
    scale = torch.ones(32)
    scale[:3] = 30.0
    return [torch.randn(16, 32, generator=g) * scale for _ in range(3)]


def direct_levels(model, batches, sparsity, lam=0.08, m=5.0):
    """Wanda scores from eager input norms (forward pre-hooks), outlier ratios, then the paper's arithmetic
    weighted by parameter counts."""
    sums = {}
    handles = [
        getattr(model, n).register_forward_pre_hook(
            lambda mod, a, n=n: sums.__setitem__(n, sums.get(n, 0) + a[0].double().pow(2).sum(0))
        )
        for n in "abc"
    ]
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in handles:
        h.remove()
    ratios, sizes = [], []
    for n in "abc":
        w = getattr(model, n).weight.detach()
        score = w.abs() * sums[n].sqrt().float()
        ratios.append((score.double() > m * score.double().mean()).double().mean().item())
        sizes.append(w.numel())
    lo, hi = min(ratios), max(ratios)
    scaled = [(r - lo) / (hi - lo) * 2 * lam for r in ratios]
    mean = sum(s * n for s, n in zip(scaled, sizes)) / sum(sizes)
    return {f"{n}.weight": 1 - (s - mean + 1 - sparsity) for n, s in zip("abc", scaled)}


@pytest.mark.parametrize("make", [WandaSparsifier, SparseGPTSparsifier, MagnitudeSparsifier])
def test_set_owl_levels_on_prepared_modules(make):
    """Skewed model, Wanda / SparseGPT / magnitude: set_owl_levels gives the direct computation's levels (from the
    norms, or from the Hessian's diagonal), step() prunes each layer to its level, overall sparsity is the target."""
    torch.manual_seed(0)
    model = Skewed()
    batches = skewed_batches()
    sparsifier = make(0.5)
    gm = prepare(model, sparsifier=sparsifier)
    calibrate(gm, batches, progress_bar=False)
    levels = set_owl_levels(gm)
    expected = direct_levels(model, batches, 0.5)
    assert levels == pytest.approx(expected, abs=1e-9)
    assert len({round(v, 6) for v in levels.values()}) > 1
    sparsifier.step()
    zeros = total = 0
    for group in sparsifier.groups:
        mask = gm.get_buffer(f"{group['tensor_fqn']}_mask")
        assert group["sparsity_level"] == levels[group["tensor_fqn"]]
        assert 1 - mask.float().mean().item() == pytest.approx(levels[group["tensor_fqn"]], abs=1 / mask.shape[1])
        zeros, total = zeros + (mask == 0).sum().item(), total + mask.numel()
    assert zeros / total == pytest.approx(0.5, abs=0.01)


def test_set_owl_levels_blocks_and_errors():
    """Weights grouped into one block share one level; N:M groups and uncalibrated modules are refused."""
    gm = prepare(Skewed(), sparsifier=WandaSparsifier(0.5))
    with pytest.raises(RuntimeError, match=r"run fx_sparsity.calibrate\(gm, batches\) before OWL"):
        set_owl_levels(gm)
    calibrate(gm, skewed_batches(), progress_bar=False)
    levels = set_owl_levels(gm, 0.6, blocks=lambda fqn: "first" if fqn.startswith("a") else "rest")
    assert levels["b.weight"] == levels["c.weight"] != levels["a.weight"]
    assert levels["a.weight"] < 0.6 < levels["b.weight"]  # the loud-input layer keeps more
    assert all(g["sparsity_level"] == levels[g["tensor_fqn"]] for g in get_sparsifier(gm).groups)
    nm = prepare(Skewed(), sparsifier=WandaSparsifier(nm=(2, 4)))
    calibrate(nm, skewed_batches(), progress_bar=False)
    with pytest.raises(ValueError, match="uses N:M"):
        set_owl_levels(nm)


@pytest.mark.parametrize("args, error, match", [
    (({"a": 0.01, "b": 0.03}, 0.5, 0.08, {"a": 0, "b": 0}), ValueError, r"sizes\['a'\] must be the layer's number of weights, a number > 0, got 0"),
    (({"a": 0.01, "b": 0.03}, 0.5, 0.08, {"a": 10, "b": -5}), ValueError, r"sizes\['b'\] .* got -5"),
    (({"a": float("nan"), "b": 0.03}, 0.5), ValueError, r"ratios\['a'\] must be an outlier ratio in \[0, 1\].*got nan"),
    (({"a": 1.5, "b": 0.03}, 0.5), ValueError, r"ratios\['a'\] must be an outlier ratio in \[0, 1\].*got 1.5"),
    (([0.01, 0.03], 0.5), TypeError, r"ratios must be a dict of layer -> outlier ratio, got list.*dict\(zip"),
    (({"a": 0.01}, 0.5, 0.08, [4]), TypeError, "sizes must be a dict"),
])
def test_owl_levels_refuses_bad_ratios_and_sizes(args, error, match):
    """owl_levels: all-zero sizes (which gave NaN levels), a negative size (which gave 1.0), a NaN or out-of-range
    ratio (a NaN was ignored), a list of ratios (a list-index error) and a list of sizes: errors naming the entry."""
    with pytest.raises(error, match=match):
        owl_levels(*args)


def test_outlier_ratio_takes_a_list_and_refuses_non_finite_scores():
    """outlier_ratio of a list of numbers equals that of the tensor (it raised AttributeError); a NaN score (whose
    mean made every comparison False, ratio 0) and a string are refused."""
    values = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 50.0]
    assert outlier_ratio(values, m=5.0) == outlier_ratio(torch.tensor(values), m=5.0) == 0.125
    with pytest.raises(ValueError, match="scores holds 1 NaN or infinite value"):
        outlier_ratio(torch.tensor([1.0, float("nan"), 3.0]))
    with pytest.raises(TypeError, match="scores must be a tensor .* got str"):
        outlier_ratio("scores")


def test_set_owl_levels_refuses_a_blocks_that_is_not_callable():
    """blocks='layers' ('str' object is not callable, after the scores were computed): a TypeError naming blocks and
    the form it takes, and the groups' levels are left as they were."""
    gm = prepare(Skewed(), sparsifier=WandaSparsifier(0.5))
    calibrate(gm, skewed_batches(), progress_bar=False)
    with pytest.raises(TypeError, match=r"blocks must be a function of a weight FQN .*got str 'layers'"):
        set_owl_levels(gm, blocks="layers")
    assert [g["sparsity_level"] for g in get_sparsifier(gm).groups] == [0.5, 0.5, 0.5]
