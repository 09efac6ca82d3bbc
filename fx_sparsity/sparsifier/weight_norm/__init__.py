"""torch.ao.pruning's ``WeightNormSparsifier`` (:mod:`.sparsifier`) and its block-norm mask math (:mod:`.masks`)."""

from fx_sparsity.sparsifier.weight_norm.masks import resolve_norm, validate_block, weight_norm_keep, weight_norm_mask
from fx_sparsity.sparsifier.weight_norm.sparsifier import WeightNormSparsifier

__all__ = [
    "resolve_norm",
    "validate_block",
    "weight_norm_keep",
    "weight_norm_mask",
    "WeightNormSparsifier",
]
