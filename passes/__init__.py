"""Pure torch.fx graph passes for weight sparsity; none of them imports ``fx_sparsity``.

The stages, one subpackage each, in pipeline order:

* :mod:`passes.capturing`: an ``nn.Module`` as a ``GraphModule`` (symbolic tracing, or ``torch.export``);
* :mod:`passes.matching`: its Linear/Conv weights by FQN, the ones left dense, selection by FQN rules;
* :mod:`passes.masking`: ``mul(weight, mask)`` nodes in, fused back out, module swaps;
* :mod:`passes.calibration`: observers in front of masked ops, block-by-block stages;
* :mod:`passes.lowering`: packed sparse formats and the ``fx_sparsity::*`` operators (C++ kernels in ``csrc/``);
* :mod:`passes.dependency`: the channel groups that must shrink together (analysis only);
* :mod:`passes.shrink`: channels removed physically.

:mod:`passes.meta` holds what the passes record (one ``node.meta`` key, one ``gm.meta`` key),
:mod:`passes.utils` the FQN and tensor-sharing helpers.

**The pass form.** A pass that rewrites a graph is a function ``GraphModule -> GraphModule``
that rewrites the module it is given, in place, and returns it: :func:`insert_masks`,
:func:`fuse_masks`, :func:`~passes.masking.swap_modules`, :func:`lower_sparse`,
:func:`remove_channels`, :func:`remove_input_observers`. The tensors it replaces are never
written to, so a caller that must keep its module passes a clone sharing its tensors
(:func:`clone_sharing_tensors`); use the returned module. Analyses (:func:`find_weights`,
:func:`unmatched_weights`, :func:`find_channel_groups`, :func:`plan_shrink`, ...) read and
return records, and never modify. :func:`capture` takes an ``nn.Module``;
:func:`insert_input_observers` returns the observers it put in, until
:func:`remove_input_observers` takes them out.

Importing the package registers the ``fx_sparsity::*_linear`` custom operators
(:mod:`passes.lowering.operators`) that lowered modules and exported programs call.
"""

from passes.calibration.insertion import insert_input_observers, remove_input_observers
from passes.capturing.tracing import CaptureError, capture
from passes.compat import install_moved_modules, keep_attributes, moved_names
from passes.dependency.analysis import find_channel_groups
from passes.dependency.records import ChannelGroup, Member
from passes.lowering.native import native_isa
from passes.lowering.rewrite import SparseFormat, lower_sparse
from passes.masking.fuse import fuse_masks
from passes.masking.insert import insert_masks
from passes.matching.select import FqnRule, select_weights
from passes.matching.unmatched import UnmatchedWeight, unmatched_weights
from passes.matching.weights import WeightMatch, find_weights
from passes.meta import SPARSITY_META_KEY, SparseTarget, get_capture, get_sparse_target, masked_targets
from passes.shrink.plan import plan_shrink
from passes.shrink.report import ShrinkReport
from passes.shrink.rewrite import remove_channels
from passes.utils import clone_sharing_tensors

__all__ = [
    # capture
    "capture",
    "CaptureError",
    "get_capture",
    # match and select
    "find_weights",
    "unmatched_weights",
    "select_weights",
    "FqnRule",
    "WeightMatch",
    "UnmatchedWeight",
    # masks
    "insert_masks",
    "fuse_masks",
    "masked_targets",
    "SparseTarget",
    "SPARSITY_META_KEY",
    "get_sparse_target",
    # calibration
    "insert_input_observers",
    "remove_input_observers",
    # lowering
    "lower_sparse",
    "SparseFormat",
    "native_isa",
    # structured
    "find_channel_groups",
    "ChannelGroup",
    "Member",
    "plan_shrink",
    "remove_channels",
    "ShrinkReport",
    # helpers
    "clone_sharing_tensors",
]

# Names of fx_sparsity 0.1.0's passes.__all__ that now live in a subpackage.
__getattr__ = moved_names(
    __name__,
    {
        "CapturedModule": "passes.capturing",
        "COMPONENT_NAMES": "passes.lowering",
        "LAYOUTS": "passes.lowering",
        "SPARSE_OPS": "passes.lowering",
        "conv_strides": "passes.lowering",
        "lowering_blocker": "passes.lowering",
        "lowering_blockers": "passes.lowering",
        "sparse_layer_forward": "passes.lowering",
        "unsupported_reason": "passes.lowering",
        "detect_nm": "passes.lowering",
        "NO_NATIVE_ENV": "passes.lowering",
        "native_ops": "passes.lowering",
        "find_masked_weights": "passes.matching",
        "is_transposed_linear": "passes.matching",
        "op_arguments": "passes.matching",
        "op_kind": "passes.matching",
        "weight_position": "passes.matching",
        "is_pattern": "passes.matching",
        "fqns_read": "passes.utils",
        "set_tensor": "passes.utils",
        "split_fqn": "passes.utils",
        "tensor_aliases": "passes.utils",
        "InputHessianObserver": "passes.calibration",
        "InputNormObserver": "passes.calibration",
        "InputObserver": "passes.calibration",
        "ObserverFactory": "passes.calibration",
        "accumulate_hessian": "passes.calibration",
        "all_reduce_observers": "passes.calibration",
        "input_norm_observer": "passes.calibration",
        "input_rows": "passes.calibration",
        "token_rows": "passes.calibration",
        "Stage": "passes.calibration",
        "StageRunner": "passes.calibration",
        "carried_bytes": "passes.calibration",
        "find_blocks": "passes.calibration",
        "match_blocks": "passes.calibration",
        "module_paths": "passes.calibration",
        "plan_stages": "passes.calibration",
        "stage_tensors": "passes.calibration",
        "count_macs": "passes.shrink",
        "shrink_channels": "passes.shrink",
        "LSTM_KIND": "passes.masking",
        "find_lstm_weights": "passes.masking",
        "masked_lstm": "passes.masking",
    },
)

# Module paths of fx_sparsity 0.1.0 (imports, pickles, state dicts name them) and their new homes.
install_moved_modules(
    {
        "passes.capture": ("passes.capturing.tracing", "passes.capturing.pickling"),
        "passes.match": ("passes.matching.weights", "passes.matching.unmatched"),
        "passes.select": ("passes.matching.select",),
        "passes.insert_masks": ("passes.masking.insert",),
        "passes.fuse_masks": ("passes.masking.fuse", "passes.meta"),
        "passes.lstm_masks": ("passes.masking.lstm",),
        "passes.observers": ("passes.calibration.observers",),
        "passes.observe": ("passes.calibration.insertion",),
        "passes.blocks": ("passes.calibration.blocks", "passes.calibration.stages"),
        "passes.lower_sparse": ("passes.lowering.rewrite",),
        "passes.sparse_formats": ("passes.lowering.formats",),
        "passes.sparse_ops": ("passes.lowering.operators", "passes.lowering.formats"),
        "passes.native": ("passes.lowering.native",),
        "passes.channel_spaces": ("passes.dependency.spaces",),
        "passes.channel_ops": ("passes.dependency.op_categories",),
        "passes.dependency_rules": ("passes.dependency.layout", "passes.dependency.analysis"),
        "passes.dependency_layers": ("passes.dependency.rules.layers",),
        "passes.dependency_moves": ("passes.dependency.rules.moves",),
        "passes.dependency_lstm": ("passes.dependency.rules.lstm",),
        "passes.dependency_attention": ("passes.dependency.rules.attention",),
        "passes.shrink_bias": ("passes.shrink.bias",),
        "passes.shrink_modules": ("passes.shrink.modules",),
    }
)
keep_attributes(__name__)
