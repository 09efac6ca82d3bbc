"""Remove channels physically: a smaller, dense module.

Compute the groups first (:func:`passes.dependency.find_channel_groups`), decide what to
remove second (:func:`plan_shrink`: checked channels, bias folds, notes), rewrite last
(:func:`remove_channels`, in place), then compare (:func:`compare_shrunk`).
"""

from passes.shrink.plan import ShrinkPlan, plan_shrink
from passes.shrink.report import ShrinkReport, compare_shrunk, count_macs, count_params
from passes.shrink.rewrite import remove_channels, shrink_channels

__all__ = [
    "ShrinkPlan",
    "plan_shrink",
    "remove_channels",
    "ShrinkReport",
    "compare_shrunk",
    "count_macs",
    "count_params",
    "shrink_channels",
]
