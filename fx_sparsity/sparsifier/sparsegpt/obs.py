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

import torch

from fx_sparsity.quantization.gptq import (
    check_dampening,
    check_quant_block_size,
    inverse_hessian_factor,
    rows_hessians,
)
from fx_sparsity.quantization.rtn import from_grid, grid_params, round_to_grid, weight_matrix
from fx_sparsity.quantization.spec import QuantizedWeight, QuantSpec, SpecLike, as_spec, check_fits
from fx_sparsity.sparsifier.mask_utils import smallest_k_mask, validate_level
from fx_sparsity.sparsifier.nm.masks import validate_nm

__all__ = ["sparsegpt_prune", "sparsegpt_quantize", "validate_block_size"]


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
    *,
    overwrite_hessian: bool = False,
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
        overwrite_hessian: factorise a float64 ``hessian`` in its own memory (its values are lost; the
            result is the same): one ``[columns, columns]`` float64 buffer fewer, for a caller that drops it.

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
    level, nm, dampening = _check(sparsity_level, nm, block_size, dampening)
    h = rows_hessians(weight, hessian)
    out = weight.shape[0]
    matrix = weight.detach().reshape(out, -1)
    per_group = out // h.shape[0]
    if h.shape[0] == 1:  # a Linear's: _prune_rows' own copy is the result (no third copy of the weight beside it)
        with torch.no_grad():
            w, pruned, _ = _prune_rows(matrix, h[0], level, nm, block_size, dampening, None, overwrite_hessian)
        return w.to(matrix.dtype).reshape(weight.shape), (~pruned).reshape(weight.shape)
    new, keep = torch.empty_like(matrix), torch.empty(matrix.shape, dtype=torch.bool, device=matrix.device)
    with torch.no_grad():
        for g in range(h.shape[0]):
            rows = slice(g * per_group, (g + 1) * per_group)
            w, pruned, _ = _prune_rows(matrix[rows], h[g], level, nm, block_size, dampening, None, overwrite_hessian)
            new[rows], keep[rows] = w.to(matrix.dtype), ~pruned
    return new.reshape(weight.shape), keep.reshape(weight.shape)


