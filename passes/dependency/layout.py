"""The rules of :mod:`passes.dependency`: channel spaces (a union-find) and how each op moves them.

A tensor's *layout* says which axis carries tracked channels (counted from the
end, so broadcasting lines axes up) and which spaces sit along it, in order: a
concatenation holds several, each whole. ``inner`` counts the consecutive
entries per channel after a flatten merged the channel with the dims behind it.
One small function per op family; all of them either return the output's layout,
or freeze what they cannot follow, with the reason.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from math import prod
from typing import Any

from torch import fx, nn
from torch.utils._pytree import tree_flatten

from passes.dependency import op_categories as ops
from passes.matching.weights import op_kind
from passes.meta import get_sparse_target
from passes.dependency.spaces import Spaces

__all__ = ["Layout", "follow_node"]


@dataclass(frozen=True)
class Layout:
    axis: int  # negative: counted from the last dim
    segs: tuple[tuple[int, int], ...]  # (space, inner) along the axis


def _member(target: str, kind: str, dim: int = 0, offset: int = 0, inner: int = 1) -> Any:
    from passes.dependency.analysis import Member  # the record type lives with the public API

    return Member(target, kind, dim, offset, inner)


def _total(spaces: Spaces, layout: Layout) -> int:
    return sum(spaces.size[spaces.find(s)] * inner for s, inner in layout.segs)


def _freeze(spaces: Spaces, layout: Layout | tuple | None, reason: str) -> None:
    if isinstance(layout, tuple):
        for part in layout:
            _freeze(spaces, part, reason)
    elif layout is not None:
        for s, _ in layout.segs:
            spaces.freeze(s, reason)


def _add_sliced(spaces: Spaces, layout: Layout, target: str | None, kind: str, dim: int) -> None:
    """Add ``target`` sliced along ``dim`` to every space of ``layout``, at its offset."""
    if target is None:
        return
    offset = 0
    for s, inner in layout.segs:
        spaces.add(s, _member(target, kind, dim, offset, inner))
        offset += spaces.size[spaces.find(s)] * inner


def _add_module(spaces: Spaces, layout: Layout, module_fqn: str | None) -> None:
    for s, _ in layout.segs if module_fqn is not None else ():
        spaces.add(s, _member(module_fqn, "module"))


def _tensor_fqn(node: Any) -> str | None:
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        return node.target
    target = get_sparse_target(node)
    return target.tensor_fqn if target is not None and target.role == "mask_mul" else None


def _inputs(node: fx.Node, layouts: dict) -> list[fx.Node]:
    return [n for n in node.all_input_nodes if layouts.get(n) is not None]


def follow_node(
    node: fx.Node, gm: fx.GraphModule, shapes: dict, layouts: dict, spaces: Spaces
) -> Layout | tuple | None:
    """The layout of ``node``'s output, after adding its members to the spaces it touches."""
    if node.op in ("placeholder", "get_attr"):
        return None
    tracked = _inputs(node, layouts)
    name = node.target if node.op == "call_module" else node.name
    if node.op == "output":
        for n in tracked:
            _freeze(spaces, layouts[n], f"reaches the model output through {n.name}")
        return None
    if op_kind(node, gm) is not None:
        from passes.dependency.rules.layers import follow_layer

        return follow_layer(node, gm, shapes, layouts, spaces)
    if node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.LSTM:
        from passes.dependency.rules.lstm import follow_lstm

        return follow_lstm(node, gm, shapes, layouts, spaces)
    if node.op == "call_module" and type(gm.get_submodule(node.target)) in _NORMS:
        from passes.dependency.rules.layers import follow_module

        return follow_module(node, gm, shapes, layouts, spaces)
    category = ops.op_category(node, gm)
    if category == ops.SHAPE_QUERIES or not tracked:
        return None
    if node.op == "call_function" and node.target is operator.getitem:
        return _getitem(node, shapes, layouts, spaces)
    rule = _RULES.get(category)
    result = rule(node, shapes, layouts, spaces) if rule is not None else None
    why = f"used by {name}, an op the dependency pass does not know"
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.MultiheadAttention):
        # As a module it needs num_heads * head_dim == embed_dim == the query's width: no head can go alone.
        why = (f"used by {name}, an nn.MultiheadAttention kept whole (a leaf module); capture it with torch.export "
               "(example_inputs=..., not in leaf_modules) to remove its heads")
    if rule is None:
        for n in tracked:
            _freeze(spaces, layouts[n], why)
    return result


