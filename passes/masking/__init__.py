"""Insert ``mul(weight, mask)`` nodes and mask buffers, and fuse them back into the weights."""

from passes.masking.fuse import (
    fuse_masks,
    masked_targets,
)
from passes.masking.insert import (
    insert_masks,
)
from passes.masking.lstm import (
    LSTM_KIND,
    find_lstm_weights,
    masked_lstm,
    is_plain_lstm,
)

__all__ = [
    "fuse_masks",
    "masked_targets",
    "insert_masks",
    "LSTM_KIND",
    "find_lstm_weights",
    "masked_lstm",
    "is_plain_lstm",
]
