"""Wanda, pruning by ``|W| x`` input-channel norm (:mod:`.sparsifier`), and its score (:mod:`.scores`)."""

from fx_sparsity.sparsifier.base import INPUT_NORM_KEY
from fx_sparsity.sparsifier.wanda.scores import wanda_scores
from fx_sparsity.sparsifier.wanda.sparsifier import WandaSparsifier

__all__ = [
    "INPUT_NORM_KEY",
    "wanda_scores",
    "WandaSparsifier",
]
