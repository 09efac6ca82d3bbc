"""Sparsifiers: mask-update algorithms with torch.ao.pruning's contract."""

from .base import BaseSparsifier, get_sparsifier
from .magnitude import GlobalMagnitudeSparsifier, MagnitudeSparsifier
from .nearly_diagonal import NearlyDiagonalSparsifier
from .nm import NMSparsifier
from .sparsegpt import SparseGPTSparsifier
from .wanda import WandaSparsifier
from .weight_norm import WeightNormSparsifier

__all__ = [
    "BaseSparsifier",
    "GlobalMagnitudeSparsifier",
    "MagnitudeSparsifier",
    "NMSparsifier",
    "NearlyDiagonalSparsifier",
    "SparseGPTSparsifier",
    "WandaSparsifier",
    "WeightNormSparsifier",
    "get_sparsifier",
]
