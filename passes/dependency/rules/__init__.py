"""The rule table of the dependency analysis: which rule follows the channels through which node.

A rule is one function in one file of this folder (one file per op family); adding one is
that file plus one line here. :func:`passes.dependency.analysis.follow_node` dispatches:
a Linear/Conv op to :data:`LAYER_RULE`, a ``call_module`` whose type is a key of
:data:`MODULE_RULES` to its rule, ``getitem`` to :data:`GETITEM_RULE`, and any other node to
the rule of its category (:func:`passes.dependency.op_categories.op_category`) in
:data:`OP_RULES`; a node with tracked inputs and no rule freezes them. The categories in
:data:`OPENING` (table lookups) open a space of their own, so their rule runs with no
tracked input too. Layer and module rules take ``(node, gm, shapes, layouts, spaces)``, the
others ``(node, shapes, layouts, spaces)``; each returns the layout of the node's output
(:class:`passes.dependency.layout.Layout`).
"""

from torch import nn

from passes.dependency import op_categories as ops
from passes.dependency.rules import attention, elementwise, layers, lstm, moves, norms, reshape, wrapped

__all__ = ["LAYER_RULE", "MODULE_RULES", "GETITEM_RULE", "OP_RULES", "OPENING"]

LAYER_RULE = layers.follow_layer
MODULE_RULES = {
    nn.LSTM: lstm.follow_lstm,
    nn.BatchNorm1d: layers.follow_module,
    nn.BatchNorm2d: layers.follow_module,
    nn.BatchNorm3d: layers.follow_module,
    nn.LayerNorm: layers.follow_module,
    nn.GroupNorm: layers.follow_module,
    nn.Embedding: layers.follow_module,
}
GETITEM_RULE = moves.getitem
OP_RULES = {
    ops.POINTWISE: elementwise.pointwise,
    ops.SPATIAL: elementwise.spatial,
    ops.REDUCTIONS: elementwise.reduction,
    ops.RESHAPES: reshape.reshape,
    ops.TRANSPOSES: moves.transpose,
    ops.CONCATS: moves.concat,
    ops.SPLITS: moves.split,
    ops.SLICES: moves.slice_,
    ops.LAYER_NORMS: layers.layer_norm,
    ops.MATMULS: attention.matmul,
    ops.SOFTMAXES: attention.softmax,
    ops.EXPANDS: attention.expand,
    ops.ATTENTION: attention.attention,
    ops.EMBEDDINGS: layers.embedding,
    ops.BATCH_NORMS: norms.batch_norm,
    ops.GROUP_NORMS: norms.group_norm,
    ops.PATCH_MERGING: wrapped.patch_merging,
    ops.WINDOW_ATTENTION: wrapped.window_attention,
}
OPENING = {ops.EMBEDDINGS}