_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.Embedding)


def _align(spaces: Spaces, a: Layout, b: Layout, why: str) -> bool:
    sizes = lambda lay: [(spaces.size[spaces.find(s)], inner) for s, inner in lay.segs]  # noqa: E731
    if a.axis == b.axis and len(a.segs) == len(b.segs) == 1 and _total(spaces, a) == _total(spaces, b):
        (s, i), (t, j) = a.segs[0], b.segs[0]
        if i != j and max(i, j) % min(i, j) == 0:  # one is the other repeated: query heads vs repeated KV heads
            fine, coarse = (s, t) if i < j else (t, s)
            spaces.relate(fine, coarse, max(i, j) // min(i, j))
            return True
    if a.axis != b.axis or sizes(a) != sizes(b):
        _freeze(spaces, a, why)
        _freeze(spaces, b, why)
        return False
    for (s, _), (t, _) in zip(a.segs, b.segs):
        spaces.union(s, t)
    return True


def _broadcast(
    tensors: list[fx.Node], out_shape: Any, shapes: dict, layouts: dict, spaces: Spaces, name: str
) -> Layout | None:
    """Channels of tensors combined elementwise line up; a parameter with the full channel size is sliced."""
    tracked = [layouts[t] for t in tensors if isinstance(layouts.get(t), Layout)]
    if not tracked or not isinstance(out_shape, tuple) or not all(isinstance(d, int) for d in out_shape):
        return None
    ref = tracked[0]
    if not all(_align(spaces, ref, other, f"{name} combines differently laid-out channels") for other in tracked[1:]):
        return None
    if -ref.axis > len(out_shape) or out_shape[ref.axis] != _total(spaces, ref):
        _freeze(spaces, ref, f"{name} broadcasts the channel axis")
        return None
    for t in tensors:
        shape = shapes.get(t)
        if layouts.get(t) is not None or not isinstance(shape, tuple) or len(shape) < -ref.axis or shape[ref.axis] == 1:
            continue
        if t.op == "get_attr":
            _add_sliced(spaces, ref, t.target, "param", len(shape) + ref.axis)
        elif not _add_expanded(spaces, ref, t, shapes):
            _freeze(spaces, ref, f"{name} combines it with {t.name}, whose channels are not tracked")
    return ref


def _add_expanded(spaces: Spaces, ref: Layout, node: fx.Node, shapes: dict) -> bool:
    """A parameter expanded along other dims (ViT's ``class_token.expand(n, -1, -1)``) is sliced at its channel
    dim, and a literal size the expand writes there is recorded; ``False`` when ``node`` is no such expand."""
    param = node.args[0] if node.target in ("expand", ops.aten.expand.default) and node.args else None
    fqn, shape = _tensor_fqn(param), shapes.get(param)
    if fqn is None or not isinstance(shape, tuple) or len(shape) < -ref.axis:
        return False
    rank = len(shapes[node])
    if shape[ref.axis] != 1:  # else every channel reads the same broadcast value: nothing to slice
        _add_sliced(spaces, ref, fqn, "param", len(shape) + ref.axis)
    _add_literal(spaces, ref, node, rank + ref.axis, rank)
    return True


def _pointwise(node: fx.Node, shapes: dict, layouts: dict, spaces: Spaces) -> Layout | None:
    tensors = [a for a in tree_flatten((node.args, node.kwargs))[0] if isinstance(a, fx.Node)]
    return _broadcast(tensors, shapes.get(node), shapes, layouts, spaces, node.name)


def _first(node: fx.Node, layouts: dict, spaces: Spaces) -> tuple[fx.Node, Layout] | None:
    x = node.args[0]
    others = [n for n in _inputs(node, layouts) if n is not x]
    if not isinstance(layouts.get(x), Layout) or others:
        for n in _inputs(node, layouts):
            _freeze(spaces, layouts[n], f"{node.name} reads tracked channels in a way the pass cannot follow")
        return None
    return x, layouts[x]


def _spatial(node: fx.Node, shapes: dict, layouts: dict, spaces: Spaces) -> Layout | None:
    found = _first(node, layouts, spaces)
    if found is None:
        return None
    x, lay = found
    if len(shapes[x]) + lay.axis != 1 or len(shapes[node]) != len(shapes[x]):
        _freeze(spaces, lay, f"{node.name} pools over the channel axis")
        return None
    return Layout(1 - len(shapes[node]), lay.segs)


def _reduction(node: fx.Node, shapes: dict, layouts: dict, spaces: Spaces) -> Layout | None:
    found = _first(node, layouts, spaces)
    if found is None:
        return None
    x, lay = found
    rank, pos = len(shapes[x]), len(shapes[x]) + lay.axis
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    dims = (dims,) if isinstance(dims, int) else dims
    if dims is None or not all(isinstance(d, int) for d in dims) or pos in {d % rank for d in dims}:
        _freeze(spaces, lay, f"{node.name} reduces over the channel axis")
        return None
    new_pos = pos if keepdim else pos - sum(d % rank < pos for d in dims)
    return Layout(new_pos - len(shapes[node]), lay.segs)


def _size_slot(node: fx.Node, p: int, rank: int) -> tuple[int, int] | None:
    """Where the size of output dim ``p`` is written in a view/reshape/expand ``node``: ``(argument, position)``
    (position ``-1``: the argument itself, as in ``x.view(b, 8, 64)``), or ``None``."""
    if node.target not in ops.SIZED_RESHAPES and node.target not in ops.EXPANDING:
        return None
    if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)):
        return (1, p) if len(node.args[1]) == rank else None
    return (1 + p, -1) if len(node.args) == 1 + rank else None


