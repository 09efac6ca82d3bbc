"""N:M sparsity (2:4, 4:8, ...) and its mask math."""

from fx_sparsity.sparsifier.nm.sparsifier import (
    NMSparsifier,
)

__all__ = [
    "NMSparsifier",
]
