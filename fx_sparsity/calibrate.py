"""``calibrate``: record per-channel input norms of the masked ops, for activation-aware sparsifiers."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, fx

from passes import insert_input_observers, remove_input_observers

from .progress import progress
from .sparsifier import get_sparsifier
from .sparsifier.wanda import INPUT_NORM_KEY

__all__ = ["calibrate"]


def calibrate(gm: fx.GraphModule, batches: Iterable[Any], *, progress_bar: bool = True) -> dict[str, Tensor]:
    """Run ``batches`` through ``gm`` with observers in front of every masked op.

    Observer nodes are inserted, every batch is run under ``no_grad``, and the
    observers are removed again, leaving ``gm``'s graph as it was. The L2 norm of
    each input channel over all batches is stored for each weight in
    ``get_sparsifier(gm).state[tensor_fqn]["input_norm"]`` (what
    :class:`~fx_sparsity.WandaSparsifier` scores with) and returned.

    Args:
        gm: a module returned by ``prepare`` (masks in place).
        batches: an iterable of inputs: a tensor, or a tuple of positional inputs, per batch.
        progress_bar: show a progress bar on stderr.

    Returns:
        tensor FQN -> input-channel norms.

    Raises:
        ValueError: ``batches`` is empty.

    Example::

        >>> gm = fx_sparsity.prepare(model, sparsifier=fx_sparsity.WandaSparsifier(0.5))
        >>> norms = fx_sparsity.calibrate(gm, [torch.randn(8, 64) for _ in range(4)])
    """
    sparsifier = get_sparsifier(gm)
    observers = insert_input_observers(gm, [g["tensor_fqn"] for g in sparsifier.groups])
    total = len(batches) if hasattr(batches, "__len__") else None
    seen = 0
    try:
        with torch.no_grad():
            for batch in progress(batches, progress_bar, "calibrate", total):
                gm(*batch) if isinstance(batch, tuple) else gm(batch)
                seen += 1
    finally:
        remove_input_observers(gm)
    if not seen:
        raise ValueError("calibrate needs at least one batch; batches was empty")
    norms = {fqn: observer.norm() for fqn, observer in observers.items()}
    for fqn, norm in norms.items():
        sparsifier.state[fqn][INPUT_NORM_KEY] = norm
    return norms
