"""torch.ao.pruning's ``NearlyDiagonalSparsifier`` (:mod:`.sparsifier`) and its band mask (:mod:`.masks`)."""

from fx_sparsity.sparsifier.nearly_diagonal.masks import nearly_diagonal_mask
from fx_sparsity.sparsifier.nearly_diagonal.sparsifier import NearlyDiagonalSparsifier

__all__ = [
    "nearly_diagonal_mask",
    "NearlyDiagonalSparsifier",
]
