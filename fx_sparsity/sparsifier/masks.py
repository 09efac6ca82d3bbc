"""Mask math: pure tensor code, no FX, testable and benchmarkable alone.

:func:`weight_norm_mask` reproduces ``torch.ao.pruning.WeightNormSparsifier``
bit for bit on 2-D weights (same block scores, same block choice, ties
included) and goes beyond it: weights of any rank are viewed as
``[out_channels, -1]`` (Conv), and shapes that do not divide into blocks get a
mask of the weight's own shape instead of a padded one.

Speed comes from never sorting: the ``k`` lowest-scoring blocks are found with
a threshold (see :func:`smallest_k_mask`) instead of ``topk(sorted=True)``
followed by ``scatter`` and ``fold`` over the whole tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "NormFn",
    "resolve_norm",
    "smallest_k_mask",
    "weight_norm_keep",
    "weight_norm_mask",
    "nearly_diagonal_mask",
    "validate_block",
    "magnitude_keep",
    "global_magnitude_keep",
    "nm_keep",
    "validate_level",
    "validate_nm",
    "to_bool_mask",
]

NormFn = Callable[[torch.Tensor], torch.Tensor]

# Below this many scores a plain topk is as fast as anything else.
_TOPK_CUTOFF = 1 << 16
_SAMPLE_SIZE = 1 << 16


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


def smallest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` smallest entries of 1-D ``scores``.

    The chosen set is exactly the one ``torch.topk(scores, k, largest=False)``
    picks, including which of several tied values it takes: when the k-th
    smallest value is unique at the boundary the set is determined by value
    alone and is found with a sampled threshold and counting (a few linear
    passes); when ties straddle the boundary the answer comes from ``topk``.
    """
    n = scores.numel()
    # NaN needs no check: topk ranks it above every number, and comparisons
    # below never choose it, so "exactly k chosen" means topk's set either way.
    if k <= 0 or n <= _TOPK_CUTOFF:
        return _topk_mask(scores, k)
    sample = scores[:: max(1, n // _SAMPLE_SIZE)]
    m = sample.numel()
    q = k / n
    slack = 4.0 / math.sqrt(m)
    lo = torch.kthvalue(sample, max(1, math.floor((q - slack) * m))).values
    hi = torch.kthvalue(sample, min(m, math.ceil((q + slack) * m))).values
    below = int(torch.count_nonzero(scores < lo))
    window = (scores >= lo) & (scores <= hi)
    inside = scores[window]
    if below < k <= below + inside.numel():
        kth = torch.kthvalue(inside, k - below).values
        chosen = scores <= kth
        if int(torch.count_nonzero(chosen)) == k:
            return chosen
    # The sample missed the k-th value, or ties straddle it: let topk decide.
    return _topk_mask(scores, k)


def _topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the entries ``torch.topk(scores, k, largest=False)`` picks."""
    picked = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        picked[torch.topk(scores, k, largest=False, sorted=False).indices] = True
    return picked


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


def validate_level(level: object, name: str = "sparsity_level") -> float:
    """``level`` as a float in [0, 1], or a ``TypeError``/``ValueError`` naming it."""
    if isinstance(level, bool) or not isinstance(level, (int, float)):
        raise TypeError(f"{name} must be a number in [0, 1], got {level!r}")
    if not 0.0 <= level <= 1.0:  # False for NaN too
        raise ValueError(f"{name} must be in [0, 1], got {level!r}")
    return float(level)


def _keep_all_but_smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    return ~smallest_k_mask(scores, k)


def magnitude_keep(weight: torch.Tensor, sparsity_level: float) -> torch.Tensor:
    """Keep all but the ``round(level * numel)`` entries of smallest ``|w|`` (``True`` = kept).

    The zeros are exactly those ``torch.nn.utils.prune.l1_unstructured`` picks,
    ties included (see :func:`smallest_k_mask`).
    """
    scores = weight.detach().abs().reshape(-1)
    k = round(validate_level(sparsity_level) * scores.numel())
    return _keep_all_but_smallest(scores, k).reshape(weight.shape)


def global_magnitude_keep(weights: list[torch.Tensor], sparsity_level: float) -> list[torch.Tensor]:
    """One threshold over several weights: keep all but the ``round(level * total)`` smallest ``|w|``.

    The zeros are those of ``torch.nn.utils.prune.global_unstructured`` with
    ``L1Unstructured`` on unpruned weights given in the same order.

    Example::

        >>> [k.tolist() for k in global_magnitude_keep([torch.tensor([1.0, 5.0]), torch.tensor([2.0, 3.0])], 0.5)]
        [[False, True], [False, True]]
    """
    scores = torch.cat([w.detach().abs().reshape(-1) for w in weights])
    k = round(validate_level(sparsity_level) * scores.numel())
    keep = _keep_all_but_smallest(scores, k)
    return [part.reshape(w.shape) for part, w in zip(keep.split([w.numel() for w in weights]), weights)]


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


def to_bool_mask(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """``mask`` as a bool tensor (``True`` = kept), the form fx_sparsity stores masks in.

    A bool tensor is returned as it is. A numeric one (a float mask of an older
    state dict, torch.ao.pruning's masks of the weight's dtype, a 0/1 int tensor)
    must hold only 0 and 1: any other value (0.5, NaN, ...) scaled the weight
    rather than masked it, and is refused instead of being silently rounded.
    Tensors on the meta device have no values to check and are converted as they are.

    Args:
        mask: the mask, of any real or bool dtype.
        name: what the error message calls it (``"mask of 'fc.weight'"``).

    Returns:
        A bool tensor of ``mask``'s shape and device (``mask`` itself when it is bool).

    Raises:
        TypeError: ``mask`` is not a real or bool tensor.
        ValueError: ``mask`` holds values other than 0 and 1.

    Example::

        >>> to_bool_mask(torch.tensor([0.0, 1.0, 1.0]))
        tensor([False,  True,  True])
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of 0/1 or bool values, got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex():
        raise TypeError(f"{name} must be a bool or real tensor of 0/1 values, got dtype {mask.dtype}")
    if mask.device.type != "meta":
        other = (mask != 0) & (mask != 1)  # NaN is caught too: it differs from both
        count = int(torch.count_nonzero(other))
        if count:
            example = mask[other].flatten()[0].item()
            raise ValueError(
                f"{name} must hold only 0 and 1 (or be a bool tensor), but {count} of its {mask.numel()} values "
                f"are not, e.g. {example!r}; masks keep or drop weights, they do not scale them: "
                "pass (mask != 0) to keep every nonzero entry"
            )
    return mask != 0
