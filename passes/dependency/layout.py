"""Layouts and the helpers every dependency rule shares (:mod:`passes.dependency.rules`).

A tensor's *layout* says which axis carries tracked channels (counted from the
end, so broadcasting lines axes up) and which spaces sit along it, in order: a
concatenation holds several, each whole. ``inner`` counts the consecutive
entries per channel after a flatten merged the channel with the dims behind it.
A rule is a function ``(node, shapes, layouts, spaces) -> layout of node's output``
that either follows the channels or freezes what it cannot follow, with the reason;
the helpers here add members to spaces, freeze layouts and line up broadcast operands.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from math import prod
from typing import Any

from torch import fx

from passes.dependency import op_categories as ops
from passes.dependency.records import Member
from passes.dependency.spaces import Spaces
from passes.meta import get_sparse_target

__all__ = [
    "Layout",
    "member",
    "total",
    "freeze",
    "add_sliced",
    "add_module",
    "tensor_fqn",
    "tracked_inputs",
    "align",
    "broadcast",
    "first_input",
    "first_axis",
    "size_slot",
    "literal_at",
    "add_literal",
    "add_param_view",
]


@dataclass(frozen=True)
class Layout:
    axis: int  # negative: counted from the last dim
    segs: tuple[tuple[int, int], ...]  # (space, inner) along the axis


def member(target: str, kind: str, dim: int = 0, offset: int = 0, inner: int = 1) -> Member:
    return Member(target, kind, dim, offset, inner)


def total(spaces: Spaces, layout: Layout) -> int:
    return sum(spaces.size[spaces.find(s)] * inner for s, inner in layout.segs)


def freeze(spaces: Spaces, layout: Layout | tuple | None, reason: str) -> None:
    if isinstance(layout, tuple):
        for part in layout:
            freeze(spaces, part, reason)
    elif layout is not None:
        for s, _ in layout.segs:
            spaces.freeze(s, reason)


def add_sliced(spaces: Spaces, layout: Layout, target: str | None, kind: str, dim: int) -> None:
    """Add ``target`` sliced along ``dim`` to every space of ``layout``, at its offset."""
    if target is None:
        return
    offset = 0
    for s, inner in layout.segs:
        spaces.add(s, member(target, kind, dim, offset, inner))
        offset += spaces.size[spaces.find(s)] * inner


def add_module(spaces: Spaces, layout: Layout, module_fqn: str | None) -> None:
    for s, _ in layout.segs if module_fqn is not None else ():
        spaces.add(s, member(module_fqn, "module"))


def tensor_fqn(node: Any) -> str | None:
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        return node.target
    target = get_sparse_target(node)
    return target.tensor_fqn if target is not None and target.role == "mask_mul" else None


def tracked_inputs(node: fx.Node, layouts: dict) -> list[fx.Node]:
    return [n for n in node.all_input_nodes if layouts.get(n) is not None]


def align(spaces: Spaces, a: Layout, b: Layout, why: str) -> bool:
    sizes = lambda lay: [(spaces.size[spaces.find(s)], inner) for s, inner in lay.segs]  # noqa: E731
    if a.axis == b.axis and len(a.segs) == len(b.segs) == 1 and total(spaces, a) == total(spaces, b):
        (s, i), (t, j) = a.segs[0], b.segs[0]
        if i != j and max(i, j) % min(i, j) == 0:  # one is the other repeated: query heads vs repeated KV heads
            fine, coarse = (s, t) if i < j else (t, s)
            spaces.relate(fine, coarse, max(i, j) // min(i, j))
            return True
    if a.axis != b.axis or sizes(a) != sizes(b):
        freeze(spaces, a, why)
        freeze(spaces, b, why)
        return False
    for (s, _), (t, _) in zip(a.segs, b.segs):
        spaces.union(s, t)
    return True


def broadcast(
    tensors: list[fx.Node], out_shape: Any, shapes: dict, layouts: dict, spaces: Spaces, name: str
) -> Layout | None:
    """Channels of tensors combined elementwise line up; a parameter with the full channel size is sliced."""
    tracked = [layouts[t] for t in tensors if isinstance(layouts.get(t), Layout)]
    if not tracked or not isinstance(out_shape, tuple) or not all(isinstance(d, int) for d in out_shape):
        return None
    # One tracked channel broadcast across many (MobileViTv2's context scores times its keys) couples nothing: that
    # channel cannot go alone, the others line up without it.
    single = [lay for lay in tracked
              if total(spaces, lay) == 1 and -lay.axis <= len(out_shape) and out_shape[lay.axis] > 1]
    for lay in single:
        freeze(spaces, lay, f"{name} broadcasts its one channel across the channel axis")
    tracked = [lay for lay in tracked if all(lay is not one for one in single)]
    if not tracked:
        return None
    ref = tracked[0]
    if not all(align(spaces, ref, other, f"{name} combines differently laid-out channels") for other in tracked[1:]):
        return None
    if -ref.axis > len(out_shape) or out_shape[ref.axis] != total(spaces, ref):
        freeze(spaces, ref, f"{name} broadcasts the channel axis")
        return None
    for t in tensors:
        shape = shapes.get(t)
        if layouts.get(t) is not None or not isinstance(shape, tuple) or len(shape) < -ref.axis or shape[ref.axis] == 1:
            continue
        if t.op == "get_attr":
            add_sliced(spaces, ref, t.target, "param", len(shape) + ref.axis)
        elif not add_expanded(spaces, ref, t, shapes) and not add_param_view(spaces, ref, t, shapes):
            freeze(spaces, ref, f"{name} combines it with {t.name}, whose channels are not tracked")
    return ref


def add_expanded(spaces: Spaces, ref: Layout, node: fx.Node, shapes: dict) -> bool:
    """A parameter expanded along other dims (ViT's ``class_token.expand(n, -1, -1)``) is sliced at its channel
    dim, and a literal size the expand writes there is recorded; ``False`` when ``node`` is no such expand."""
    param = node.args[0] if node.target in ("expand", ops.aten.expand.default) and node.args else None
    fqn, shape = tensor_fqn(param), shapes.get(param)
    if fqn is None or not isinstance(shape, tuple) or len(shape) < -ref.axis:
        return False
    rank = len(shapes[node])
    if shape[ref.axis] != 1:  # else every channel reads the same broadcast value: nothing to slice
        add_sliced(spaces, ref, fqn, "param", len(shape) + ref.axis)
    add_literal(spaces, ref, node, rank + ref.axis, rank)
    return True


def _is_view(node: Any) -> bool:
    """Whether ``node`` reshapes, expands or copies its first argument, and reads no other tensor."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method") or not node.args:
        return False
    if not isinstance(node.args[0], fx.Node) or any(isinstance(a, fx.Node) for a in node.args[1:]):
        return False
    return node.target in ops.VIEWS


