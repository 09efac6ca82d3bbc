"""Packing dense weights into the formats of our C++ kernels, and unpacking them back.

Plain tensor code (no FX, no C++), testable alone; the kernels only read these buffers.

* ``bitmask``: ``(mask, values, row_offsets)``. ``mask`` is uint8 ``[rows,
  ceil(cols / 64) * 8]``: bit ``j % 8`` of byte ``j // 8`` of a row says whether
  weight ``(row, j)`` is nonzero (little-endian bit order, rows padded to 64-bit
  words). ``values`` holds the nonzeros row by row (1-D, the weight's dtype) and
  ``row_offsets`` (int64 ``[rows + 1]``) where each row starts. One bit plus the
  nonzeros per weight: 2.125 bytes per fp32 weight at 50% sparsity.
* ``nm`` (N:M, e.g. 2:4): the same bit mask, with exactly ``n`` values kept in every
  group of ``m`` columns (zeros kept where a group has fewer nonzeros), so
  ``values`` is ``[rows, cols * n // m]`` with a fixed row stride and no offsets.
  The mask is the per-group index: for 2:4 its 4 bits per group are as small
  as two 2-bit indices.
* ``csr``: ``(crow_indices, col_indices, values)`` with int32 row pointers and
  the narrowest column index that fits: int16 (read as unsigned, so up to
  65536 columns) else int32.

Example::

    >>> w = torch.tensor([[0.0, 2.0, 0.0, 3.0]])
    >>> mask, values, offsets = to_bitmask_components(w)
    >>> mask[0, 0].item(), values.tolist(), offsets.tolist()
    (10, [2.0, 3.0], [0, 2])
    >>> torch.equal(bitmask_to_dense(mask, values, offsets, 4), w)
    True
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = [
    "sparse_beta_silenced",
    "to_bitmask_components",
    "to_nm_components",
    "to_narrow_csr_components",
    "bitmask_to_dense",
    "nm_to_dense",
    "csr_to_dense",
    "detect_nm",
    "mask_bytes_per_row",
    "NM_GROUP_SIZES",
]

# Group sizes detect_nm tries, smallest first.
NM_GROUP_SIZES = (4, 8, 16)
_BIT_WEIGHTS = 1 << torch.arange(8, dtype=torch.int32)


def _check_2d(weight: Tensor) -> None:
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.layout != torch.strided:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"expected a 2-D strided weight tensor, got {shape}")


def mask_bytes_per_row(cols: int) -> int:
    """Bytes of one row of a packed bit mask: ``cols`` bits rounded up to 64-bit words."""
    return (cols + 63) // 64 * 8


def _pack_bits(keep: Tensor) -> Tensor:
    rows, cols = keep.shape
    padded = torch.zeros(rows, mask_bytes_per_row(cols) * 8, dtype=torch.int32)
    padded[:, :cols] = keep
    return (padded.view(rows, -1, 8) * _BIT_WEIGHTS).sum(-1).to(torch.uint8)


def _unpack_bits(mask: Tensor, cols: int) -> Tensor:
    bits = (mask.to(torch.int32).unsqueeze(-1) & _BIT_WEIGHTS.to(mask.device)) != 0
    return bits.flatten(1)[:, :cols]


def to_bitmask_components(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(mask, values, row_offsets)`` of a dense 2-D weight (see the module docstring).

    Args:
        weight: 2-D dense tensor; its zeros are dropped.

    Returns:
        uint8 bit mask ``[rows, ceil(cols / 64) * 8]``, the nonzeros (1-D, ``weight.dtype``),
        int64 row offsets ``[rows + 1]``.

    Example::

        >>> mask, values, offsets = to_bitmask_components(torch.eye(3))
        >>> mask.shape, values.tolist(), offsets.tolist()
        (torch.Size([3, 8]), [1.0, 1.0, 1.0], [0, 1, 2, 3])
    """
    _check_2d(weight)
    w = weight.detach().cpu()
    keep = w != 0
    offsets = torch.zeros(w.shape[0] + 1, dtype=torch.int64)
    torch.cumsum(keep.sum(1), 0, out=offsets[1:])
    return _pack_bits(keep).to(weight.device), w[keep].to(weight.device), offsets.to(weight.device)


def bitmask_to_dense(mask: Tensor, values: Tensor, row_offsets: Tensor, cols: int) -> Tensor:
    """The dense ``[rows, cols]`` weight of bitmask components (the reference the kernels are tested against)."""
    keep = _unpack_bits(mask, cols)
    return torch.zeros(keep.shape, dtype=values.dtype, device=values.device).masked_scatter_(
        keep, values[: int(row_offsets[-1])]
    )


