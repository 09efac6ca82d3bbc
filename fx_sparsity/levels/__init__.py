"""Sparsity levels: schedulers that raise them over training steps (:mod:`.scheduler`), and OWL, which gives
layers with more activation outliers more weights to keep (:mod:`.owl`)."""

from fx_sparsity.levels.owl import outlier_ratio, owl_levels, set_owl_levels
from fx_sparsity.levels.scheduler import BaseScheduler, CubicSL, LambdaSL

__all__ = [
    "outlier_ratio",
    "owl_levels",
    "set_owl_levels",
    "BaseScheduler",
    "CubicSL",
    "LambdaSL",
]
