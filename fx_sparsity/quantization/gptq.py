"""GPTQ (Frantar et al. 2023): quantization with error compensation from input Hessians, pure tensor code.

Quantizing a layer ``y = x W^T`` one column at a time, the error of each column is moved onto the
columns not yet quantized with the optimal-brain-surgeon update, so the outputs on calibration data
stay close; all it needs of the data is the input Hessian ``H = X^T X`` of the rows the weight's
``[out, in * kernel]`` view multiplies (:func:`passes.calibration.input_rows`), as SparseGPT.

:func:`gptq_quantize` follows ``fasterquant`` of IST-DASLab/gptq (``gptq.py``): dead inputs
(``H_ii == 0``) get their weights zeroed and ``H_ii = 1``; ``H`` is damped by ``dampening * mean(diag H)``;
the upper Cholesky factor ``U`` of ``H^-1`` (float64, as :mod:`fx_sparsity.sparsifier.sparsegpt.obs`)
gives each column's update; columns run in blocks of ``block_size``, the updates of a block applied to
the later columns at once (the column loop runs in float32, as the reference's). Per-channel (int8)
scales are computed before the first column; an int4 group's scales when its first column is reached,
on the weights updated so far (the reference's ``groupsize``).

With a ``mask`` (a Wanda, magnitude or any other sparsity mask), the masked entries are quantized to
exactly zero and kept there: they start at zero (the weight is taken as ``weight * mask``), the OBS
updates of earlier columns move them, and when their column is reached they are set back to zero,
that error compensated on the later columns like a quantization error (SparseGPT's rule for pruned
weights, with the mask given instead of chosen; IST-DASLab/sparsegpt's ``fasterprune`` with a given
mask does the same). Holding them at zero throughout instead (the updates never reaching them) would
drop the compensation the updates put there: its output error on calibration data is higher. The mask
is the same after; the kept entries end on the grid; the scales are those of the kept entries (masked
ones count as zero).

Differences from the reference, on purpose: a group's scales are computed on the weights updated by
*every* earlier column, which needs ``block_size`` to be a multiple of the group size (the reference
reads the block's columns before the updates of the same block's earlier columns, so its groups smaller
than ``block_size`` see stale weights); the grids are those of :mod:`.spec` (restricted symmetric ones);
int8 scales are computed after the weights of dead inputs are zeroed (the reference: before, on weights
it then zeroes); no activation order (``actorder``) or static groups; a Hessian that stays singular
after damping raises ``ValueError`` instead of producing NaNs; grouped convs are quantized group by group, each with the
Hessian of the input channels it reads.
"""

from __future__ import annotations

import math

import torch

from fx_sparsity.quantization.rtn import from_grid, grid_params, keep_matrix, round_to_grid, weight_matrix
from fx_sparsity.quantization.spec import QuantizedWeight, QuantSpec, SpecLike, as_spec, check_fits

__all__ = [
    "gptq_quantize",
    "inverse_hessian_factor",
    "check_dampening",
    "check_quant_block_size",
    "rows_hessians",
]


def check_dampening(dampening: object, name: str = "dampening") -> float:
    """``dampening`` as a float, or a ``ValueError``: a finite number >= 0 (a fraction of the mean of diag H)."""
    if isinstance(dampening, bool) or not isinstance(dampening, (int, float)) or not 0 <= dampening < math.inf:
        raise ValueError(
            f"{name} must be a finite number >= 0 (a fraction of the mean of diag H, e.g. 0.01), got {dampening!r}"
        )
    return float(dampening)


def check_quant_block_size(block_size: object, spec: QuantSpec, name: str = "block_size") -> int:
    """``block_size`` as a positive int, a multiple of ``spec``'s group size; else a ``TypeError``/``ValueError``."""
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"{name} must be a positive int, got {block_size!r}")
    if block_size < 1:
        raise ValueError(f"{name} must be a positive int, got {block_size}")
    group = spec.group_size
    if group is not None and block_size % group:
        raise ValueError(
            f"{name}={block_size} must be a multiple of the group size {group} of {spec}, so that a group's scales "
            "are computed on the weights every earlier column updated (e.g. block_size=128)"
        )
    return block_size


