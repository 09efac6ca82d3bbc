"""Pure torch.fx graph passes for weight sparsity.

Each pass takes a ``GraphModule`` and returns one; none of them imports
``fx_sparsity``. ``capture`` is the exception that takes an ``nn.Module``.
Importing the package registers the ``fx_sparsity::*_linear`` custom operators
(:mod:`passes.sparse_ops`) that lowered modules and exported programs call.
"""

from .capture import CapturedModule, CaptureError, capture
from .fuse_masks import fuse_masks, masked_targets
from .insert_masks import insert_masks
from .lower_sparse import SPARSE_OPS, SparseFormat, lower_sparse, lowering_blocker, sparse_layer_forward
from .match import (
    UnmatchedWeight,
    WeightMatch,
    find_masked_weights,
    find_weights,
    is_transposed_linear,
    op_arguments,
    op_kind,
    unmatched_weights,
    weight_position,
)
from .native import native_isa, native_ops
from .sparse_formats import detect_nm
from .meta import SPARSITY_META_KEY, SparseTarget, get_sparse_target
from .observe import InputNormObserver, insert_input_observers, remove_input_observers
from .select import FqnRule, is_pattern, select_weights
from .utils import clone_sharing_tensors
from .observe import InputHessianObserver, ObserverFactory, accumulate_hessian, input_rows
from .dependency import ChannelGroup, Member, find_channel_groups
from .shrink import ShrinkReport, count_macs, shrink_channels

__all__ = [
    "CaptureError",
    "FqnRule",
    "InputNormObserver",
    "SPARSE_OPS",
    "SPARSITY_META_KEY",
    "SparseFormat",
    "SparseTarget",
    "WeightMatch",
    "capture",
    "clone_sharing_tensors",
    "detect_nm",
    "find_masked_weights",
    "find_weights",
    "fuse_masks",
    "get_sparse_target",
    "insert_input_observers",
    "insert_masks",
    "is_pattern",
    "lower_sparse",
    "lowering_blocker",
    "masked_targets",
    "native_isa",
    "native_ops",
    "op_arguments",
    "op_kind",
    "remove_input_observers",
    "select_weights",
    "sparse_layer_forward",
    "UnmatchedWeight",
    "unmatched_weights",
    "is_transposed_linear",
    "weight_position",
    "CapturedModule",
    "InputHessianObserver",
    "ObserverFactory",
    "accumulate_hessian",
    "input_rows",
    "ChannelGroup",
    "Member",
    "ShrinkReport",
    "count_macs",
    "find_channel_groups",
    "shrink_channels",
]
