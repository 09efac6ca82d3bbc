"""Which graph ops carry a channel dimension through unchanged, for :mod:`passes.dependency`.

Each table names ops by what they do to a channel axis:

* ``POINTWISE``: elementwise math and activations; every tensor argument is
  broadcast against the others, so their channels line up;
* ``SPATIAL``: pooling and resizing over the dims *after* the channel axis (dim 1);
* ``REDUCTIONS``: ``mean``/``sum``/``amax``/``amin`` over some dims;
* ``RESHAPES``, ``TRANSPOSES``, ``CONCATS``, ``SPLITS``: ops that move the channel axis
  or cut it into pieces;
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
    "op_category",
]

_POINTWISE_FUNCS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
    operator.neg, torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.abs, torch.exp, torch.relu,
    torch.relu_, torch.sigmoid, torch.tanh, torch.clamp, F.relu, F.relu6, F.hardswish, F.hardsigmoid, F.gelu,
    F.silu, F.sigmoid, F.tanh, F.leaky_relu, F.elu, F.hardtanh, F.mish, F.softplus, F.dropout,
}
_POINTWISE_METHODS = {
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "neg", "abs", "exp", "relu", "relu_", "sigmoid",
    "sigmoid_", "tanh", "clamp", "clamp_", "contiguous", "float", "half", "bfloat16", "to", "clone", "detach",
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

_FUNCS = {
    **{f: POINTWISE for f in _POINTWISE_FUNCS},
    **{f: SPATIAL for f in _SPATIAL_FUNCS},
    torch.mean: REDUCTIONS, torch.sum: REDUCTIONS, torch.amax: REDUCTIONS, torch.amin: REDUCTIONS,
    torch.flatten: RESHAPES, torch.reshape: RESHAPES,
    torch.transpose: TRANSPOSES, torch.permute: TRANSPOSES,
    torch.cat: CONCATS, torch.concat: CONCATS,
    torch.split: SPLITS, torch.chunk: SPLITS,
    getattr: SHAPE_QUERIES,
}
_METHODS = {
    **{m: POINTWISE for m in _POINTWISE_METHODS},
    "mean": REDUCTIONS, "sum": REDUCTIONS, "amax": REDUCTIONS, "amin": REDUCTIONS,
    "flatten": RESHAPES, "view": RESHAPES, "reshape": RESHAPES,
    "transpose": TRANSPOSES, "permute": TRANSPOSES,
    "split": SPLITS, "chunk": SPLITS,
    "size": SHAPE_QUERIES, "dim": SHAPE_QUERIES,
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
        return _FUNCS.get(node.target)
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
    return None
