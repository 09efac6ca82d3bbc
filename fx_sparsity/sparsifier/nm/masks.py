"""N:M masks (the ``n`` largest of every ``m`` along the input dimension): pure tensor code, no FX."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["validate_nm", "nm_keep"]


def validate_nm(n: object, m: object) -> tuple[int, int]:
    """``(n, m)`` as ints with 0 <= n < m, or a ``TypeError``/``ValueError`` naming them."""
    for name, value in (("n", n), ("m", m)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if not 0 <= n < m:
        raise ValueError(f"N:M sparsity needs 0 <= n < m, got n={n}, m={m} (e.g. n=2, m=4 for 2:4)")
    return n, m


def nm_keep(weight: torch.Tensor, n: int, m: int, scores: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the ``n`` largest of every ``m`` consecutive entries along the input dimension.

    The weight is viewed as ``[out, -1]`` (a Conv's input channels times kernel
    positions). In each full group the ``m - n`` smallest scores (``|w|`` by
    default) are zeroed with ``topk(largest=False)``, as torch.ao.pruning's
    WeightNormSparsifier does for ``(1, m)`` blocks with ``m - n`` zeros; a
    shorter group at the end of a row keeps its ``n`` largest.

    Example::

        >>> nm_keep(torch.tensor([[1.0, -4.0, 2.0, 3.0, 5.0, 0.5]]), 2, 4).int().tolist()
        [[0, 1, 0, 1, 1, 1]]
    """
    n, m = validate_nm(n, m)
    scores = (weight.detach().abs() if scores is None else scores).reshape(weight.shape[0], -1)
    rows, cols = scores.shape
    pad = (-cols) % m
    # Padding scores are -inf: they are zeroed first, so a short tail group loses only what exceeds n.
    padded = F.pad(scores, (0, pad), value=float("-inf")).reshape(rows, -1, m)
    drop = torch.topk(padded, m - n, dim=-1, largest=False, sorted=False).indices
    keep = torch.ones(padded.shape, dtype=torch.bool, device=weight.device).scatter_(-1, drop, False)
    return keep.reshape(rows, -1)[:, :cols].reshape(weight.shape)
