"""torch.ao.pruning's nearly-diagonal sparsifier and its mask math."""

from fx_sparsity.sparsifier.nearly_diagonal.sparsifier import (
    NearlyDiagonalSparsifier,
)

__all__ = [
    "NearlyDiagonalSparsifier",
]
