"""Sparsifiers: mask-update algorithms with torch.ao.pruning's contract."""

from fx_sparsity.sparsifier.base import BaseSparsifier, clone_without_sparsifier, get_sparsifier
from fx_sparsity.sparsifier.group import GroupView, WeightGroup
from fx_sparsity.sparsifier.magnitude.sparsifier import GlobalMagnitudeSparsifier, MagnitudeSparsifier
from fx_sparsity.sparsifier.nearly_diagonal.sparsifier import NearlyDiagonalSparsifier
from fx_sparsity.sparsifier.nm.sparsifier import NMSparsifier
from fx_sparsity.structured.pruner import ChannelPruner
from fx_sparsity.sparsifier.sparsegpt.sparsifier import SparseGPTSparsifier
from fx_sparsity.sparsifier.wanda.sparsifier import WandaSparsifier
from fx_sparsity.sparsifier.weight_norm.sparsifier import WeightNormSparsifier

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
