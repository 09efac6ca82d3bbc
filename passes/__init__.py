"""Pure torch.fx graph passes for weight sparsity.

Each pass takes a ``GraphModule`` and returns one; none of them imports
``fx_sparsity``. ``capture`` is the exception that takes an ``nn.Module``.
Importing the package registers the ``fx_sparsity::*_linear`` custom operators
(:mod:`passes.lowering.operators`) that lowered modules and exported programs call.
"""

from passes.capturing.tracing import CapturedModule, CaptureError, capture
from passes.masking.fuse import fuse_masks, masked_targets
from passes.masking.insert import insert_masks
from passes.lowering.rewrite import (
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
from passes.matching.weights import (
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
from passes.lowering.native import NO_NATIVE_ENV, native_isa, native_ops
from passes.lowering.formats import detect_nm
from passes.meta import SPARSITY_META_KEY, SparseTarget, get_sparse_target
from passes.matching.select import FqnRule, is_pattern, select_weights
from passes.utils import clone_sharing_tensors, fqns_read, set_tensor, split_fqn, tensor_aliases
from passes.calibration.insertion import insert_input_observers, remove_input_observers
from passes.calibration.observers import (
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
from passes.dependency.analysis import ChannelGroup, Member, find_channel_groups
from passes.shrink.rewrite import ShrinkReport, count_macs, shrink_channels
from passes.calibration.stages import (
    Stage,
    StageRunner,
    carried_bytes,
    find_blocks,
    match_blocks,
    module_paths,
    plan_stages,
    stage_tensors,
)
from passes.masking.lstm import LSTM_KIND, find_lstm_weights, masked_lstm

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
