"""Sparsifiers: mask-update algorithms with torch.ao.pruning's contract."""

from .base import BaseSparsifier, clone_without_sparsifier, get_sparsifier
from .group import GroupView, WeightGroup
from .magnitude import GlobalMagnitudeSparsifier, MagnitudeSparsifier
from .nearly_diagonal import NearlyDiagonalSparsifier
from .nm import NMSparsifier
from .structured import ChannelPruner
from .sparsegpt import SparseGPTSparsifier
from .wanda import WandaSparsifier
from .weight_norm import WeightNormSparsifier

__all__ = [
    "BaseSparsifier",
    "ChannelPruner",
    "GlobalMagnitudeSparsifier",
    "MagnitudeSparsifier",
    "NMSparsifier",
    "NearlyDiagonalSparsifier",
    "SparseGPTSparsifier",
    "WandaSparsifier",
    "WeightNormSparsifier",
    "GroupView",
    "WeightGroup",
    "clone_without_sparsifier",
    "get_sparsifier",
]
