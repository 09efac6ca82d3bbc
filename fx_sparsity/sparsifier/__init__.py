"""Sparsifiers: mask-update algorithms with torch.ao.pruning's contract.

:class:`BaseSparsifier` (:mod:`.base`) holds typed groups (:mod:`.group`) and runs the prepare recipe
(:mod:`.preparing`); each algorithm is a folder with its sparsifier and, beside it, its pure tensor math
(``weight_norm/``, ``nearly_diagonal/``, ``magnitude/``, ``nm/``, ``wanda/``, ``sparsegpt/``); math they
share is in :mod:`.mask_utils`. Structured pruning's ``ChannelPruner`` is :mod:`fx_sparsity.structured`.
"""

from fx_sparsity.sparsifier.base import BaseSparsifier
from fx_sparsity.sparsifier.group import GroupView, WeightGroup
from fx_sparsity.sparsifier.magnitude.sparsifier import GlobalMagnitudeSparsifier, MagnitudeSparsifier
from fx_sparsity.sparsifier.nearly_diagonal.sparsifier import NearlyDiagonalSparsifier
from fx_sparsity.sparsifier.nm.sparsifier import NMSparsifier
from fx_sparsity.sparsifier.sparsegpt.sparsifier import SparseGPTSparsifier
from fx_sparsity.sparsifier.wanda.sparsifier import WandaSparsifier
from fx_sparsity.sparsifier.weight_norm.sparsifier import WeightNormSparsifier
from passes.compat import moved_names

__all__ = [
    "BaseSparsifier",
    "GroupView",
    "WeightGroup",
    "GlobalMagnitudeSparsifier",
    "MagnitudeSparsifier",
    "NearlyDiagonalSparsifier",
    "NMSparsifier",
    "SparseGPTSparsifier",
    "WandaSparsifier",
    "WeightNormSparsifier",
]

# Names of fx_sparsity 0.1.0's fx_sparsity.sparsifier that now live elsewhere.
__getattr__ = moved_names(
    __name__,
    {
        "ChannelPruner": "fx_sparsity.structured",
        "get_sparsifier": "fx_sparsity.meta",
        "clone_without_sparsifier": "fx_sparsity.meta",
    },
)
