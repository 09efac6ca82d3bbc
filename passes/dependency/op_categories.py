"""Which graph ops carry a channel dimension through unchanged, for :mod:`passes.dependency`.

Each table names ops by what they do to a channel axis:

* ``POINTWISE``: elementwise math and activations; every tensor argument is
  broadcast against the others, so their channels line up;
* ``SPATIAL``: pooling and resizing over the dims *after* the channel axis (dim 1);
* ``REDUCTIONS``: ``mean``/``sum``/``amax``/``amin`` over some dims;
* ``RESHAPES``, ``TRANSPOSES``, ``CONCATS``, ``SPLITS``, ``EXPANDS``: ops that move the
  channel axis, cut it into pieces (heads) or repeat it (grouped-query attention);
* ``MATMULS``, ``SOFTMAXES``, ``ATTENTION``: attention math, which keeps head axes
  among the batch dims;
* ``SLICES``: ATen ``slice``/``select`` of one dim (rotary embeddings slice the head dim);
* ``LAYER_NORMS``: functional/ATen ``layer_norm`` (a norm over the trailing dims);
* ``EMBEDDINGS``: functional/ATen ``embedding`` (a table lookup: a new channel space);
* ``BATCH_NORMS``, ``GROUP_NORMS``: functional/ATen ``batch_norm``/``group_norm`` (over dim 1);
* ``PATCH_MERGING``, ``WINDOW_ATTENTION``: torchvision Swin's ``torch.fx.wrap``'ed functions, found by name;
* ``SHAPE_QUERIES``: ops that read only a tensor's shape.

An op in no table is unknown, and the dependency pass freezes every channel it reads.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = [
    "POINTWISE",
    "SPATIAL",
    "REDUCTIONS",
    "RESHAPES",
    "TRANSPOSES",
    "CONCATS",
    "SPLITS",
    "SHAPE_QUERIES",
    "MATMULS",
    "SOFTMAXES",
    "ATTENTION",
    "EXPANDS",
    "SLICES",
    "LAYER_NORMS",
    "EMBEDDINGS",
    "BATCH_NORMS",
    "GROUP_NORMS",
    "PATCH_MERGING",
    "WINDOW_ATTENTION",
    "SIZED_RESHAPES",
    "EXPANDING",
    "PERMUTES",
    "CHUNKS",
    "VIEWS",
    "op_category",
]

_POINTWISE_FUNCS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
    operator.neg, torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.abs, torch.exp, torch.relu,
    torch.relu_, torch.sigmoid, torch.tanh, torch.clamp, F.relu, F.relu6, F.hardswish, F.hardsigmoid, F.gelu,
    F.silu, F.sigmoid, F.tanh, F.leaky_relu, F.elu, F.hardtanh, F.mish, F.softplus, F.dropout,
    torch.pow, torch.rsqrt, torch.sqrt, torch.erf, torch.log, torch.where,
}
_POINTWISE_METHODS = {
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "neg", "abs", "exp", "relu", "relu_", "sigmoid",
    "sigmoid_", "tanh", "clamp", "clamp_", "contiguous", "float", "half", "bfloat16", "to", "clone", "detach",
    "pow", "rsqrt", "sqrt", "erf", "log",
}
_POINTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU,
    nn.ELU, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity,
)
_SPATIAL_FUNCS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate,
    torch.max_pool1d, torch.max_pool2d, torch.avg_pool1d, torch.adaptive_avg_pool1d,
}
_SPATIAL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample,
)

POINTWISE = "pointwise"
SPATIAL = "spatial"
REDUCTIONS = "reduction"
RESHAPES = "reshape"
TRANSPOSES = "transpose"
CONCATS = "concat"
SPLITS = "split"
SHAPE_QUERIES = "shape"
MATMULS = "matmul"
SOFTMAXES = "softmax"
ATTENTION = "attention"
EXPANDS = "expand"
SLICES = "slice"
LAYER_NORMS = "layer_norm"
EMBEDDINGS = "embedding"
BATCH_NORMS = "batch_norm"
GROUP_NORMS = "group_norm"
PATCH_MERGING = "patch_merging"
WINDOW_ATTENTION = "window_attention"

aten = torch.ops.aten
# torch.export captures ATen ops; these take their arguments in the positions of the torch functions above.
_ATEN = {
    **{op: POINTWISE for op in (
        aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.neg.default, aten.relu.default,
        aten.relu_.default, aten.gelu.default, aten.silu.default, aten.sigmoid.default, aten.tanh.default,
        aten.hardswish.default, aten.hardsigmoid.default, aten.dropout.default, aten.clone.default,
        aten._to_copy.default, aten.alias.default, aten.contiguous.default, aten.to.dtype, aten.to.dtype_layout,
        aten.to.device, aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor, aten.rsqrt.default, aten.sqrt.default,
        aten.exp.default, aten.abs.default, aten.erf.default, aten.log.default, aten.where.self,
        aten.where.ScalarOther, aten.where.ScalarSelf, aten.clamp.default, aten.hardtanh.default,
        aten.hardtanh_.default, aten.leaky_relu.default, aten.elu.default, aten.mish.default, aten.softplus.default,
        aten.silu_.default, aten.hardswish_.default, aten.rsub.Scalar,
    )},
    **{op: SPATIAL for op in (aten.max_pool2d.default, aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default)},
    aten.mean.dim: REDUCTIONS, aten.sum.dim_IntList: REDUCTIONS,
    **{op: RESHAPES for op in (
        aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
        aten.unsqueeze.default, aten.squeeze.dim,
    )},
    aten.transpose.int: TRANSPOSES, aten.permute.default: TRANSPOSES, aten.cat.default: CONCATS,
    aten.split.Tensor: SPLITS, aten.split_with_sizes.default: SPLITS, aten.chunk.default: SPLITS,
    aten.matmul.default: MATMULS, aten.bmm.default: MATMULS,
    aten.softmax.int: SOFTMAXES, aten._softmax.default: SOFTMAXES,
    aten.scaled_dot_product_attention.default: ATTENTION,
    aten.expand.default: EXPANDS, aten.expand_as.default: EXPANDS, aten.repeat_interleave.self_int: EXPANDS,
    aten.sym_size.int: SHAPE_QUERIES, aten._assert_tensor_metadata.default: SHAPE_QUERIES,
    aten.slice.Tensor: SLICES, aten.select.int: SLICES,
    aten.layer_norm.default: LAYER_NORMS,
    aten.embedding.default: EMBEDDINGS,
    aten.batch_norm.default: BATCH_NORMS, aten.group_norm.default: GROUP_NORMS,
}
# The ops among these that take a list of sizes (a literal there pins the channel count).
SIZED_RESHAPES = {"view", "reshape", torch.reshape, aten.view.default, aten.reshape.default, aten._unsafe_view.default}
EXPANDING = {"expand", "expand_as", aten.expand.default, aten.expand_as.default}
PERMUTES = {"permute", torch.permute, aten.permute.default}
CHUNKS = {"chunk", torch.chunk, aten.chunk.default}
# Ops that view, expand or copy one tensor (a parameter lined up with the channel axis goes through these).
VIEWS = SIZED_RESHAPES | EXPANDING | {
    "view", "reshape", "unsqueeze", "squeeze", "flatten", "contiguous", "to", "float", "half", "bfloat16", "clone",
    torch.unsqueeze, torch.squeeze, torch.flatten, aten.unsqueeze.default, aten.squeeze.dim, aten.clone.default,
    aten._to_copy.default, aten.contiguous.default, aten.to.dtype, aten.alias.default,
}

_FUNCS = {
    **_ATEN,
    **{f: POINTWISE for f in _POINTWISE_FUNCS},
    **{f: SPATIAL for f in _SPATIAL_FUNCS},
    torch.mean: REDUCTIONS, torch.sum: REDUCTIONS, torch.amax: REDUCTIONS, torch.amin: REDUCTIONS,
    torch.flatten: RESHAPES, torch.reshape: RESHAPES, torch.unsqueeze: RESHAPES, torch.squeeze: RESHAPES,
    operator.matmul: MATMULS, torch.matmul: MATMULS, torch.bmm: MATMULS,
    F.softmax: SOFTMAXES, torch.softmax: SOFTMAXES, F.log_softmax: SOFTMAXES,
    F.scaled_dot_product_attention: ATTENTION,
    torch.repeat_interleave: EXPANDS,
    torch.transpose: TRANSPOSES, torch.permute: TRANSPOSES,
    torch.cat: CONCATS, torch.concat: CONCATS,
    torch.split: SPLITS, torch.chunk: SPLITS,
    F.layer_norm: LAYER_NORMS, torch.layer_norm: LAYER_NORMS,
    F.embedding: EMBEDDINGS, torch.embedding: EMBEDDINGS,
    F.batch_norm: BATCH_NORMS, torch.batch_norm: BATCH_NORMS, F.group_norm: GROUP_NORMS, torch.group_norm: GROUP_NORMS,
    getattr: SHAPE_QUERIES,
}
_METHODS = {
    **{m: POINTWISE for m in _POINTWISE_METHODS},
    "mean": REDUCTIONS, "sum": REDUCTIONS, "amax": REDUCTIONS, "amin": REDUCTIONS,
    "flatten": RESHAPES, "view": RESHAPES, "reshape": RESHAPES, "unsqueeze": RESHAPES, "squeeze": RESHAPES,
    "matmul": MATMULS, "bmm": MATMULS, "softmax": SOFTMAXES, "log_softmax": SOFTMAXES,
    "expand": EXPANDS, "expand_as": EXPANDS, "repeat_interleave": EXPANDS,
    "transpose": TRANSPOSES, "permute": TRANSPOSES,
    "split": SPLITS, "chunk": SPLITS,
    "size": SHAPE_QUERIES, "dim": SHAPE_QUERIES,
}


# Functions models wrap with torch.fx.wrap (kept as one call by symbolic tracing), by (module, name): found by
# name, so that passes needs no torchvision. stochastic_depth scales whole samples (rows) or the whole batch, so
# every channel is treated alike: the identity in eval, elementwise in training.
_NAMED_FUNCS = {
    ("torchvision.ops.stochastic_depth", "stochastic_depth"): POINTWISE,
    ("torchvision.models.swin_transformer", "_patch_merging_pad"): PATCH_MERGING,
    ("torchvision.models.swin_transformer", "shifted_window_attention"): WINDOW_ATTENTION,
}


def op_category(node: fx.Node, gm: fx.GraphModule) -> str | None:
    """The table ``node``'s op is in (``POINTWISE``, ``SPATIAL``, ...), or ``None`` when unknown.

    Modules count only when they are exactly the torch.nn class (a subclass may
    compute anything); ``nn.Flatten`` is a reshape.

    Example::

        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.ReLU()))
        >>> [op_category(n, gm) for n in gm.graph.nodes]
        [None, 'pointwise', None]
    """
    if node.op == "call_function":
        found = _FUNCS.get(node.target)
        name = (getattr(node.target, "__module__", None), getattr(node.target, "__name__", None))
        return found if found is not None else _NAMED_FUNCS.get(name)
    if node.op == "call_method":
        return _METHODS.get(node.target)
    if node.op != "call_module":
        return None
    module = gm.get_submodule(node.target)
    if type(module) in _POINTWISE_MODULES:
        return POINTWISE
    if type(module) in _SPATIAL_MODULES:
        return SPATIAL
    if type(module) is nn.Flatten:
        return RESHAPES
    if type(module) in (nn.Softmax, nn.LogSoftmax):
        return SOFTMAXES
    return None
