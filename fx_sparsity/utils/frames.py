"""Warnings that point at the user's line, however deep inside fx_sparsity they are raised."""

from __future__ import annotations

from passes.utils import user_stacklevel

__all__ = ["caller_stacklevel"]


def caller_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` called by the caller of this function that names the
    first frame outside the library (the user's line): :func:`passes.utils.user_stacklevel`."""
    return user_stacklevel() - 1
