"""Functions of fx_sparsity 0.1.0 whose work moved, kept for one release (the old module paths themselves are
answered by :mod:`passes.compat`)."""

from __future__ import annotations

import warnings
from collections.abc import Collection, Mapping

from torch import fx, nn

from fx_sparsity.meta import clone_without_sparsifier
from passes.masking import swap_modules

__all__ = ["convert_modules"]


def convert_modules(
    module: fx.GraphModule,
    mapping: Mapping[type[nn.Module], type[nn.Module]],
    sparsified: Collection[str],
    *,
    inplace: bool = False,
) -> fx.GraphModule:
    """Deprecated (``fx_sparsity.convert.convert_modules``): ``BaseSparsifier.convert``, or
    :func:`passes.masking.swap_modules` on a clone."""
    warnings.warn(
        "fx_sparsity.convert.convert_modules is deprecated: use sparsifier.convert(gm, mapping), or "
        "passes.masking.swap_modules(clone, mapping, fqns) (it will be removed in the release after next)",
        DeprecationWarning,
        stacklevel=2,
    )
    if not isinstance(module, fx.GraphModule):
        raise TypeError(f"module must be the GraphModule prepare() returned, got {type(module).__name__}")
    return swap_modules(module if inplace else clone_without_sparsifier(module), mapping, sparsified)
