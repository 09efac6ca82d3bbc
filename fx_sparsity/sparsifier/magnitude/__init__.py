"""Magnitude sparsifiers, per layer and global (:mod:`.sparsifier`), and their masks (:mod:`.masks`)."""

from fx_sparsity.sparsifier.magnitude.masks import global_magnitude_keep, magnitude_keep
from fx_sparsity.sparsifier.magnitude.sparsifier import GlobalMagnitudeSparsifier, MagnitudeSparsifier

__all__ = [
    "global_magnitude_keep",
    "magnitude_keep",
    "GlobalMagnitudeSparsifier",
    "MagnitudeSparsifier",
]
