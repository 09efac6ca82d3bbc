"""Magnitude sparsifiers (per layer and global) and their mask math."""

from fx_sparsity.sparsifier.magnitude.sparsifier import (
    MagnitudeSparsifier,
    GlobalMagnitudeSparsifier,
)

__all__ = [
    "MagnitudeSparsifier",
    "GlobalMagnitudeSparsifier",
]
