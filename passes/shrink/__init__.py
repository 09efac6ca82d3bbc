"""Remove channels physically: a smaller, dense module."""

from passes.shrink.bias import (
    bias_deltas,
)
from passes.shrink.modules import (
    update_module,
)
from passes.shrink.rewrite import (
    ShrinkReport,
    shrink_channels,
    count_macs,
)

__all__ = [
    "bias_deltas",
    "update_module",
    "ShrinkReport",
    "shrink_channels",
    "count_macs",
]
