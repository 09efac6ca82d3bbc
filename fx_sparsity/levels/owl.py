"""OWL: outlier-weighted layer-wise sparsity levels (Yin et al. 2023).

Layers whose activation-aware scores ``|W_ij| * ||X_j||`` (Wanda's) hold more
outliers keep more weights. A layer's outlier ratio is the fraction of its
scores above ``m`` times their mean (the paper's "layerwise outlier
distribution", ``M = 5``). The ratios are rescaled to ``[0, 2 * lam]``
(``lam = 0.08``), centred, and added to the requested density: the levels span
``2 * lam`` (the paper's ``[S - lam, S + lam]`` when the ratios spread evenly)
and average to ``sparsity_level``.

:func:`outlier_ratio` and :func:`owl_levels` are pure tensor/number code;
:func:`set_owl_levels` reads the statistics :func:`fx_sparsity.calibrate` left
in a prepared module's sparsifier and sets every group's ``sparsity_level``
before ``step()``: it works with Wanda, SparseGPT and magnitude (calibrate
records input norms for sparsifiers that do not ask for anything else).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping

import torch
from torch import fx

from fx_sparsity.meta import get_sparsifier
from fx_sparsity.sparsifier.base import INPUT_NORM_KEY
from fx_sparsity.sparsifier.mask_utils import validate_level
from fx_sparsity.sparsifier.sparsegpt.sparsifier import INPUT_HESSIAN_KEY
from fx_sparsity.sparsifier.wanda.scores import wanda_scores

__all__ = ["outlier_ratio", "owl_levels", "owl_scores", "set_owl_levels"]


def outlier_ratio(scores: torch.Tensor, m: float = 5.0) -> float:
    """The fraction of ``scores`` greater than ``m`` times their mean.

    Args:
        scores: a layer's scores, a tensor of any shape (or a list of numbers).
        m: the multiple of the mean above which a score is an outlier.

    Returns:
        The fraction, in ``[0, 1]``.

    Raises:
        TypeError: ``scores`` is not a tensor or a list of numbers.
        ValueError: ``scores`` is empty or holds NaN or infinity; ``m`` is not a number ``> 0``.

    Example::

        >>> outlier_ratio(torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 50.0]), m=5.0)
        0.125
    """
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not m > 0:
        raise ValueError(f"m must be a number > 0 (outliers are scores above m times the mean), got {m!r}")
    if not isinstance(scores, torch.Tensor):
        try:
            scores = torch.as_tensor(scores, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"scores must be a tensor (or a list of numbers) of a layer's scores, got {type(scores).__name__}"
            ) from None
    flat = scores.detach().reshape(-1).double()
    if flat.numel() == 0:
        raise ValueError("outlier_ratio needs at least one score")
    if not torch.isfinite(flat).all():
        raise ValueError(
            f"scores holds {int((~torch.isfinite(flat)).sum())} NaN or infinite value(s) of {flat.numel()}: "
            "their mean is not a threshold; check the weights and the calibration statistics"
        )
    return (flat > m * flat.mean()).double().mean().item()


def owl_levels(
    ratios: Mapping[str, float],
    sparsity_level: float,
    lam: float = 0.08,
    sizes: Mapping[str, int] | None = None,
) -> dict[str, float]:
    """Per-layer sparsity levels from per-layer outlier ratios (OWL).

    ``density = (r - min r) / (max r - min r) * 2 * lam``, minus its mean, plus
    ``1 - sparsity_level``; ``level = 1 - density``, clipped to ``[0, 1]``. The
    mean is unweighted, as in the paper (whose layers all have one size); with
    ``sizes`` (parameters per layer) it is weighted by them, so that the
    overall fraction of pruned weights is ``sparsity_level``. Equal ratios give
    every layer ``sparsity_level``.

    Args:
        ratios: layer -> outlier ratio (see :func:`outlier_ratio`).
        sparsity_level: the average level wanted.
        lam: half the span of the levels (``lambda``).
        sizes: layer -> number of weights, to weight the mean.

    Returns:
        layer -> sparsity level.

    Raises:
        TypeError: ``ratios`` or ``sizes`` is not a dict.
        ValueError: a ratio is not a number in ``[0, 1]`` (NaN included), a size is not a
            number ``> 0``, ``sizes`` lacks a layer, or ``sparsity_level``/``lam`` is out of range.

    Example::

        >>> owl_levels({"a": 0.01, "b": 0.03}, 0.5)
        {'a': 0.58, 'b': 0.42}
    """
    level = validate_level(sparsity_level)
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 <= lam <= 0.5:
        raise ValueError(f"lam must be a number in [0, 0.5] (half the span of the levels), got {lam!r}")
    _check_ratios(ratios)
    names = list(ratios)
    r = torch.tensor([float(ratios[n]) for n in names], dtype=torch.float64)
    if sizes is not None:
        _check_sizes(sizes, names)
    w = torch.tensor([float(sizes[n]) for n in names] if sizes is not None else [1.0] * len(names), dtype=torch.float64)
    span = r.max() - r.min()
    scaled = (r - r.min()) / span * (2 * lam) if span > 0 else torch.zeros_like(r)
    density = scaled - (scaled * w).sum() / w.sum() + (1 - level)
    levels = (1 - density).clamp(0.0, 1.0)
    return {n: round(levels[i].item(), 12) for i, n in enumerate(names)}


def _as_number(value: object) -> float | None:
    """``value`` as a float when it is a real number (a Python or NumPy number, a one-element tensor), else ``None``."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex and value.dtype != torch.bool:
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def _check_ratios(ratios: object) -> None:
    if not isinstance(ratios, Mapping):
        hint = " (pair each ratio with its layer: dict(zip(names, ratios)))" if isinstance(ratios, (list, tuple)) else ""
        raise TypeError(f"ratios must be a dict of layer -> outlier ratio, got {type(ratios).__name__}{hint}")
    if not ratios:
        raise ValueError("owl_levels needs at least one layer")
    for name, ratio in ratios.items():
        value = _as_number(ratio)
        if value is None or not 0 <= value <= 1:  # False for NaN too
            raise ValueError(
                f"ratios[{name!r}] must be an outlier ratio in [0, 1] (a fraction of the layer's scores, see "
                f"outlier_ratio), got {ratio!r}"
            )


