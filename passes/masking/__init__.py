"""Masks in the graph: ``mul(weight, mask)`` nodes in (:mod:`.insert`, :mod:`.lstm` for ``nn.LSTM``), fused back
into the weights (:mod:`.fuse`), and masked modules swapped for sparse module types (:mod:`.swap`)."""

from passes.masking.fuse import fuse_masks
from passes.masking.insert import check_mask_dtype, insert_masks
from passes.masking.lstm import LSTM_KIND, find_lstm_weights, is_plain_lstm, masked_lstm
from passes.masking.swap import swap_modules

__all__ = [
    "fuse_masks",
    "insert_masks",
    "check_mask_dtype",
    "LSTM_KIND",
    "find_lstm_weights",
    "is_plain_lstm",
    "masked_lstm",
    "swap_modules",
]