def detect_nm(weight: Tensor) -> tuple[int, int] | None:
    """The N:M pattern of a 2-D weight: the ``(n, m)`` with the smallest ``n / m`` at most 1/2.

    Groups are ``m`` consecutive columns of a row (``m`` from :data:`NM_GROUP_SIZES`
    dividing the column count); ``n`` is the most nonzeros any group holds. Ties go
    to the smaller ``m``. ``None`` when no group size gives ``n / m <= 1/2``.

    Example::

        >>> detect_nm(torch.tensor([[1.0, 0.0, 0.0, 2.0, 0.0, 3.0, 4.0, 0.0]]))
        (2, 4)
    """
    _check_2d(weight)
    rows, cols = weight.shape
    best = None
    for m in NM_GROUP_SIZES:
        if cols % m or cols == 0:
            continue
        n = int((weight != 0).view(rows, cols // m, m).sum(-1).max()) if rows else 0
        n = max(n, 1)
        if 2 * n <= m and (best is None or n * best[1] < best[0] * m):
            best = (n, m)
    return best


def to_nm_components(weight: Tensor, n: int, m: int) -> tuple[Tensor, Tensor]:
    """``(mask, values)`` of an N:M weight: at most ``n`` nonzeros in every ``m`` consecutive columns.

    Args:
        weight: 2-D dense tensor whose column count is a multiple of ``m``.
        n, m: the pattern, ``1 <= n < m``.

    Returns:
        uint8 bit mask ``[rows, ceil(cols / 64) * 8]`` marking the stored positions and
        ``values`` ``[rows, cols * n // m]``.

    Raises:
        ValueError: bad ``n``/``m``, columns not a multiple of ``m``, or a group with
            more than ``n`` nonzeros (named by row and columns).

    Example::

        >>> mask, values = to_nm_components(torch.tensor([[0.0, 5.0, 0.0, 0.0]]), 2, 4)
        >>> mask[0, 0].item(), values.tolist()
        (3, [[0.0, 5.0]])
    """
    _check_2d(weight)
    if not (isinstance(n, int) and isinstance(m, int) and 1 <= n < m):
        raise ValueError(f"N:M needs integers 1 <= n < m, got n={n!r}, m={m!r}")
    rows, cols = weight.shape
    if cols % m:
        raise ValueError(f"N:M with m={m} needs a column count that is a multiple of {m}, got {cols}")
    w = weight.detach().cpu().view(rows, cols // m, m)
    nonzero = w != 0
    per_group = nonzero.sum(-1)
    if bool((per_group > n).any()):
        row, group = divmod(int((per_group > n).flatten().nonzero()[0]), cols // m)
        raise ValueError(
            f"the weight is not {n}:{m} sparse: row {row}, columns {m * group}..{m * group + m - 1} "
            f"hold {int(per_group[row, group])} nonzeros"
        )
    # Keep the nonzeros, then the first zero positions until each group has n entries:
    # a stable sort puts nonzeros (key 0) before zeros (key 1), each in column order.
    order = torch.sort((~nonzero).to(torch.int8), dim=-1, stable=True).indices[..., :n]
    keep = torch.zeros_like(nonzero).scatter_(-1, order, True)
    values = w[keep].view(rows, cols // m * n)
    return _pack_bits(keep.view(rows, cols)).to(weight.device), values.to(weight.device)


def nm_to_dense(mask: Tensor, values: Tensor, cols: int) -> Tensor:
    """The dense ``[rows, cols]`` weight of N:M components."""
    keep = _unpack_bits(mask, cols)
    return torch.zeros(keep.shape, dtype=values.dtype, device=values.device).masked_scatter_(keep, values)


def to_narrow_csr_components(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(crow_indices, col_indices, values)``: int32 row pointers, int16 column indices (read as
    unsigned) when the weight has at most 65536 columns, else int32.

    Raises:
        ValueError: more nonzeros than int32 row pointers can count.

    Example::

        >>> crow, col, values = to_narrow_csr_components(torch.eye(3))
        >>> crow.tolist(), col.dtype, values.tolist()
        ([0, 1, 2, 3], torch.int16, [1.0, 1.0, 1.0])
    """
    _check_2d(weight)
    with sparse_beta_silenced():
        csr = weight.detach().to_sparse_csr()
    crow, col = csr.crow_indices(), csr.col_indices()
    if crow.numel() and int(crow[-1]) > torch.iinfo(torch.int32).max:
        raise ValueError(f"the weight has {int(crow[-1])} nonzeros, more than int32 row pointers can count")
    if weight.shape[1] <= 1 << 16:
        col = col.to(torch.int32).to(torch.int16)  # 32768..65535 wrap to negative: read as unsigned
    return crow.to(torch.int32), col.to(torch.int32) if col.dtype != torch.int16 else col, csr.values().clone()


@contextlib.contextmanager
def sparse_beta_silenced() -> Iterator[None]:
    """Silence torch's "Sparse CSR tensor support is in beta" warning inside the block only.

    Packing and the MKL paths build sparse-layout tensors internally; the user never
    sees one, so the warning would only confuse. Nothing is filtered outside the block
    (no process-wide filter at import).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        yield


def _wide_indices(col_indices: Tensor) -> Tensor:
    """int64 column indices of int16 (unsigned) or int32 ``col_indices``."""
    wide = col_indices.to(torch.int64)
    return wide & 0xFFFF if col_indices.dtype == torch.int16 else wide


def csr_to_dense(crow_indices: Tensor, col_indices: Tensor, values: Tensor, cols: int) -> Tensor:
    """The dense ``[rows, cols]`` weight of CSR components with int16 (unsigned) or int32 column indices."""
    with sparse_beta_silenced():
        return torch.sparse_csr_tensor(
            crow_indices.to(torch.int64), _wide_indices(col_indices), values, (crow_indices.numel() - 1, cols),
            check_invariants=False,
        ).to_dense()
