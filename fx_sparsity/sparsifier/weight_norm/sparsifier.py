"""``WeightNormSparsifier``: zero the blocks with the lowest norm (torch.ao.pruning semantics)."""

from __future__ import annotations

import math

from collections.abc import Mapping
from typing import Any

from torch import nn

from fx_sparsity.sparsifier.base import BaseSparsifier
from fx_sparsity.sparsifier.weight_norm.masks import NormFn, resolve_norm, validate_block, weight_norm_keep

__all__ = ["WeightNormSparsifier", "clamped_level"]


class WeightNormSparsifier(BaseSparsifier):
    r"""Zero out the sparse blocks with the lowest norm.

    ``sparsity_level`` is the fraction of blocks of ``sparse_block_shape``
    (rows, cols of the weight viewed as ``[out, -1]``) that are sparsified;
    in each of them the ``zeros_per_block`` smallest entries become zero
    (``None``: the whole block). Masks equal ``torch.ao.pruning``'s bit for bit
    on 2-D weights; Conv weights and shapes that blocks do not divide also work.
    Scores are taken on the weight as the model sees it (``weight * mask``),
    as torch.ao.pruning does, so pruned entries stay pruned.

    Args:
        sparsity_level: target fraction of sparse blocks, in [0, 1]; a level outside (a scheduler's 5.0, -1)
            is clamped to it when masks are computed, as torch.ao.pruning does, and kept as given in the group
            (NaN is refused). fx_sparsity's own sparsifiers refuse levels outside [0, 1] instead.
        sparse_block_shape: (rows, cols) of a block; ``(1, 4)`` with
            ``zeros_per_block=2`` and ``sparsity_level=1.0`` is 2:4 sparsity.
        zeros_per_block: zeros in each sparse block, 0 .. rows * cols;
            ``None`` (default) zeroes the whole block.
        norm: ``1`` (abs), ``2`` (square, the default) or a callable scoring each entry.

    All arguments but ``norm`` can be overridden per weight in the config.

    Example::

        >>> sparsifier = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
        >>> gm = sparsifier.prepare(nn.Sequential(nn.Linear(8, 8)), None)
        >>> sparsifier.step()
        >>> gm.get_buffer("0.weight_mask").mean().item()  # 1 = kept
        0.5
    """

    def __init__(
        self,
        sparsity_level: float = 0.5,
        sparse_block_shape: tuple[int, int] = (1, 4),
        zeros_per_block: int | None = None,
        norm: NormFn | int | None = None,
    ) -> None:
        self.norm_fn = resolve_norm(norm)
        defaults = {
            "sparsity_level": sparsity_level,
            "sparse_block_shape": sparse_block_shape,
            "zeros_per_block": zeros_per_block,
        }
        _validate(defaults)
        super().__init__(defaults=defaults)

    def validate_group(self, group: Mapping[str, Any], weight_shape: tuple[int, ...]) -> None:
        _validate(group, f" of {group['tensor_fqn']}")

    def target_sparsity(self, group: dict[str, Any]) -> float:
        """Fraction of zeros the group aims at: level (clamped) x zeros / block size."""
        block, zeros = validate_block(group["sparse_block_shape"], group["zeros_per_block"])
        return clamped_level(group["sparsity_level"]) * zeros / (block[0] * block[1])

    def update_mask(  # type: ignore[override]
        self,
        module: nn.Module,
        tensor_name: str,
        sparsity_level: float,
        sparse_block_shape: tuple[int, int],
        zeros_per_block: int | None,
        **kwargs: Any,
    ) -> None:
        keep = weight_norm_keep(
            self.masked_tensor(module, tensor_name),
            clamped_level(sparsity_level),
            sparse_block_shape,
            zeros_per_block,
            self.norm_fn,
        )
        self.get_mask(module, tensor_name).copy_(keep)


def clamped_level(level: object, name: str = "sparsity_level") -> float:
    """``level`` clamped to [0, 1], as torch.ao.pruning's WeightNormSparsifier clamps it (infinities too);
    a ``TypeError`` for a non-number and a ``ValueError`` for NaN, naming it.

    Example::

        >>> clamped_level(5.0), clamped_level(-1), clamped_level(float("inf")), clamped_level(0.3)
        (1.0, 0.0, 1.0, 0.3)
    """
    if isinstance(level, bool) or not isinstance(level, (int, float)):
        raise TypeError(f"{name} must be a number (clamped to [0, 1]), got {level!r}")
    if math.isnan(level):
        raise ValueError(f"{name} must be a number, got NaN")
    return min(max(float(level), 0.0), 1.0)


def _validate(args: Mapping[str, Any], where: str = "") -> None:
    clamped_level(args.get("sparsity_level"), f"sparsity_level{where}")
    validate_block(args.get("sparse_block_shape"), args.get("zeros_per_block"))
