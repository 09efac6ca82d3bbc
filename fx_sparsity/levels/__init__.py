"""Per-layer sparsity levels: schedulers over steps, OWL over layers."""

from fx_sparsity.levels.owl import (
    outlier_ratio,
    owl_levels,
    owl_scores,
    set_owl_levels,
)
from fx_sparsity.levels.scheduler import (
    BaseScheduler,
    LambdaSL,
    CubicSL,
)

__all__ = [
    "outlier_ratio",
    "owl_levels",
    "owl_scores",
    "set_owl_levels",
    "BaseScheduler",
    "LambdaSL",
    "CubicSL",
]
