"""Rules for elementwise ops, pooling and reductions.

An elementwise op (``add``, ``mul``, activations, ...) lines up the channels of its operands
(a residual ``add`` unites both branches' spaces) and slices a parameter combined with them
(a layer scale, a position embedding); pooling over the spatial dims keeps the channel axis;
a reduction keeps it unless it reduces over it.
"""

from __future__ import annotations

from torch import fx
from torch.utils._pytree import tree_flatten

from passes.dependency.layout import Layout, broadcast, first_axis, first_input, freeze
from passes.dependency.spaces import Spaces

__all__ = ["pointwise", "spatial", "reduction"]


def pointwise(node: fx.Node, shapes: dict, layouts: dict, spaces: Spaces) -> Layout | None:
    tensors = [a for a in tree_flatten((node.args, node.kwargs))[0] if isinstance(a, fx.Node)]
    return broadcast(tensors, shapes.get(node), shapes, layouts, spaces, node.name)


def spatial(node: fx.Node, shapes: dict, layouts: dict, spaces: Spaces) -> Layout | None:
    found = first_input(node, layouts, spaces)
    if found is None:
        return None
    x, lay = found
    if len(shapes[x]) + lay.axis != 1 or len(shapes[node]) != len(shapes[x]):
        freeze(spaces, lay, f"{node.name} pools over the channel axis")
        return None
    return Layout(1 - len(shapes[node]), lay.segs)


def reduction(node: fx.Node, shapes: dict, layouts: dict, spaces: Spaces) -> Layout | None:
    found = first_axis(node, shapes, layouts, spaces)
    if found is None:
        return None
    x, lay, rank, pos = found
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    dims = (dims,) if isinstance(dims, int) else dims
    if dims is None or not all(isinstance(d, int) for d in dims) or pos in {d % rank for d in dims}:
        freeze(spaces, lay, f"{node.name} reduces over the channel axis")
        return None
    new_pos = pos if keepdim else pos - sum(d % rank < pos for d in dims)
    return Layout(new_pos - len(shapes[node]), lay.segs)
