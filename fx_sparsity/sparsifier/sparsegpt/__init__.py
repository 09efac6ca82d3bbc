"""SparseGPT, optimal-brain-surgeon pruning from input Hessians (:mod:`.sparsifier`), and its math (:mod:`.obs`)."""

from fx_sparsity.sparsifier.sparsegpt.obs import sparsegpt_prune, validate_block_size
from fx_sparsity.sparsifier.sparsegpt.sparsifier import INPUT_HESSIAN_KEY, SparseGPTSparsifier

__all__ = [
    "sparsegpt_prune",
    "validate_block_size",
    "INPUT_HESSIAN_KEY",
    "SparseGPTSparsifier",
]
