"""Structured pruning: remove whole channels and heads (``ChannelPruner``, ``shrink``)."""

from fx_sparsity.structured.importance import (
    Criterion,
    activation_importance,
    channel_importance,
    channel_rows,
    channels_to_remove,
    count_to_remove,
    grouped_columns,
    taylor_importance,
)
from fx_sparsity.structured.pruner import (
    ChannelPruner,
    accumulate_gradients,
)
from fx_sparsity.structured.shrinking import (
    shrink,
    shrink_report,
    SHRINK_REPORT_KEY,
    SHRINK_INPUTS_KEY,
)

__all__ = [
    "Criterion",
    "activation_importance",
    "channel_importance",
    "channel_rows",
    "channels_to_remove",
    "count_to_remove",
    "grouped_columns",
    "taylor_importance",
    "ChannelPruner",
    "accumulate_gradients",
    "shrink",
    "shrink_report",
    "SHRINK_REPORT_KEY",
    "SHRINK_INPUTS_KEY",
]
