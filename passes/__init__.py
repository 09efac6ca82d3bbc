"""Pure torch.fx graph passes for weight sparsity.

Each pass takes a ``GraphModule`` and returns one; none of them imports
``fx_sparsity``. ``capture`` is the exception that takes an ``nn.Module``.
Importing the package registers the ``fx_sparsity::*_linear`` custom operators
(:mod:`passes.sparse_ops`) that lowered modules and exported programs call.
"""

from .capture import CapturedModule, CaptureError, capture
from .fuse_masks import fuse_masks, masked_targets
from .insert_masks import insert_masks
from .lower_sparse import (
    COMPONENT_NAMES,
    LAYOUTS,
    SPARSE_OPS,
    SparseFormat,
    conv_strides,
    lower_sparse,
    lowering_blocker,
    lowering_blockers,
    sparse_layer_forward,
    unsupported_reason,
)
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
from .native import NO_NATIVE_ENV, native_isa, native_ops
from .sparse_formats import detect_nm
from .meta import SPARSITY_META_KEY, SparseTarget, get_sparse_target
from .select import FqnRule, is_pattern, select_weights
from .utils import clone_sharing_tensors, fqns_read, set_tensor, split_fqn, tensor_aliases
from .observe import insert_input_observers, remove_input_observers
from .observers import (
    InputHessianObserver,
    InputNormObserver,
    InputObserver,
    ObserverFactory,
    accumulate_hessian,
    all_reduce_observers,
    input_norm_observer,
    input_rows,
    token_rows,
)
from .dependency import ChannelGroup, Member, find_channel_groups
from .shrink import ShrinkReport, count_macs, shrink_channels
from .blocks import Stage, StageRunner, carried_bytes, find_blocks, match_blocks, module_paths, plan_stages, stage_tensors
from .lstm_masks import LSTM_KIND, find_lstm_weights, masked_lstm

__all__ = [
    "COMPONENT_NAMES",
    "CaptureError",
    "CapturedModule",
    "ChannelGroup",
    "FqnRule",
    "InputHessianObserver",
    "InputNormObserver",
    "LAYOUTS",
    "Member",
    "NO_NATIVE_ENV",
    "ObserverFactory",
    "SPARSE_OPS",
    "SPARSITY_META_KEY",
    "ShrinkReport",
    "SparseFormat",
    "SparseTarget",
    "UnmatchedWeight",
    "WeightMatch",
    "accumulate_hessian",
    "capture",
    "clone_sharing_tensors",
    "conv_strides",
    "count_macs",
    "detect_nm",
    "find_channel_groups",
    "find_masked_weights",
    "find_weights",
    "fqns_read",
    "fuse_masks",
    "get_sparse_target",
    "input_norm_observer",
    "input_rows",
    "insert_input_observers",
    "insert_masks",
    "is_pattern",
    "is_transposed_linear",
    "lower_sparse",
    "lowering_blocker",
    "lowering_blockers",
    "masked_targets",
    "native_isa",
    "native_ops",
    "op_arguments",
    "op_kind",
    "remove_input_observers",
    "select_weights",
    "shrink_channels",
    "sparse_layer_forward",
    "set_tensor",
    "split_fqn",
    "tensor_aliases",
    "unmatched_weights",
    "unsupported_reason",
    "weight_position",
    "InputObserver",
    "all_reduce_observers",
    "token_rows",
    "Stage",
    "StageRunner",
    "carried_bytes",
    "find_blocks",
    "match_blocks",
    "module_paths",
    "plan_stages",
    "stage_tensors",
    "LSTM_KIND",
    "find_lstm_weights",
    "masked_lstm",
]