def rows_hessians(weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """``hessian`` as ``[groups, columns, columns]`` float64 for ``weight`` (``groups`` dividing its rows), checked.

    Raises:
        ValueError: the Hessian does not fit the weight, or has non-finite entries.
    """
    out, columns = weight.shape[0], math.prod(weight.shape[1:])
    if not isinstance(hessian, torch.Tensor):
        raise TypeError(f"hessian must be a tensor, got {type(hessian).__name__}")
    h = hessian.detach().double()
    if h.dim() == 2:
        h = h.unsqueeze(0)
    if h.dim() != 3 or h.shape[1:] != (columns, columns) or out % h.shape[0]:
        raise ValueError(
            f"hessian of shape {tuple(hessian.shape)} does not fit weight {tuple(weight.shape)}: expected "
            f"[{columns}, {columns}] or [groups, {columns}, {columns}] with groups dividing {out}"
        )
    if not torch.isfinite(h).all():
        raise ValueError("hessian has non-finite entries: the calibration inputs held inf or NaN")
    return h


def inverse_hessian_factor(
    h: torch.Tensor, dampening: float, *, overwrite: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dead columns (``H_ii == 0``) and the upper Cholesky factor of the damped ``H^-1`` (float64).

    Dead columns get ``H_ii = 1``; the diagonal is raised by ``dampening * mean(diag H)``. With
    ``overwrite``, ``h``'s own memory is damped and factorised (its values are lost: for a caller that
    drops it afterwards), one ``[columns, columns]`` buffer fewer; the result is the same.

    Raises:
        ValueError: the damped Hessian is not positive definite.

    Example::

        >>> from fx_sparsity.quantization.gptq import inverse_hessian_factor
        >>> dead, upper = inverse_hessian_factor(torch.diag(torch.tensor([4.0, 0.0], dtype=torch.float64)), 0.0)
        >>> dead.tolist(), upper.diagonal().tolist()
        ([False, True], [0.5, 1.0])
    """
    if not overwrite:
        h = h.clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(dampening * h.diagonal().mean())
    # Two [columns, columns] buffers (h, or a copy, and one more), each result written over the one it no longer needs:
    # a 2752-wide float64 Hessian is 58 MiB, and a block streamed from disk holds a few of them.
    lower, info = torch.linalg.cholesky_ex(h)
    if info.item() == 0:
        inverse = torch.cholesky_inverse(lower, out=h)
        upper, info = torch.linalg.cholesky_ex(inverse, upper=True, out=(lower, info))
    if info.item() != 0:
        raise ValueError(
            f"the damped input Hessian is not positive definite (dampening={dampening}): the inputs are "
            "degenerate or too large for float64; raise dampening (e.g. 0.1)"
        )
    return dead, upper


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: SpecLike,
    mask: torch.Tensor | None = None,
    block_size: int = 128,
    dampening: float = 0.01,
    *,
    overwrite_hessian: bool = False,
) -> QuantizedWeight:
    """Quantize ``weight`` column by column, moving each column's error onto the later ones (GPTQ).

    Args:
        weight: ``[out, in]`` or a conv weight ``[out, in / groups, *kernel]``.
        hessian: ``X^T X`` of the rows :func:`passes.calibration.input_rows` gives: ``[columns, columns]``
            or ``[groups, columns, columns]`` (a grouped conv), ``columns = weight[0].numel()``.
        spec: a :class:`QuantSpec` or its name (``"int8"``, ``"int4-g128"``, ``"int4-g64-zp"``, ...).
        mask: optional, of ``weight``'s shape, nonzero/``True`` = kept: masked entries end exactly zero
            (see the module docstring); the weight is taken as ``weight * mask``.
        block_size: columns per block of lazy updates (a multiple of the int4 group size).
        dampening: added to the Hessian's diagonal, as a fraction of its mean.
        overwrite_hessian: factorise a float64 ``hessian`` in its own memory (its values are lost; the
            result is the same): one ``[columns, columns]`` float64 buffer fewer, for a caller that drops it.

    Returns:
        The :class:`QuantizedWeight`; :func:`fx_sparsity.quantization.dequantize` gives the updated weight.

    Raises:
        TypeError / ValueError: bad arguments, a Hessian that does not fit or has non-finite entries or
            stays singular after damping, non-finite weights, columns the int4 groups do not tile.

    Example::

        >>> from fx_sparsity.quantization import dequantize, gptq_quantize, quantize_weight
        >>> x, w = torch.randn(256, 64), torch.randn(16, 64)
        >>> q = gptq_quantize(w, x.T.double() @ x.double(), "int4-g32")
        >>> error = lambda v: (x @ (v - w).T).square().sum().item()
        >>> error(dequantize(q)) < error(dequantize(quantize_weight(w, "int4-g32")))   # better than RTN
        True
    """
    spec = as_spec(spec)
    matrix = weight_matrix(weight, "weight")
    check_fits(spec, tuple(weight.shape), "weight")
    check_quant_block_size(block_size, spec)
    dampening = check_dampening(dampening)
    h = rows_hessians(weight, hessian)
    keep = None if mask is None else keep_matrix(mask, weight)
    out, columns = matrix.shape
    per_group = out // h.shape[0]
    size = spec.group_columns(columns)
    values = torch.empty(matrix.shape, dtype=torch.int8, device=matrix.device)
    scales = torch.empty(out, columns // size, dtype=torch.float32, device=matrix.device)
    zeros = torch.empty_like(scales) if spec.zero_point else None
    with torch.no_grad():
        for g in range(h.shape[0]):
            rows = slice(g * per_group, (g + 1) * per_group)
            kept = None if keep is None else keep[rows]
            q, s, z = _quantize_rows(matrix[rows], h[g], kept, spec, block_size, dampening, overwrite_hessian)
            values[rows], scales[rows] = q.to(torch.int8), s
            if zeros is not None:
                zeros[rows] = z
    return QuantizedWeight(
        values.reshape(weight.shape),
        scales if spec.group_size is not None else scales[:, 0],
        None if zeros is None else zeros.to(torch.int8),
        spec,
    )


def _quantize_rows(
    w: torch.Tensor,
    h: torch.Tensor,
    keep: torch.Tensor | None,
    spec: QuantSpec,
    block_size: int,
    dampening: float,
    overwrite_hessian: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``fasterquant`` on one ``[rows, columns]`` matrix: grid values, scales and zero points (float32)."""
    w = w.float().clone()
    if keep is not None:
        w[~keep] = 0
    dead, hinv = _factor(h, dampening, overwrite_hessian)
    w[:, dead] = 0
    rows, columns = w.shape
    size = spec.group_columns(columns)
    q = torch.empty_like(w)
    scales = torch.empty(rows, columns // size, dtype=torch.float32, device=w.device)
    zeros = torch.empty_like(scales) if spec.zero_point else None
    if spec.group_size is None:  # one scale per row, from the weight before any update
        scales[:, 0], z = grid_params(w, spec)
        if zeros is not None:
            zeros[:, 0] = z
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        w1 = w[:, i1:i2].clone()
        hinv1 = hinv[i1:i2, i1:i2]
        d = hinv1.diagonal()
        err1 = torch.zeros_like(w1)
        keep1 = None if keep is None else keep[:, i1:i2]
        for i in range(i2 - i1):
            column = i1 + i
            group = column // size
            if spec.group_size is not None and column % size == 0:  # the group's scales, on the updated weights
                current = w1[:, i : i + size]
                if keep1 is not None:
                    current = torch.where(keep1[:, i : i + size], current, 0.0)
                scales[:, group], z = grid_params(current, spec)
                if zeros is not None:
                    zeros[:, group] = z
            scale, zero = scales[:, group], None if zeros is None else zeros[:, group]
            col = w1[:, i]
            qc = round_to_grid(col, scale, zero, spec)
            if keep1 is not None:
                qc = torch.where(keep1[:, i], qc, 0.0 if zero is None else zero)
            target = from_grid(qc, scale, zero)
            err = (col - target) / d[i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            w1[:, i] = target  # exactly on the grid (the update left it there up to rounding)
            q[:, column] = qc
            err1[:, i] = err
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q, scales, zeros


def _factor(h: torch.Tensor, dampening: float, overwrite: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dead, upper = inverse_hessian_factor(h, dampening, overwrite=overwrite)
    return dead, upper.float()
