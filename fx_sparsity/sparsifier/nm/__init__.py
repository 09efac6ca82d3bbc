"""N:M sparsity, 2:4, 4:8, ... (:mod:`.sparsifier`) and its masks (:mod:`.masks`)."""

from fx_sparsity.sparsifier.nm.masks import nm_keep, validate_nm
from fx_sparsity.sparsifier.nm.sparsifier import NMSparsifier

__all__ = [
    "nm_keep",
    "validate_nm",
    "NMSparsifier",
]
