"""The band mask of ``NearlyDiagonalSparsifier``: pure tensor code, no FX."""

from __future__ import annotations

import torch

__all__ = ["nearly_diagonal_mask"]


def nearly_diagonal_mask(weight: torch.Tensor, nearliness: int) -> torch.Tensor:
    """Mask keeping the ``nearliness`` diagonals closest to the main one.

    Entry (i, j) of the ``[out, -1]`` view is kept when ``|i - j| <= nearliness // 2``;
    ``nearliness <= 0`` keeps nothing.

    Raises:
        ValueError: ``nearliness`` is even, or reaches past the smaller dimension.

    Example::

        >>> nearly_diagonal_mask(torch.ones(3, 3), 3)
        tensor([[1., 1., 0.],
                [1., 1., 1.],
                [0., 1., 1.]])
    """
    if isinstance(nearliness, bool) or not isinstance(nearliness, int):
        raise TypeError(f"nearliness must be an int, got {nearliness!r}")
    if nearliness <= 0:
        return torch.zeros_like(weight)
    height, width = weight.shape[0], weight[0].numel()
    if nearliness % 2 == 0:
        raise ValueError(f"nearliness can only be an odd number, got {nearliness}")
    reach = nearliness // 2
    if reach >= min(height, width):
        raise ValueError(
            f"nearliness cannot be larger than the dimensions of tensor: nearliness={nearliness} "
            f"reaches {reach} off the diagonal of a {height}x{width} weight (at most {min(height, width) - 1})"
        )
    rows = torch.arange(height, device=weight.device)[:, None]
    cols = torch.arange(width, device=weight.device)[None, :]
    keep = (rows - cols).abs() <= reach
    return keep.reshape(weight.shape).to(weight.dtype)
