"""SparseGPT: optimal-brain-surgeon pruning from input Hessians."""

from fx_sparsity.sparsifier.sparsegpt.obs import (
    input_rows,
    accumulate_hessian,
    sparsegpt_prune,
    validate_block_size,
)
from fx_sparsity.sparsifier.sparsegpt.sparsifier import (
    SparseGPTSparsifier,
    INPUT_HESSIAN_KEY,
)

__all__ = [
    "input_rows",
    "accumulate_hessian",
    "sparsegpt_prune",
    "validate_block_size",
    "SparseGPTSparsifier",
    "INPUT_HESSIAN_KEY",
]
