"""The math of structured pruning, over plain tensors: channel importance, and which channels go.

:class:`~fx_sparsity.ChannelPruner` gathers each channel group's entries
(:func:`channel_rows`) and scores them here: ``"l1"``/``"l2"``/``"fpgm"``
(:func:`channel_importance`, torch.ao.pruning's ``SaliencyPruner``/``FPGMPruner``),
first-order Taylor (:func:`taylor_importance`) or activation norms
(:func:`activation_importance`); then :func:`count_to_remove` applies the counting
rule and :func:`channels_to_remove` picks the least important channels per block.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from passes.dependency import Member

__all__ = [
    "Criterion",
    "activation_importance",
    "channel_importance",
    "channel_rows",
    "channels_to_remove",
    "count_to_remove",
    "grouped_columns",
    "taylor_importance",
]

Criterion = Literal["l1", "l2", "fpgm", "taylor", "activation"]


def channel_importance(rows: torch.Tensor, criterion: Criterion = "l1") -> torch.Tensor:
    """Importance of each channel from ``rows`` (``[channels, features]``, every producer's weights side by side).

    ``"l1"``/``"l2"``: the norm of the channel's row (torch.ao.pruning's
    ``SaliencyPruner`` uses L1). ``"fpgm"``: the summed L2 distance to every other
    row (``FPGMPruner``): rows near the geometric median are redundant and score low.

    Example::

        >>> channel_importance(torch.tensor([[1.0, -2.0], [0.5, 0.0]]))
        tensor([3.0000, 0.5000])
    """
    if criterion == "l1":
        return rows.abs().sum(1)
    if criterion == "l2":
        return rows.pow(2).sum(1).sqrt()
    if criterion == "fpgm":
        return torch.cdist(rows[None], rows[None], p=2)[0].abs().sum(1)
    raise ValueError(f"criterion must be 'l1', 'l2' or 'fpgm', got {criterion!r}")


def taylor_importance(rows: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """First-order Taylor importance of each channel: ``sum_j |rows[c, j] * gradients[c, j]|``.

    Args:
        rows: ``[channels, entries]``, every group member's entries of the channel side by side.
        gradients: the loss gradient of each entry, same shape.

    Returns:
        ``[channels]`` scores (the loss change a first-order expansion predicts for zeroing each entry, summed).

    Example::

        >>> taylor_importance(torch.tensor([[1.0, -2.0], [0.5, 0.0]]), torch.tensor([[0.5, 1.0], [-4.0, 9.0]]))
        tensor([2.5000, 2.0000])
    """
    if rows.shape != gradients.shape:
        raise ValueError(f"rows {tuple(rows.shape)} and gradients {tuple(gradients.shape)} must have one shape")
    return (rows * gradients).abs().sum(1)


def activation_importance(sum_squares: torch.Tensor) -> torch.Tensor:
    """L2 norm of each channel's activation from ``[channels, entries]`` sums of squares (over batches, positions
    and every consumer reading the channel, side by side).

    Example::

        >>> activation_importance(torch.tensor([[9.0, 16.0], [1.0, 0.0]]))
        tensor([5., 1.])
    """
    return sum_squares.sum(1).sqrt()


def grouped_columns(module: nn.Module) -> int:
    """``groups`` of a grouped (not depthwise) conv, whose weight columns are per block; else 1."""
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and module.weight.shape[1] > 1:
        return module.groups
    return 1


def channel_rows(tensor: torch.Tensor, member: Member, size: int, groups: int = 1) -> torch.Tensor:
    """``[size, entries]``: the entries of ``tensor`` each of the group's channels owns in ``member``.

    A grouped conv's input columns are per block (``groups`` > 1): input channel ``c`` is column
    ``c % per_block`` of the rows of block ``c // per_block``.
    """
    if member.kind == "consumer" and groups > 1:
        out, per_block = tensor.shape[0] // groups, tensor.shape[1]
        by_input = tensor.reshape(groups, out, per_block, -1).permute(0, 2, 1, 3).reshape(groups * per_block, -1)
        return by_input[member.indices(torch.arange(size))].reshape(size, -1)
    return tensor.movedim(member.dim, 0)[member.indices(torch.arange(size))].reshape(size, -1)


def count_to_remove(size: int, ratio: float, round_to: int = 1, blocks: int = 1) -> int:
    """How many of ``size`` channels to remove (the rule in the module docstring).

    Example::

        >>> count_to_remove(64, 0.3), count_to_remove(64, 0.3, round_to=8), count_to_remove(4, 0.3)
        (19, 16, 1)
    """
    multiple = round_to * blocks // math.gcd(round_to, blocks)
    keep = size - math.floor(ratio * size)
    keep = min(size, -(-keep // multiple) * multiple)
    return size - keep


def channels_to_remove(importance: torch.Tensor, count: int, blocks: int = 1) -> torch.Tensor:
    """The ``count`` least important channels, ``count / blocks`` from each of ``blocks`` equal blocks (sorted).

    Ties go to the lower channel number (a stable sort), so the choice is deterministic.

    Example::

        >>> channels_to_remove(torch.tensor([3.0, 1.0, 2.0, 0.0]), 2, blocks=2)
        tensor([1, 3])
    """
    per_block = importance.numel() // blocks
    chosen = []
    for k in range(blocks):
        block = importance[k * per_block : (k + 1) * per_block]
        chosen.append(torch.sort(block, stable=True).indices[: count // blocks] + k * per_block)
    return torch.cat(chosen).sort().values