def add_param_view(spaces: Spaces, ref: Layout, node: fx.Node, shapes: dict) -> bool:
    """A per-channel parameter viewed to line up with the channel axis (timm's layer scale
    ``gamma.reshape(1, -1, 1, 1)``, ``bias.view(1, C, 1)``, possibly expanded last) is sliced at its one
    non-1 dim, and the literal sizes its views write there are recorded; ``False`` when ``node`` is no such view."""
    chain, t = [], node
    while tensor_fqn(t) is None:
        if not _is_view(t):
            return False
        chain.append(t)
        t = t.args[0]
    channels, shape = total(spaces, ref), shapes.get(t)
    if not chain or not isinstance(shape, tuple) or channels < 2 or prod(shape) != channels:
        return False
    pos = shape.index(channels)
    places = []
    for n, x in zip(reversed(chain), [t, *reversed(chain[1:])]):  # from the parameter to node
        out, expanded = shapes[n], n.target in ops.EXPANDING
        if expanded:  # an expand keeps its input's dims at the end
            pos += len(out) - len(shapes[x])
        elif prod(out) != channels:  # a view after an expand: the channel dim is lost among the copies
            return False
        else:
            pos = out.index(channels)
        places.append((n, pos))
    if pos != len(shapes[node]) + ref.axis:
        return False
    add_sliced(spaces, ref, tensor_fqn(t), "param", shape.index(channels))
    for n, p in places:
        add_literal(spaces, ref, n, p, len(shapes[n]))
    return True


def first_input(node: fx.Node, layouts: dict, spaces: Spaces) -> tuple[fx.Node, Layout] | None:
    x = node.args[0]
    others = [n for n in tracked_inputs(node, layouts) if n is not x]
    if not isinstance(layouts.get(x), Layout) or others:
        for n in tracked_inputs(node, layouts):
            freeze(spaces, layouts[n], f"{node.name} reads tracked channels in a way the pass cannot follow")
        return None
    return x, layouts[x]


def first_axis(node: fx.Node, shapes: dict, layouts: dict, spaces: Spaces) -> tuple[fx.Node, Layout, int, int] | None:
    """:func:`first_input` with the input's rank and the channel axis's position in it: ``(x, layout, rank, pos)``."""
    found = first_input(node, layouts, spaces)
    if found is None:
        return None
    x, lay = found
    return x, lay, len(shapes[x]), len(shapes[x]) + lay.axis


def size_slot(node: fx.Node, p: int, rank: int) -> tuple[int, int] | None:
    """Where the size of output dim ``p`` is written in a view/reshape/expand ``node``: ``(argument, position)``
    (position ``-1``: the argument itself, as in ``x.view(b, 8, 64)``), or ``None``."""
    if node.target not in ops.SIZED_RESHAPES and node.target not in ops.EXPANDING:
        return None
    if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)):
        return (1, p) if len(node.args[1]) == rank else None
    return (1 + p, -1) if len(node.args) == 1 + rank else None


def literal_at(node: fx.Node, slot: tuple[int, int]) -> Any:
    """The value at ``slot`` (see :func:`_size_slot`) of ``node``'s arguments."""
    arg, pos = slot
    return node.args[arg] if pos < 0 else node.args[arg][pos]


def add_literal(spaces: Spaces, layout: Layout, node: fx.Node, p: int, rank: int) -> None:
    """Record the literal size of output dim ``p`` (if it is one) as a member of every space of ``layout``:
    it drops by ``inner`` for each removed channel, and :mod:`passes.shrink` rewrites it."""
    slot = size_slot(node, p, rank)
    if node.target in ops.SIZED_RESHAPES and len(node.args) == 2 and isinstance(node.args[1], fx.Node):
        # Sizes computed in the graph: x.view(x.size()[:-1] + (nf,)), as transformers' Conv1D writes it, holds its
        # literal in the tuple added to the input's sizes.
        sizes, slot = node.args[1], None
        tail = sizes.args[1] if sizes.target is operator.add and len(sizes.args) == 2 else None
        if isinstance(tail, tuple) and p >= rank - len(tail):
            node, slot = sizes, (1, p - rank + len(tail))
    if slot is None or not isinstance(literal_at(node, slot), int) or literal_at(node, slot) == -1:
        return
    for s, inner in layout.segs:
        spaces.add(s, member(node.name, "literal", slot[0], slot[1], inner))


