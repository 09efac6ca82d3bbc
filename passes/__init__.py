"""Pure torch.fx graph passes for weight sparsity.

Each pass takes a ``GraphModule`` and returns one; none of them imports
``fx_sparsity``. ``capture`` is the exception that takes an ``nn.Module``.
"""

from .capture import CaptureError, capture
from .fuse_masks import fuse_masks, masked_targets
from .insert_masks import insert_masks
from .match import WeightMatch, find_weights
from .meta import SPARSITY_META_KEY, SparseTarget, get_sparse_target
from .select import FqnRule, is_pattern, select_weights
from .utils import clone_sharing_tensors

__all__ = [
    "CaptureError",
    "FqnRule",
    "SPARSITY_META_KEY",
    "SparseTarget",
    "WeightMatch",
    "capture",
    "clone_sharing_tensors",
    "find_weights",
    "fuse_masks",
    "get_sparse_target",
    "insert_masks",
    "is_pattern",
    "masked_targets",
    "select_weights",
]
