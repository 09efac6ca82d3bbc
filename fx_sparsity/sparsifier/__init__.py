"""Sparsifiers: mask-update algorithms with torch.ao.pruning's contract."""

from .base import BaseSparsifier, get_sparsifier
from .nearly_diagonal import NearlyDiagonalSparsifier
from .weight_norm import WeightNormSparsifier

__all__ = ["BaseSparsifier", "NearlyDiagonalSparsifier", "WeightNormSparsifier", "get_sparsifier"]