def _literal_at(node: fx.Node, slot: tuple[int, int]) -> Any:
    """The value at ``slot`` (see :func:`_size_slot`) of ``node``'s arguments."""
    arg, pos = slot
    return node.args[arg] if pos < 0 else node.args[arg][pos]


def _add_literal(spaces: Spaces, layout: Layout, node: fx.Node, p: int, rank: int) -> None:
    """Record the literal size of output dim ``p`` (if it is one) as a member of every space of ``layout``:
    it drops by ``inner`` for each removed channel, and :mod:`passes.shrink` rewrites it."""
    slot = _size_slot(node, p, rank)
    if slot is None or not isinstance(_literal_at(node, slot), int) or _literal_at(node, slot) == -1:
        return
    for s, inner in layout.segs:
        spaces.add(s, _member(node.name, "literal", slot[0], slot[1], inner))


def _reshape(node: fx.Node, shapes: dict, layouts: dict, spaces: Spaces) -> Layout | None:
    found = _first(node, layouts, spaces)
    if found is None:
        return None
    x, lay = found
    src, out = shapes[x], shapes[node]
    pos, channels = len(src) + lay.axis, _total(spaces, lay)
    lead, p, acc = prod(src[:pos]), 0, 1
    while p < len(out) and acc < lead:
        acc *= out[p]
        p += 1
    while p < len(out) - 1 and out[p] == 1 and channels != 1:
        p += 1
    merged = [prod(src[pos : k + 1]) for k in range(pos, len(src))]
    split = (
        p < len(out) - 1 and out[p] * out[p + 1] == channels and prod(src[pos + 1 :]) == prod(out[p + 2 :])
        and len(lay.segs) == 1 and lay.segs[0][1] == 1 and out[p] > 1
    )
    if acc != lead or p >= len(out) or (out[p] not in merged and not split):
        _freeze(spaces, lay, f"{node.name} reshapes the channel axis in a way the pass cannot follow")
        return None
    if out[p] not in merged:  # [.., H * hd] -> [.., H, hd]: whole heads of hd channels
        heads = spaces.new(out[p])
        spaces.relate(lay.segs[0][0], heads, out[p + 1])
        result = Layout(p - len(out), ((heads, 1),))
        _add_literal(spaces, result, node, p, len(out))
        return result
    inner = out[p] // src[pos]
    result = Layout(p - len(out), tuple((s, i * inner) for s, i in lay.segs))
    _add_literal(spaces, result, node, p, len(out))
    return result


_RULES = {
    ops.POINTWISE: _pointwise,
    ops.SPATIAL: _spatial,
    ops.REDUCTIONS: _reduction,
    ops.RESHAPES: _reshape,
}

# The rules below build on the ones above.
from passes.dependency.rules.attention import ATTENTION_RULES  # noqa: E402
from passes.dependency.rules.layers import NORM_RULES  # noqa: E402
from passes.dependency.rules.moves import MOVE_RULES, _getitem  # noqa: E402

_RULES.update(MOVE_RULES)
_RULES.update(NORM_RULES)
_RULES.update(ATTENTION_RULES)