def sparsegpt_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: SpecLike,
    sparsity_level: float = 0.5,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    dampening: float = 0.01,
    *,
    overwrite_hessian: bool = False,
) -> tuple[QuantizedWeight, torch.Tensor]:
    """Prune and quantize ``weight`` in one pass over its columns (the SparseGPT paper's joint mode).

    :func:`sparsegpt_prune`'s column loop, where each column, once its pruned entries are chosen, is
    also rounded to ``spec``'s grid: the pruned entries to exactly 0, the kept ones to the nearest grid
    point, and the OBS update of the later columns covers both errors (IST-DASLab/sparsegpt's
    ``fasterprune`` with a ``quantizer``). Scales: int8's (one per output channel) are computed before
    the first column, on the weight as it enters (``weight * mask``, as the reference computes them on
    the dense weight); an int4 group's when its first column is reached, on the weights updated so far,
    the entries already chosen for pruning counting as zero (for unstructured masks every pruned entry
    of the group, since a block's mask is chosen when the block starts; for N:M those of the group's
    first ``m`` columns).

    Args:
        weight, hessian, sparsity_level, nm, block_size, dampening, overwrite_hessian: as :func:`sparsegpt_prune`;
            ``block_size`` must also be a multiple of the int4 group size.
        spec: a :class:`~fx_sparsity.quantization.QuantSpec` or its name (``"int8"``, ``"int4-g128"``, ...).

    Returns:
        ``(quantized, keep)``: the :class:`~fx_sparsity.quantization.QuantizedWeight` (values 0, or the
        zero point, where pruned; :func:`~fx_sparsity.quantization.dequantize` gives the updated weight,
        exactly zero where pruned) and the boolean mask (``True`` = kept).

    Raises:
        TypeError / ValueError: as :func:`sparsegpt_prune`, and a bad spec, non-finite weights, or
            columns the int4 groups do not tile.

    Example::

        >>> from fx_sparsity.quantization import dequantize
        >>> x = torch.randn(256, 64)
        >>> q, keep = sparsegpt_quantize(torch.randn(8, 64), x.T.double() @ x.double(), "int4-g32", 0.5)
        >>> keep.float().mean().item(), bool((dequantize(q)[~keep] == 0).all()), q.values.dtype
        (0.5, True, torch.int8)
    """
    spec = as_spec(spec)
    level, nm, dampening = _check(sparsity_level, nm, block_size, dampening)
    check_quant_block_size(block_size, spec)
    matrix = weight_matrix(weight, "weight")
    check_fits(spec, tuple(weight.shape), "weight")
    h = rows_hessians(weight, hessian)
    out, columns = matrix.shape
    per_group = out // h.shape[0]
    size = spec.group_columns(columns)
    values = torch.empty(matrix.shape, dtype=torch.int8, device=matrix.device)
    keep = torch.empty(matrix.shape, dtype=torch.bool, device=matrix.device)
    scales = torch.empty(out, columns // size, dtype=torch.float32, device=matrix.device)
    zeros = torch.empty_like(scales) if spec.zero_point else None
    with torch.no_grad():
        for g in range(h.shape[0]):
            rows = slice(g * per_group, (g + 1) * per_group)
            _, pruned, (q, s, z) = _prune_rows(
                matrix[rows], h[g], level, nm, block_size, dampening, spec, overwrite_hessian
            )
            values[rows], keep[rows], scales[rows] = q.to(torch.int8), ~pruned, s
            if zeros is not None:
                zeros[rows] = z
    quantized = QuantizedWeight(
        values.reshape(weight.shape),
        scales if spec.group_size is not None else scales[:, 0],
        None if zeros is None else zeros.to(torch.int8),
        spec,
    )
    return quantized, keep.reshape(weight.shape)


def _check(
    sparsity_level: float, nm: tuple[int, int] | None, block_size: int, dampening: float
) -> tuple[float, tuple[int, int] | None, float]:
    level = validate_level(sparsity_level)
    if nm is not None:
        nm = validate_nm(*nm)
    validate_block_size(block_size, nm)
    return level, nm, check_dampening(dampening)


def _prune_rows(
    w: torch.Tensor,
    h: torch.Tensor,
    level: float,
    nm: tuple[int, int] | None,
    block_size: int,
    dampening: float,
    spec: QuantSpec | None,
    overwrite_hessian: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None]:
    """``fasterprune`` on one ``[rows, columns]`` matrix with its ``[columns, columns]`` Hessian: the float32
    weights, the pruned entries and, with a ``spec``, the grid values, scales and zero points."""
    w = w.float().clone()
    dead, hinv = inverse_hessian_factor(h, dampening, overwrite=overwrite_hessian)
    hinv = hinv.to(w.dtype)
    w[:, dead] = 0
    pruned = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
    rows, columns = w.shape
    grid = None
    if spec is not None:
        size = spec.group_columns(columns)
        q = torch.empty_like(w)
        scales = torch.empty(rows, columns // size, dtype=torch.float32, device=w.device)
        zeros = torch.empty_like(scales) if spec.zero_point else None
        grid = (q, scales, zeros)
        if spec.group_size is None:  # one scale per row, from the weight as it enters
            scales[:, 0], z = grid_params(w, spec)
            if zeros is not None:
                zeros[:, 0] = z
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
            if spec is None:
                target = torch.where(mask1[:, i], torch.zeros_like(col), col)
            else:
                target = _quantized_column(w1, mask1, i, i1 + i, spec, grid)
            err = (col - target) / d[i]
            # The OBS update of the block's later columns; this column becomes exactly its target.
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            if spec is None:
                w1[mask1[:, i], i] = 0
            else:
                w1[:, i] = target
            err1[:, i] = err
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w, pruned, grid


def _quantized_column(
    w1: torch.Tensor,
    mask1: torch.Tensor,
    i: int,
    column: int,
    spec: QuantSpec,
    grid: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
) -> torch.Tensor:
    """Column ``i`` of the block ``w1`` (``column`` of the weight) on the grid, 0 where pruned; records its values
    (and, at a group's first column, the group's scales from the updated weights, pruned entries as zero)."""
    q, scales, zeros = grid
    size = spec.group_columns(q.shape[1])
    group = column // size
    if spec.group_size is not None and column % size == 0:
        current = torch.where(mask1[:, i : i + size], 0.0, w1[:, i : i + size])
        scales[:, group], z = grid_params(current, spec)
        if zeros is not None:
            zeros[:, group] = z
    scale, zero = scales[:, group], None if zeros is None else zeros[:, group]
    qc = round_to_grid(w1[:, i], scale, zero, spec)
    qc = torch.where(mask1[:, i], 0.0 if zero is None else zero, qc)
    q[:, column] = qc
    return from_grid(qc, scale, zero)
