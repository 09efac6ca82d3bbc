"""SparseGPT math (Frantar & Alistarh 2023): pure tensor code, no FX.

One-shot pruning of a layer ``y = x W^T`` that keeps its outputs on calibration
data: choose which weights to drop and move the error of dropping them onto
the weights that stay, one column at a time, with the optimal-brain-surgeon
update. All it needs of the data is the input Hessian ``H = X^T X``, where the
rows of ``X`` are what the weight's ``[out, in * kernel]`` view multiplies (a
conv's input unfolded into patches, see :func:`passes.calibration.input_rows`).

:func:`sparsegpt_prune` follows ``fasterprune`` of the reference implementation
(IST-DASLab/sparsegpt ``sparsegpt.py``): dead inputs (``H_ii == 0``) get their
weights zeroed and ``H_ii = 1``; ``H`` is damped by ``dampening * mean(diag H)``;
the upper Cholesky factor ``U`` of ``H^-1`` gives, row by row, what each column's
OBS update needs; columns are processed in blocks of ``block_size`` with the
updates of a block applied to the later columns at once. Unstructured masks are
chosen per block (the ``round(level * block.numel())`` entries of smallest
``w^2 / U_jj^2`` in the block, all rows together: the "adaptive mask selection"
of the paper); N:M masks per group of ``m`` columns, each row dropping its
``m - n`` smallest scores when the group's first column is reached.

Differences from the reference, on purpose: the unstructured block mask drops
exactly ``round(level * numel)`` entries (the reference's ``<=`` threshold drops
one more, more on ties); ``n`` of ``nm=(n, m)`` is the number *kept*, as
everywhere in fx_sparsity; the Hessian is accumulated in float64 and factorised
in float64 (the column loop runs in float32, as the reference's does); a
Hessian that is not positive definite after damping (non-finite inputs) raises
``ValueError`` instead of producing NaNs; grouped convs are pruned group by
group, each with the Hessian of the input channels it reads.
"""

from __future__ import annotations

import math

import torch

from fx_sparsity.sparsifier.mask_utils import smallest_k_mask, validate_level
from fx_sparsity.sparsifier.nm.masks import validate_nm

__all__ = ["sparsegpt_prune", "validate_block_size"]


def validate_block_size(block_size: object, nm: tuple[int, int] | None = None) -> int:
    """``block_size`` as a positive int (a multiple of ``m`` for N:M), or a ``TypeError``/``ValueError``."""
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be a positive int, got {block_size!r}")
    if block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size}")
    if nm is not None and block_size % nm[1]:
        raise ValueError(
            f"block_size={block_size} must be a multiple of m={nm[1]} for N:M sparsity, so that "
            f"groups of {nm[1]} columns never straddle two blocks (e.g. block_size=128)"
        )
    return block_size


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity_level: float = 0.5,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    dampening: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` and update the weights it keeps to preserve ``x W^T`` (SparseGPT).

    Args:
        weight: ``[out, in]`` or a conv weight ``[out, in / groups, *kernel]``.
        hessian: ``X^T X`` of the rows :func:`input_rows` gives: ``[columns, columns]``
            or ``[groups, columns, columns]``, ``columns = weight[0].numel()``.
        sparsity_level: fraction of each block of columns to prune (unstructured).
        nm: ``(n, m)``: keep ``n`` of every ``m`` consecutive weights of a row
            instead; then ``sparsity_level`` is not used.
        block_size: columns per block (a multiple of ``m`` for N:M).
        dampening: added to the Hessian's diagonal, as a fraction of its mean.

    Returns:
        ``(new_weight, keep)``: the updated weight (zeros where pruned, same
        shape and dtype) and the boolean mask (``True`` = kept).

    Raises:
        ValueError: bad arguments, a Hessian of the wrong shape or with
            non-finite entries, or one that stays singular after damping.

    Example::

        >>> x = torch.randn(256, 16)
        >>> w, keep = sparsegpt_prune(torch.randn(8, 16), x.T.double() @ x.double(), 0.5)
        >>> keep.float().mean().item(), bool((w[~keep] == 0).all())
        (0.5, True)
    """
    level = validate_level(sparsity_level)
    if nm is not None:
        nm = validate_nm(*nm)
    validate_block_size(block_size, nm)
    if isinstance(dampening, bool) or not isinstance(dampening, (int, float)) or not 0 <= dampening < math.inf:
        raise ValueError(f"dampening must be a finite number >= 0 (a fraction of the mean of diag H), got {dampening!r}")
    out = weight.shape[0]
    matrix = weight.detach().reshape(out, -1)
    columns = matrix.shape[1]
    h = hessian.detach().double()
    if h.dim() == 2:
        h = h.unsqueeze(0)
    groups = h.shape[0]
    if h.dim() != 3 or h.shape[1:] != (columns, columns) or out % groups:
        raise ValueError(
            f"hessian of shape {tuple(hessian.shape)} does not fit weight {tuple(weight.shape)}: expected "
            f"[{columns}, {columns}] or [groups, {columns}, {columns}] with groups dividing {out}"
        )
    if not torch.isfinite(h).all():
        raise ValueError("hessian has non-finite entries: the calibration inputs held inf or NaN")
    per_group = out // groups
    new, keep = torch.empty_like(matrix), torch.empty(matrix.shape, dtype=torch.bool, device=matrix.device)
    with torch.no_grad():
        for g in range(groups):
            rows = slice(g * per_group, (g + 1) * per_group)
            new[rows], keep[rows] = _prune_rows(matrix[rows], h[g], level, nm, block_size, float(dampening))
    return new.reshape(weight.shape), keep.reshape(weight.shape)


def _inverse_hessian_factor(h: torch.Tensor, dampening: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dead columns and the upper Cholesky factor of the damped ``H^-1`` (float64)."""
    h = h.clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(dampening * h.diagonal().mean())
    lower, info = torch.linalg.cholesky_ex(h)
    if info.item() == 0:
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    if info.item() != 0:
        raise ValueError(
            f"the damped input Hessian is not positive definite (dampening={dampening}): the inputs are "
            "degenerate or too large for float64; raise dampening (e.g. 0.1)"
        )
    return dead, upper


def _prune_rows(
    w: torch.Tensor, h: torch.Tensor, level: float, nm: tuple[int, int] | None, block_size: int, dampening: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``fasterprune`` on one ``[rows, columns]`` matrix with its ``[columns, columns]`` Hessian."""
    dtype = w.dtype
    w = w.float().clone()
    dead, hinv = _inverse_hessian_factor(h, dampening)
    hinv = hinv.to(w.dtype)
    w[:, dead] = 0
    pruned = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
    columns = w.shape[1]
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        w1 = w[:, i1:i2].clone()
        hinv1 = hinv[i1:i2, i1:i2]
        d = hinv1.diagonal()
        err1 = torch.zeros_like(w1)
        mask1 = pruned[:, i1:i2]
        if nm is None:
            score = (w1.square() / d.square()).reshape(-1)
            mask1.copy_(smallest_k_mask(score, round(level * score.numel())).view_as(w1))
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                score = w1[:, i : i + m].square() / d[i : i + m].square()
                drop = score.shape[1] - n
                if drop > 0:
                    mask1[:, i : i + m].scatter_(1, torch.topk(score, drop, dim=1, largest=False).indices, True)
            col = w1[:, i]
            err = torch.where(mask1[:, i], col, torch.zeros_like(col)) / d[i]
            # The OBS update of the block's later columns; this column becomes exactly 0 where pruned.
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            w1[mask1[:, i], i] = 0
            err1[:, i] = err
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w.to(dtype), ~pruned
