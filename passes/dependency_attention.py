"""Attention rules for :mod:`passes.dependency`: heads as channel units.

After a projection's ``[.., H * hd]`` output is viewed as ``[.., H, hd]`` (a
relation from its channels to a head space, see :mod:`passes.channel_spaces`),
the head axis travels among the batch dims of ``q @ k.transpose(-2, -1)``,
``softmax``, ``attn @ v`` and ``F.scaled_dot_product_attention``, which unite
the heads of q, k and v; merging ``[H, hd]`` back gives the output projection's
input columns in blocks of ``hd``. Key/value heads repeated for grouped-query
attention (``expand`` + ``reshape``, ``repeat_interleave``, ``enable_gqa=True``)
are a coarser space: the query heads become their groups. The head dim itself is
never cut.
"""

from __future__ import annotations

from torch import fx

from . import channel_ops as ops
from .channel_spaces import Spaces
from .dependency_rules import Layout, _add_literal, _align, _broadcast, _first, _freeze

__all__ = ["ATTENTION_RULES"]


def _matmul(node: fx.Node, shapes: dict, layouts: dict, spaces: Spaces) -> Layout | None:
    operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
    for t in operands:
        lay = layouts.get(t)
        if isinstance(lay, Layout) and (len(shapes[t]) < 3 or -lay.axis <= 2):
            for u in operands:
                _freeze(spaces, layouts.get(u), f"{node.name} contracts or produces the channel axis")
            return None
    return _broadcast(operands, shapes[node], shapes, layouts, spaces, node.name)


def _softmax(node: fx.Node, shapes: dict, layouts: dict, spaces: Spaces) -> Layout | None:
    found = _first(node, layouts, spaces)
    if found is None:
        return None
    x, lay = found
    if node.op == "call_module":
        dim = node.graph.owning_module.get_submodule(node.target).dim
    else:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    rank = len(shapes[x])
    if not isinstance(dim, int) or dim % rank == rank + lay.axis:
        _freeze(spaces, lay, f"{node.name} normalizes across the channel axis")
        return None
    return lay


def _expand(node: fx.Node, shapes: dict, layouts: dict, spaces: Spaces) -> Layout | None:
    found = _first(node, layouts, spaces)
    if found is None:
        return None
    x, lay = found
    if node.target in ops.EXPANDING:
        if shapes[node][lay.axis] != shapes[x][lay.axis]:
            _freeze(spaces, lay, f"{node.name} broadcasts the channel axis")
            return None
        rank = len(shapes[node])
        _add_literal(spaces, lay, node, rank + lay.axis, rank)
        return lay
    repeats = node.args[1] if len(node.args) > 1 else node.kwargs.get("repeats")
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    rank = len(shapes[x])
    if not isinstance(repeats, int) or not isinstance(dim, int):
        _freeze(spaces, lay, f"{node.name} repeats the channels in a way the pass cannot follow")
        return None
    if dim % rank != rank + lay.axis:
        return lay
    return Layout(lay.axis, tuple((s, inner * repeats) for s, inner in lay.segs))


def _attention(node: fx.Node, shapes: dict, layouts: dict, spaces: Spaces) -> Layout | None:
    names = ("query", "key", "value", "attn_mask")
    args = dict(zip(names, node.args))
    args.update({k: v for k, v in node.kwargs.items() if k in names})
    q, k, v, mask = (args.get(n) for n in names)
    tracked = [t for t in (q, k, v) if isinstance(layouts.get(t), Layout)]
    why = None
    if not isinstance(layouts.get(q), Layout):
        why = f"{node.name} mixes heads with query heads the pass does not track"
    elif any(layouts[t].axis != -3 for t in tracked):
        why = f"{node.name} reads the channels along a dim other than its heads"
    elif isinstance(mask, fx.Node) and len(shapes[mask]) >= 3 and shapes[mask][-3] != 1:
        why = f"{node.name} has a per-head attention mask"
    if why is not None:
        for t in tracked:
            _freeze(spaces, layouts[t], why)
        return None
    ref = layouts[q]
    for t in tracked[1:]:
        lay = layouts[t]
        if node.kwargs.get("enable_gqa") and shapes[t][-3] != shapes[q][-3]:
            repeat = shapes[q][-3] // shapes[t][-3]
            lay = Layout(lay.axis, tuple((s, inner * repeat) for s, inner in lay.segs))
        if not _align(spaces, ref, lay, f"{node.name} attends with differently grouped heads"):
            return None
    return Layout(-3, ref.segs)


ATTENTION_RULES = {ops.MATMULS: _matmul, ops.SOFTMAXES: _softmax, ops.EXPANDS: _expand, ops.ATTENTION: _attention}