def _check_sizes(sizes: object, names: list[str]) -> None:
    if not isinstance(sizes, Mapping):
        raise TypeError(f"sizes must be a dict of layer -> number of weights, or None; got {type(sizes).__name__}")
    missing = [n for n in names if n not in sizes]
    if missing:
        raise ValueError(f"sizes has no entry for {missing}")
    for name in names:
        size = _as_number(sizes[name])
        if size is None or not 0 < size < math.inf:
            raise ValueError(
                f"sizes[{name!r}] must be the layer's number of weights, a number > 0, got {sizes[name]!r}; "
                "leave out a layer without weights"
            )


def owl_scores(sparsifier: object, group: dict) -> torch.Tensor:
    """Wanda's scores ``|W_ij| * ||X_j||`` of ``group`` from what calibrate recorded.

    Input norms (Wanda, and sparsifiers without their own statistics) are used
    as they are; from an input Hessian (SparseGPT) ``||X_j|| = sqrt(H_jj)`` per
    column of the weight's ``[out, in * kernel]`` view.
    """
    fqn = group["tensor_fqn"]
    state = sparsifier.state.get(fqn, {})
    weight = getattr(group["module"], group["tensor_name"]) * getattr(group["module"], group["tensor_name"] + "_mask")
    if INPUT_NORM_KEY in state:
        return wanda_scores(weight, state[INPUT_NORM_KEY], fqn)
    if INPUT_HESSIAN_KEY in state:
        hessian = state[INPUT_HESSIAN_KEY]
        norms = hessian.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt().to(weight.dtype)  # [groups, columns]
        rows = weight.reshape(weight.shape[0], -1)
        per_row = norms.repeat_interleave(rows.shape[0] // norms.shape[0], 0)
        return rows.abs() * per_row
    raise RuntimeError(f"no input statistics for {fqn}: run fx_sparsity.calibrate(gm, batches) before OWL")


def set_owl_levels(
    gm: fx.GraphModule,
    sparsity_level: float | None = None,
    *,
    m: float = 5.0,
    lam: float = 0.08,
    blocks: Callable[[str], str] | None = None,
) -> dict[str, float]:
    """Set each group's ``sparsity_level`` by OWL, after ``calibrate`` and before ``step``.

    Args:
        gm: a prepared and calibrated module (Wanda, SparseGPT, magnitude, or any
            sparsifier whose groups take ``sparsity_level``).
        sparsity_level: the overall level; default: the sparsifier's own.
        m: outliers are scores above ``m`` times their layer's mean.
        lam: half the span of the layers' levels (``lambda``).
        blocks: maps a weight FQN to its "layer" (the paper treats a transformer
            block as one layer: ``lambda fqn: fqn.split(".")[1]``); default:
            each weight is a layer. A block's outlier ratio is over all its scores.

    Returns:
        tensor FQN -> the level it got. The mean weighted by weight counts is
        ``sparsity_level`` (unless clipping at 0 or 1 was needed).

    Raises:
        ValueError: a group uses N:M (OWL sets unstructured levels); bad ``m``/``lam``.
        TypeError: ``blocks`` is not callable.
        RuntimeError: ``calibrate`` has not run.

    Example::

        >>> gm = fx_sparsity.prepare(model, sparsifier=fx_sparsity.WandaSparsifier(0.5))
        >>> _ = fx_sparsity.calibrate(gm, batches, progress_bar=False)
        >>> levels = set_owl_levels(gm)
        >>> fx_sparsity.get_sparsifier(gm).step()
    """
    if blocks is not None and not callable(blocks):
        raise TypeError(
            f"blocks must be a function of a weight FQN giving its layer's name, like lambda fqn: fqn.split('.')[1], "
            f"or None (each weight is a layer); got {type(blocks).__name__} {blocks!r}"
        )
    sparsifier = get_sparsifier(gm)
    level = sparsity_level if sparsity_level is not None else sparsifier.defaults.get("sparsity_level")
    if level is None:
        raise ValueError(f"{type(sparsifier).__name__} has no sparsity_level: pass sparsity_level=")
    validate_level(level)
    for group in sparsifier.groups:
        if "sparsity_level" not in group:
            raise ValueError(f"{group['tensor_fqn']} has no sparsity_level argument for OWL to set")
        if group.get("nm") is not None:
            raise ValueError(f"{group['tensor_fqn']} uses N:M {group['nm']}: OWL sets unstructured levels; drop nm")
    key_of = blocks if blocks is not None else (lambda fqn: fqn)
    scores: dict[str, list[torch.Tensor]] = {}
    sizes: dict[str, int] = {}
    for group in sparsifier.groups:
        key = key_of(group["tensor_fqn"])
        s = owl_scores(sparsifier, group)
        scores.setdefault(key, []).append(s.reshape(-1))
        sizes[key] = sizes.get(key, 0) + s.numel()
    ratios = {key: outlier_ratio(torch.cat(parts), m) for key, parts in scores.items()}
    per_block = owl_levels(ratios, level, lam, sizes)
    levels = {g["tensor_fqn"]: per_block[key_of(g["tensor_fqn"])] for g in sparsifier.groups}
    for group in sparsifier.groups:
        group["sparsity_level"] = levels[group["tensor_fqn"]]
    return levels
