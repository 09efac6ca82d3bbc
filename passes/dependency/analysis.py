"""Group the channel dimensions of a graph that must shrink together (analysis only, no rewrite).

Every Linear/Conv/Embedding output opens a *channel space*; the pass follows it
through the graph and unites spaces that meet: a residual ``add`` makes both
branches one space, a depthwise conv makes its input and output one space. Each
space collects its *members*, the tensor slices that lose an index when one of
its channels goes: producer weight rows, consumer weight columns (with the offset
of a concatenation and the ``inner`` factor of a flatten into a Linear), biases,
BatchNorm/LayerNorm/GroupNorm parameters and running stats (ATen ``layer_norm``'s too, its
``normalized_shape`` a literal member), embedding columns, parameters combined elementwise (a
position embedding, a layer scale, a class token expanded and concatenated along the tokens), and the modules
whose attributes (``in_features``, ``num_features``, ``groups`` ...) follow.

Attention heads are channel units too: viewing a projection's ``[.., H * hd]`` as
``[.., H, hd]`` relates its channels to a space of ``H`` heads, which ``q @ k^T``,
``softmax``, ``attn @ v`` and ``scaled_dot_product_attention`` unite across q, k and
v; repeated key/value heads (grouped-query attention) make each KV head carry its
query group (see :mod:`passes.dependency.spaces`, :mod:`passes.dependency.rules.attention`).

A literal size at the channel axis of a view, reshape or expand (``view(b, s, 8, 64)``
as ``torch.export`` writes it) is recorded as a ``"literal"`` member, which
:mod:`passes.shrink` lowers by the channels removed.

A split along the channels cuts a space into pieces, each a space of its own (GPT-2's q/k/v from one
``c_attn``, see :meth:`passes.dependency.spaces.Spaces.split`). Weights stored ``[in, out]`` (``x @ W``,
transformers' ``Conv1D``) are followed along their stored dims; functional and exported batch/group
norms, table lookups (``aten.embedding``), a per-channel parameter viewed to the channel axis (a
layer scale), and the functions models hide from symbolic tracing with ``torch.fx.wrap`` that
:mod:`passes.dependency.rules.wrapped` knows (torchvision's ``stochastic_depth``, Swin's window
attention and patch merging) have rules too.

What the pass cannot prove safe is *frozen*, with the reason: a channel that
reaches a model output, an unknown op, a reshape it cannot follow,
``nn.MultiheadAttention``'s fused ``in_proj_weight`` in a form other than the exported
self-attention of :mod:`passes.dependency.rules.attention` (refused, with the reason).

Shapes come from running the graph once on ``example_inputs`` (in eval mode,
without gradients, so BatchNorm statistics are not touched). Both captured forms
are read: ``call_module`` layers, and ``F.linear``/``F.conv*`` calls whose weight
is a ``get_attr`` or the ``mul(weight, mask)`` node of :mod:`passes.masking.insert`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from passes.dependency import op_categories as ops
from passes.dependency.layout import Layout, freeze, tracked_inputs
from passes.dependency.records import ChannelGroup
from passes.dependency.rules import GETITEM_RULE, LAYER_RULE, MODULE_RULES, OP_RULES, OPENING
from passes.dependency.spaces import Spaces
from passes.matching.weights import op_kind

__all__ = ["find_channel_groups", "follow_node", "run_recording"]


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, record: Callable[[fx.Node, Any, tuple, dict], None]) -> None:
        super().__init__(gm)
        self._record = record

    def run_node(self, n: fx.Node) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        result = super().run_node(n)
        self._record(n, result, args, kwargs)
        return result


def _as_args(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(
        f"example_inputs must be a tensor or a tuple of positional inputs, got {type(example_inputs).__name__}"
    )


def run_recording(
    gm: fx.GraphModule, example_inputs: Any, record: Callable[[fx.Node, Any, tuple, dict], None]
) -> Any:
    """Run ``gm`` on ``example_inputs`` in eval mode without gradients, calling
    ``record(node, result, args, kwargs)`` after every node; training flags are restored.

    Example::

        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 2)))
        >>> shapes = {}
        >>> _ = run_recording(gm, torch.ones(1, 4), lambda n, r, a, k: shapes.update({n.name: r.shape}))
        >>> shapes["_0"]
        torch.Size([1, 2])
    """
    args = _as_args(example_inputs)
    flags = [(m, m.training) for m in gm.modules()]
    for module, _ in flags:  # not gm.eval(): an exported module refuses it
        module.training = False
    try:
        with torch.no_grad():
            return _Recorder(gm, record).run(*args)
    finally:
        for module, training in flags:
            module.training = training


def _shape_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(tuple(v.shape) for v in value)
    return None


def follow_node(
    node: fx.Node, gm: fx.GraphModule, shapes: dict, layouts: dict, spaces: Spaces
) -> Layout | tuple | None:
    """The layout of ``node``'s output, after its rule (:mod:`passes.dependency.rules`) added its members to the
    spaces it touches."""
    if node.op in ("placeholder", "get_attr"):
        return None
    tracked = tracked_inputs(node, layouts)
    name = node.target if node.op == "call_module" else node.name
    if node.op == "output":
        for n in tracked:
            freeze(spaces, layouts[n], f"reaches the model output through {n.name}")
        return None
    if op_kind(node, gm) is not None:
        return LAYER_RULE(node, gm, shapes, layouts, spaces)
    module_rule = MODULE_RULES.get(type(gm.get_submodule(node.target))) if node.op == "call_module" else None
    if module_rule is not None:
        return module_rule(node, gm, shapes, layouts, spaces)
    category = ops.op_category(node, gm)
    if category in OPENING:
        return OP_RULES[category](node, shapes, layouts, spaces)
    if category == ops.SHAPE_QUERIES or not tracked:
        return None
    if node.op == "call_function" and node.target is operator.getitem:
        return GETITEM_RULE(node, shapes, layouts, spaces)
    rule = OP_RULES.get(category)
    result = rule(node, shapes, layouts, spaces) if rule is not None else None
    why = f"used by {name}, an op the dependency pass does not know"
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.MultiheadAttention):
        # As a module it needs num_heads * head_dim == embed_dim == the query's width: no head can go alone.
        why = (f"used by {name}, an nn.MultiheadAttention kept whole (a leaf module); capture it with torch.export "
               "(example_inputs=..., not in leaf_modules) to remove its heads")
    if rule is None:
        for n in tracked:
            freeze(spaces, layouts[n], why)
    return result


def find_channel_groups(gm: fx.GraphModule, example_inputs: Any) -> tuple[ChannelGroup, ...]:
    """Group the coupled channel dimensions of ``gm``; nothing is modified.

    Args:
        gm: a captured ``GraphModule`` (symbolic-trace form, or masked by ``prepare``).
        example_inputs: a tensor or tuple of positional inputs, run once for shapes.

    Returns:
        One :class:`ChannelGroup` per channel space that has members, in the order
        their first producer appears; frozen groups say why.

    Example::

        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        >>> [(g.size, g.prunable) for g in find_channel_groups(gm, torch.randn(1, 4))]
        [(8, True), (2, False)]
    """
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"gm must be a torch.fx.GraphModule, got {type(gm).__name__}")
    shapes: dict[fx.Node, Any] = {}
    run_recording(gm, example_inputs, lambda n, result, a, k: shapes.__setitem__(n, _shape_of(result)))
    spaces = Spaces()
    layouts: dict[fx.Node, Layout | tuple | None] = {}
    for node in gm.graph.nodes:
        try:
            layouts[node] = follow_node(node, gm, shapes, layouts, spaces)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            raise RuntimeError(f"dependency analysis failed at {node.format_node()}: {e}") from e
    return _groups(spaces)


def _groups(spaces: Spaces) -> tuple[ChannelGroup, ...]:
    groups = []
    for resolved in spaces.resolve():
        members = tuple(dict.fromkeys(resolved["members"]))
        if not members:
            continue
        reasons = tuple(dict.fromkeys(resolved["reasons"]))
        groups.append(
            ChannelGroup(
                index=len(groups),
                size=resolved["size"],
                members=members,
                blocks=resolved["blocks"],
                frozen_reason="; ".join(reasons) if reasons else None,
                inexact=tuple(dict.fromkeys(resolved["inexact"])),
            )
        )
    return tuple(groups)
