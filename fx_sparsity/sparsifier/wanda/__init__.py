"""Wanda: pruning by weight magnitude times input-channel norm."""

from fx_sparsity.sparsifier.wanda.sparsifier import (
    WandaSparsifier,
    INPUT_NORM_KEY,
    wanda_scores,
)

__all__ = [
    "WandaSparsifier",
    "INPUT_NORM_KEY",
    "wanda_scores",
]
