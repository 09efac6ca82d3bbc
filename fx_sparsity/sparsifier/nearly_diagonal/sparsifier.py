"""``NearlyDiagonalSparsifier``: keep a band around the diagonal (torch.ao.pruning semantics)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fx_sparsity.sparsifier.base import BaseSparsifier
from fx_sparsity.sparsifier.nearly_diagonal.masks import nearly_diagonal_mask

__all__ = ["NearlyDiagonalSparsifier"]


class NearlyDiagonalSparsifier(BaseSparsifier):
    r"""Keep the ``nearliness`` diagonals closest to the main diagonal, zero the rest.

    ``nearliness=1`` keeps the main diagonal only, ``3`` one more on each side.
    ``nearliness <= 0`` zeroes everything. Conv weights are viewed as ``[out, -1]``.

    Raises (at ``step``, before any mask changes, as torch.ao.pruning does; a non-int at ``prepare``):
        ValueError: ``nearliness`` is even, or ``nearliness // 2`` is not smaller
            than both dimensions of the weight.

    Example::

        >>> sparsifier = NearlyDiagonalSparsifier(nearliness=1)
        >>> gm = sparsifier.prepare(nn.Sequential(nn.Linear(3, 3)), None)
        >>> sparsifier.step()
        >>> gm.get_buffer("0.weight_mask").diag().tolist()
        [1.0, 1.0, 1.0]
    """

    def __init__(self, nearliness: int = 1) -> None:
        if isinstance(nearliness, bool) or not isinstance(nearliness, int):
            raise TypeError(f"nearliness must be an int, got {nearliness!r}")
        super().__init__(defaults={"nearliness": nearliness})

    def validate_group(self, group: dict[str, Any], weight_shape: tuple[int, ...]) -> None:
        nearliness = group["nearliness"]
        if isinstance(nearliness, bool) or not isinstance(nearliness, int):
            raise TypeError(f"nearliness of {group['tensor_fqn']} must be an int, got {nearliness!r}")

    def check_step(self, group: dict[str, Any], weight_shape: tuple[int, ...]) -> None:
        """An even ``nearliness``, or one reaching past the weight, is refused here, at ``step()`` (before any mask
        changes), where torch.ao.pruning refuses it, rather than when it is set."""
        nearly_diagonal_mask(torch.empty(weight_shape, device="meta"), group["nearliness"])

    def target_sparsity(self, group: dict[str, Any]) -> float:
        """Fraction of the ``[out, -1]`` view outside the band."""
        weight = getattr(group["module"], group["tensor_name"])
        height, width = weight.shape[0], weight[0].numel()
        nearliness = group["nearliness"]
        if nearliness <= 0:
            return 1.0
        reach = nearliness // 2
        rows = torch.arange(height)
        kept = ((rows + reach + 1).clamp(max=width) - (rows - reach).clamp(min=0)).clamp(min=0).sum()
        return 1.0 - kept.item() / (height * width)

    def update_mask(self, module: nn.Module, tensor_name: str, nearliness: int, **kwargs: Any) -> None:  # type: ignore[override]
        mask = self.get_mask(module, tensor_name)
        mask.copy_(nearly_diagonal_mask(mask, nearliness))
