"""The block-norm mask math of ``WeightNormSparsifier``: pure tensor code, no FX.

:func:`weight_norm_mask` reproduces ``torch.ao.pruning.WeightNormSparsifier``
bit for bit on 2-D weights (same block scores, same block choice, ties
included) and goes beyond it: weights of any rank are viewed as
``[out_channels, -1]`` (Conv), and shapes that do not divide into blocks get a
mask of the weight's own shape instead of a padded one. The lowest-scoring blocks are
found by :func:`~fx_sparsity.sparsifier.mask_utils.smallest_k_mask`, without sorting.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from fx_sparsity.sparsifier.mask_utils import smallest_k_mask

__all__ = ["NormFn", "resolve_norm", "validate_block", "weight_norm_keep", "weight_norm_mask"]


NormFn = Callable[[torch.Tensor], torch.Tensor]


def resolve_norm(norm: int | NormFn | None) -> NormFn:
    """The element-wise score of a weight: ``None``/``2`` squares, ``1`` takes ``abs``."""
    if norm is None or (not callable(norm) and norm == 2):
        return _square
    if callable(norm):
        return norm
    if norm == 1:
        return torch.abs
    raise ValueError(f"norm must be 1, 2, None or a callable, got {norm!r}")


def _square(t: torch.Tensor) -> torch.Tensor:
    return t * t


def validate_block(sparse_block_shape: object, zeros_per_block: object) -> tuple[tuple[int, int], int]:
    """Check a block shape and zeros-per-block pair; return them normalised.

    Raises:
        TypeError / ValueError naming the argument, the value and what is allowed.
    """
    shape = sparse_block_shape
    if (
        not isinstance(shape, (tuple, list))
        or len(shape) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)
    ):
        raise TypeError(f"sparse_block_shape must be a pair of ints (rows, cols), got {shape!r}")
    if min(shape) < 1:
        raise ValueError(f"sparse_block_shape must be positive, got {tuple(shape)}")
    values_per_block = shape[0] * shape[1]
    zpb = values_per_block if zeros_per_block is None else zeros_per_block
    if not isinstance(zpb, int) or isinstance(zpb, bool):
        raise TypeError(f"zeros_per_block must be an int or None, got {zeros_per_block!r}")
    if zpb > values_per_block:
        raise ValueError(
            "Number of zeros per block cannot be more than the total number of elements in that "
            f"block: zeros_per_block={zpb}, sparse_block_shape={tuple(shape)} has {values_per_block}"
        )
    if zpb < 0:
        raise ValueError(f"Number of zeros per block should be positive, got zeros_per_block={zpb}")
    return (shape[0], shape[1]), zpb


def _block_scores(scores: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Mean score of each block (partial edge blocks average what they hold)."""
    if block == (1, 1):
        return scores
    return F.avg_pool2d(scores[None, None], kernel_size=block, stride=block, ceil_mode=True)[0, 0]


def _expand_blocks(keep: torch.Tensor, block: tuple[int, int], shape: torch.Size) -> torch.Tensor:
    out = keep.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return out[: shape[0], : shape[1]]


def _tensor_level_keep(scores: torch.Tensor, level: float, block: tuple[int, int]) -> torch.Tensor:
    """Keep-mask zeroing the ``round(level * blocks)`` blocks with the lowest mean score."""
    if level >= 1.0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    block_scores = _block_scores(scores, block)
    num_blocks = block_scores.numel()
    # Python's round (half to even) and the clamp are torch.ao.pruning's.
    k = max(0, min(num_blocks - 1, round(level * num_blocks)))
    keep = ~smallest_k_mask(block_scores.flatten(), k)
    return _expand_blocks(keep.view(block_scores.shape), block, scores.shape)


def _block_level_keep(scores: torch.Tensor, block: tuple[int, int], zeros: int) -> torch.Tensor:
    """Keep-mask zeroing the ``zeros`` lowest scores inside every block.

    Edge blocks are padded with NaN, which ``topk`` ranks above every number,
    so padding is chosen last (torch.ao.pruning's rule).
    """
    h, w = scores.shape
    bh, bw = block
    nbh, nbw = -(-h // bh), -(-w // bw)
    padded = scores.new_full((nbh * bh, nbw * bw), float("nan"))
    padded[:h, :w] = scores
    blocks = padded.view(nbh, bh, nbw, bw).permute(0, 2, 1, 3).reshape(nbh * nbw, bh * bw)
    idx = torch.topk(blocks, zeros, dim=1, largest=False, sorted=False).indices
    keep = torch.ones(blocks.shape, dtype=torch.bool, device=scores.device).scatter_(1, idx, False)
    keep = keep.view(nbh, nbw, bh, bw).permute(0, 2, 1, 3).reshape(nbh * bh, nbw * bw)
    return keep[:h, :w]


def weight_norm_keep(
    weight: torch.Tensor,
    sparsity_level: float,
    sparse_block_shape: tuple[int, int] = (1, 4),
    zeros_per_block: int | None = None,
    norm_fn: NormFn | None = None,
) -> torch.Tensor:
    """:func:`weight_norm_mask` as a boolean tensor (``True`` = kept)."""
    block, zeros = validate_block(sparse_block_shape, zeros_per_block)
    values_per_block = block[0] * block[1]
    if sparsity_level <= 0 or zeros == 0:
        return torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
    if sparsity_level >= 1.0 and zeros == values_per_block:
        return torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
    scores = (norm_fn or resolve_norm(None))(weight.detach().reshape(weight.shape[0], -1))
    keep = _tensor_level_keep(scores, float(sparsity_level), block)
    if zeros != values_per_block:
        keep |= _block_level_keep(scores, block, zeros)
    return keep.reshape(weight.shape)


def weight_norm_mask(
    weight: torch.Tensor,
    sparsity_level: float,
    sparse_block_shape: tuple[int, int] = (1, 4),
    zeros_per_block: int | None = None,
    norm_fn: NormFn | None = None,
) -> torch.Tensor:
    """The WeightNormSparsifier mask of ``weight``, with the weight's shape and dtype.

    ``sparsity_level`` is the fraction of blocks (``sparse_block_shape``) that get
    ``zeros_per_block`` zeros (the lowest scores of the block); the blocks chosen
    are those with the lowest mean score. ``zeros_per_block=None`` zeroes whole blocks.

    Args:
        weight: a Linear (2-D) or Conv (3-5-D, viewed as ``[out, -1]``) weight.
        sparsity_level: clamped to [0, 1] in effect.
        sparse_block_shape: (rows, cols) of a block.
        zeros_per_block: 0 .. rows * cols, or ``None`` for rows * cols.
        norm_fn: element-wise score, ``weight * weight`` by default.

    Example::

        >>> w = torch.tensor([[1.0, -4.0, 2.0, 3.0]])
        >>> weight_norm_mask(w, 1.0, (1, 4), zeros_per_block=2)
        tensor([[0., 1., 0., 1.]])
    """
    return weight_norm_keep(weight, sparsity_level, sparse_block_shape, zeros_per_block, norm_fn).to(weight.dtype)
