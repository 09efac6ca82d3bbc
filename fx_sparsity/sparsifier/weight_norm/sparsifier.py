"""``WeightNormSparsifier``: zero the blocks with the lowest norm (torch.ao.pruning semantics)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from fx_sparsity.sparsifier.base import BaseSparsifier
from fx_sparsity.sparsifier.mask_utils import validate_level
from fx_sparsity.sparsifier.weight_norm.masks import NormFn, resolve_norm, validate_block, weight_norm_keep

__all__ = ["WeightNormSparsifier"]


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
        sparsity_level: target fraction of sparse blocks, in [0, 1].
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
        >>> gm.get_buffer("0.weight_mask").float().mean().item()  # bool mask: True = kept
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
        return float(group["sparsity_level"]) * zeros / (block[0] * block[1])

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
            self.masked_tensor(module, tensor_name), sparsity_level, sparse_block_shape, zeros_per_block, self.norm_fn
        )
        self.get_mask(module, tensor_name).copy_(keep)


def _validate(args: Mapping[str, Any], where: str = "") -> None:
    validate_level(args.get("sparsity_level"), f"sparsity_level{where}")
    validate_block(args.get("sparse_block_shape"), args.get("zeros_per_block"))
