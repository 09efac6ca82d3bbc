"""``prepare``: the compile-style entry point."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import fx, nn

from .config import SparsityConfig
from .sparsifier import BaseSparsifier, WeightNormSparsifier, get_sparsifier

__all__ = ["prepare", "get_sparsifier"]


def prepare(
    model: nn.Module,
    config: SparsityConfig = None,
    *,
    sparsifier: BaseSparsifier | None = None,
    example_inputs: Any = None,
    leaf_modules: Iterable[type[nn.Module] | str] = (),
    concrete_args: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """Return a new ``GraphModule`` computing ``model`` with a mask on each selected weight.

    Capture (symbolic tracing, or ``torch.export`` when that fails and
    ``example_inputs`` are given), match Linear/Conv weights, select them by
    ``config`` and insert ``mul(weight, mask)`` nodes with all-ones mask buffers.
    ``model`` is not modified; its parameters are shared, not copied.

    Args:
        model: the module to sparsify.
        config: ``None`` selects every Linear and Conv weight; else a list of
            dicts (torch.ao.pruning form) or an FQN-keyed dict whose entries
            override the sparsifier's defaults (see :mod:`fx_sparsity.config`).
        sparsifier: the sparsifier to prepare; ``WeightNormSparsifier()`` when ``None``.
            Either way ``fx_sparsity.get_sparsifier(gm)`` returns it, ready for ``step()``.
        example_inputs: a tensor or tuple, for the ``torch.export`` fallback.
        leaf_modules, concrete_args: symbolic-tracing knobs.

    Returns:
        The prepared ``GraphModule``.

    Example::

        >>> gm = prepare(nn.Sequential(nn.Linear(8, 8)), {"0": {"sparsity_level": 0.75}})
        >>> get_sparsifier(gm).step()
        >>> gm.get_buffer("0.weight_mask").mean().item()
        0.25
    """
    if sparsifier is None:
        sparsifier = WeightNormSparsifier()
    elif not isinstance(sparsifier, BaseSparsifier):
        raise TypeError(f"sparsifier must be a BaseSparsifier instance, got {type(sparsifier).__name__}")
    return sparsifier.prepare(
        model, config, example_inputs=example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args
    )
