"""torch.ao.pruning's WeightNormSparsifier and its block-norm mask math."""

from fx_sparsity.sparsifier.weight_norm.sparsifier import (
    WeightNormSparsifier,
)

__all__ = [
    "WeightNormSparsifier",
]
