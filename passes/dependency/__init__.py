"""Channel dependency analysis: the groups of coupled channels that must shrink together."""

from passes.dependency.analysis import (
    Member,
    ChannelGroup,
    find_channel_groups,
    run_recording,
)
from passes.dependency.layout import (
    Layout,
    follow_node,
)
from passes.dependency.op_categories import (
    POINTWISE,
    SPATIAL,
    REDUCTIONS,
    RESHAPES,
    TRANSPOSES,
    CONCATS,
    SPLITS,
    SHAPE_QUERIES,
    MATMULS,
    SOFTMAXES,
    ATTENTION,
    EXPANDS,
    SLICES,
    LAYER_NORMS,
    SIZED_RESHAPES,
    EXPANDING,
    PERMUTES,
    op_category,
)
from passes.dependency.spaces import (
    Spaces,
)

__all__ = [
    "Member",
    "ChannelGroup",
    "find_channel_groups",
    "run_recording",
    "Layout",
    "follow_node",
    "POINTWISE",
    "SPATIAL",
    "REDUCTIONS",
    "RESHAPES",
    "TRANSPOSES",
    "CONCATS",
    "SPLITS",
    "SHAPE_QUERIES",
    "MATMULS",
    "SOFTMAXES",
    "ATTENTION",
    "EXPANDS",
    "SLICES",
    "LAYER_NORMS",
    "SIZED_RESHAPES",
    "EXPANDING",
    "PERMUTES",
    "op_category",
    "Spaces",
]
