"""Mask math every sparsifier shares: pure tensor code, no FX, testable and benchmarkable alone.

Speed comes from never sorting: the ``k`` lowest scores are found with a threshold
(see :func:`smallest_k_mask`) instead of ``topk(sorted=True)``; where several scores tie at
the cut, the same ``topk`` torch.ao.pruning calls decides, so masks stay bit-identical.
"""

from __future__ import annotations

import math

import torch

__all__ = ["smallest_k_mask", "validate_level", "as_mask", "to_bool_mask"]


# Below this many scores a plain topk is as fast as anything else.
_TOPK_CUTOFF = 1 << 16

_SAMPLE_SIZE = 1 << 16


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


def validate_level(level: object, name: str = "sparsity_level") -> float:
    """``level`` as a float in [0, 1], or a ``TypeError``/``ValueError`` naming it."""
    if isinstance(level, bool) or not isinstance(level, (int, float)):
        raise TypeError(f"{name} must be a number in [0, 1], got {level!r}")
    if not 0.0 <= level <= 1.0:  # False for NaN too
        raise ValueError(f"{name} must be in [0, 1], got {level!r}")
    return float(level)


def as_mask(mask: torch.Tensor, dtype: torch.dtype, name: str = "mask") -> torch.Tensor:
    """``mask`` as a mask of ``dtype``, checked first: what a mask buffer of that dtype may hold.

    A bool mask keeps (``True``) or drops weights, so a numeric ``mask`` converted to bool must
    hold only 0 and 1: any other value (0.5, NaN, ...) would scale the weight, and is refused
    instead of being silently rounded. A floating mask multiplies the weight as in
    torch.ao.pruning, so any finite value is kept as it is (torch.ao's own tests load masks of
    ``arange`` values); NaN and infinities are refused. Tensors on the meta device have no values
    to check and are converted as they are.

    Args:
        mask: the mask, of any real or bool dtype.
        dtype: the dtype of the buffer it goes to: ``torch.bool`` or a floating dtype.
        name: what the error message calls it (``"mask of 'fc.weight'"``).

    Returns:
        A tensor of ``mask``'s shape and device and of ``dtype`` (``mask`` itself when it has that dtype).

    Raises:
        TypeError: ``mask`` is not a real or bool tensor.
        ValueError: ``mask`` holds values ``dtype`` cannot hold as a mask.

    Example::

        >>> as_mask(torch.tensor([0.0, 1.0, 1.0]), torch.bool)
        tensor([False,  True,  True])
        >>> as_mask(torch.arange(3), torch.float32)
        tensor([0., 1., 2.])
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of 0/1 or bool values, got {type(mask).__name__}")
    if mask.is_complex():
        raise TypeError(f"{name} must be a bool or real tensor, got dtype {mask.dtype}")
    if mask.dtype == dtype:
        bad = None if dtype == torch.bool or mask.device.type == "meta" else ~torch.isfinite(mask)
    elif mask.device.type == "meta" or mask.dtype == torch.bool:
        bad = None
    elif dtype == torch.bool:
        bad = (mask != 0) & (mask != 1)  # NaN is caught too: it differs from both
    else:
        bad = ~torch.isfinite(mask)
    count = 0 if bad is None else int(torch.count_nonzero(bad))
    if count:
        example = mask[bad].flatten()[0].item()
        if dtype == torch.bool:
            raise ValueError(
                f"{name} must hold only 0 and 1 (or be a bool tensor) for a bool mask, but {count} of its "
                f"{mask.numel()} values are not, e.g. {example!r}; bool masks keep or drop weights, they do not "
                "scale them: pass (mask != 0) to keep every nonzero entry, or prepare with masks of the weight's dtype"
            )
        raise ValueError(
            f"{name} must hold finite values, but {count} of its {mask.numel()} values are not, e.g. {example!r}"
        )
    if mask.dtype == dtype:
        return mask
    return mask != 0 if dtype == torch.bool else mask.to(dtype)


def to_bool_mask(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """:func:`as_mask` to ``torch.bool``: a bool tensor of ``mask``'s shape (``mask`` itself when it is bool), for
    a mask holding only 0 and 1.

    Example::

        >>> to_bool_mask(torch.tensor([0.0, 1.0, 1.0]))
        tensor([False,  True,  True])
    """
    return as_mask(mask, torch.bool, name)
