"""Structured pruning: remove whole channels and heads.

Step 1, :class:`ChannelPruner` (:mod:`.pruner`), zeroes whole channel groups in the masks by a criterion
(:mod:`.importance`; gradients for ``"taylor"`` from :func:`accumulate_gradients`, :mod:`.gradients`);
step 2, :func:`shrink` (:mod:`.shrinking`), removes them physically.
"""

from fx_sparsity.meta import shrink_report
from fx_sparsity.structured.gradients import accumulate_gradients
from fx_sparsity.structured.importance import (
    activation_importance,
    channel_importance,
    channels_to_remove,
    count_to_remove,
    taylor_importance,
)
from fx_sparsity.structured.pruner import ChannelPruner
from fx_sparsity.structured.shrinking import shrink

__all__ = [
    "shrink_report",
    "accumulate_gradients",
    "activation_importance",
    "channel_importance",
    "channels_to_remove",
    "count_to_remove",
    "taylor_importance",
    "ChannelPruner",
    "shrink",
]

