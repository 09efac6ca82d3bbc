"""Rules for ops that move the channel axis or cut it into pieces.

``transpose``/``permute`` move it; ``cat`` along it chains the spaces of its inputs
(each whole, at increasing offsets), along another dim it lines them up; ``split``
and ``chunk`` along it hand each piece the spaces it covers, cutting a space where a
piece ends inside it (:meth:`passes.dependency.spaces.Spaces.split`: GPT-2's q/k/v from
one ``c_attn``). Pieces of a list of sizes (``split_with_sizes``, ``split(x, [8, 6])``)
shrink on their own, each size a ``"literal"`` member of its piece; pieces of one size
(``split(x, 32)``, ``chunk``) must stay equal, so they are united, the size a literal of
their group. Indexing, ATen ``slice`` and ``select`` are followed when they leave the
channel axis whole.
"""

from __future__ import annotations

from typing import Any

from torch import fx

from passes.dependency import op_categories as ops
from passes.dependency.layout import Layout, align, broadcast, first_axis, freeze, member
from passes.dependency.spaces import Spaces

__all__ = ["transpose", "concat", "split", "getitem", "slice_"]


def transpose(node: fx.Node, shapes: dict, layouts: dict, spaces: Spaces) -> Layout | None:
    found = first_axis(node, shapes, layouts, spaces)
    if found is None:
        return None
    x, lay, rank, pos = found
    dims = node.args[1:]
    if node.target in ops.PERMUTES:
        dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
        order = [d % rank for d in dims]
        new_pos = order.index(pos)
    else:
        a, b = (d % rank for d in dims)
        new_pos = b if pos == a else a if pos == b else pos
    return Layout(new_pos - rank, lay.segs)


def concat(node: fx.Node, shapes: dict, layouts: dict, spaces: Spaces) -> Layout | None:
    tensors = list(node.args[0])
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    out = shapes[node]
    tracked = [layouts[t] for t in tensors if isinstance(layouts.get(t), Layout)]
    if len({t.axis for t in tracked}) != 1 or dim % len(out) != len(out) + tracked[0].axis:
        return broadcast(tensors, out, shapes, layouts, spaces, node.name)
    segs: list[tuple[int, int]] = []
    for t in tensors:
        if isinstance(layouts.get(t), Layout):
            segs += layouts[t].segs
            continue
        s = spaces.new(shapes[t][dim])
        spaces.freeze(s, f"{node.name} concatenates it with {t.name}, whose channels are not tracked")
        segs.append((s, 1))
    return Layout(tracked[0].axis, tuple(segs))


def _sizes_arg(node: fx.Node) -> Any:
    """The split size or list of sizes ``node`` was called with (positionally, where the shrink can rewrite it),
    ``None`` for ``chunk``, ``False`` when neither an int nor a list of ints."""
    if node.target in ops.CHUNKS:
        return None
    sizes = node.args[1] if len(node.args) > 1 else None
    if isinstance(sizes, int) or (isinstance(sizes, (list, tuple)) and all(isinstance(n, int) for n in sizes)):
        return sizes
    return False


def _cut(spaces: Spaces, segs: list[tuple[int, int]], width: int) -> list[tuple[int, int]] | None:
    """Take ``width`` channels' worth of segments off the front of ``segs``, splitting the space a piece ends in;
    ``None`` when the cut falls inside a channel's ``inner`` entries."""
    taken = []
    while width > 0 and segs:
        s, inner = segs.pop(0)
        size = spaces.size[spaces.find(s)]
        if size * inner <= width:
            taken.append((s, inner))
            width -= size * inner
            continue
        if width % inner:
            return None
        head, tail = spaces.split(s, [width // inner, size - width // inner])
        taken.append((head, inner))
        segs.insert(0, (tail, inner))
        width = 0
    return taken if width == 0 else None


def split(node: fx.Node, shapes: dict, layouts: dict, spaces: Spaces) -> tuple | None:
    found = first_axis(node, shapes, layouts, spaces)
    if found is None:
        return None
    x, lay, rank, pos = found
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    pieces = shapes[node]
    if dim % rank != pos:
        return tuple(lay for _ in pieces)
    sizes = _sizes_arg(node)
    if sizes is False:
        freeze(spaces, lay, f"{node.name} splits the channel axis at sizes the pass cannot rewrite")
        return None
    result, segs = [], list(lay.segs)
    for piece in pieces:
        taken = _cut(spaces, segs, piece[pos])
        if taken is None:
            freeze(spaces, lay, f"{node.name} splits the channel axis inside a channel's entries")
            return None
        result.append(Layout(lay.axis, tuple(taken)))
    if isinstance(sizes, (list, tuple)):
        for k, piece in enumerate(result):
            for s, inner in piece.segs:
                spaces.add(s, member(node.name, "literal", 1, k, inner))
        return tuple(result)
    # Pieces of one size stay equal when each loses the same channels: they are one group.
    if not all(align(spaces, result[0], other, f"{node.name} splits into unequal pieces") for other in result[1:]):
        return None
    if isinstance(sizes, int):
        for s, inner in result[0].segs:
            spaces.add(s, member(node.name, "literal", 1, -1, inner))
    return tuple(result)


def getitem(node: fx.Node, shapes: dict, layouts: dict, spaces: Spaces) -> Layout | None:
    x, index = node.args
    if isinstance(layouts.get(x), tuple):
        return layouts[x][index] if isinstance(index, int) else None
    lay, rank = layouts[x], len(shapes[x])
    pos = rank + lay.axis
    index = index if isinstance(index, tuple) else (index,)
    known = all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in index)
    if not known or sum(i is Ellipsis for i in index) > 1:
        freeze(spaces, lay, f"{node.name} indexes the channel axis in a way the pass cannot follow")
        return None
    real = sum(i is not None and i is not Ellipsis for i in index)
    expanded = [e for i in index for e in ([slice(None)] * (rank - real) if i is Ellipsis else [i])]
    src = dst = 0
    for i in expanded:
        if i is None:
            dst += 1
            continue
        if src == pos:
            if i != slice(None):
                freeze(spaces, lay, f"{node.name} indexes the channel axis")
                return None
            break
        src, dst = src + 1, dst + (not isinstance(i, int))
    return Layout(dst + (pos - src) - len(shapes[node]), lay.segs)


def slice_(node: fx.Node, shapes: dict, layouts: dict, spaces: Spaces) -> Layout | None:
    """ATen ``slice.Tensor(x, dim, start, end, step)`` and ``select.int(x, dim, index)``: followed off the channel
    axis, or when a slice keeps the channel axis whole."""
    found = first_axis(node, shapes, layouts, spaces)
    if found is None:
        return None
    x, lay, rank, pos = found
    dim = node.args[1] if len(node.args) > 1 else 0
    if not isinstance(dim, int):
        freeze(spaces, lay, f"{node.name} slices a dim the pass cannot tell")
        return None
    dim %= rank
    if dim == pos and (node.target is ops.aten.select.int or shapes[node] != shapes[x]):
        freeze(spaces, lay, f"{node.name} slices the channel axis")
        return None
    if node.target is ops.aten.select.int and dim > pos:
        return Layout(lay.axis + 1, lay.segs)
    return lay

