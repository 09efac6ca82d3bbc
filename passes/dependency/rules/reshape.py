"""The rule for view/reshape/flatten: merging the channel axis with the dims behind it, or splitting it into heads.

``[.., C, H, W] -> [.., C * H * W]`` (a flatten into a Linear) keeps the channels with
``inner = H * W`` entries each; ``[.., H * hd] -> [.., H, hd]`` relates the channels to a
space of ``H`` heads of ``hd`` channels (see :mod:`passes.dependency.rules.attention`). A
literal size at the channel axis is recorded for :mod:`passes.shrink` to lower.
"""

from __future__ import annotations

from math import prod

from torch import fx

from passes.dependency.layout import Layout, add_literal, first_input, freeze, total
from passes.dependency.spaces import Spaces

__all__ = ["reshape"]


def reshape(node: fx.Node, shapes: dict, layouts: dict, spaces: Spaces) -> Layout | None:
    found = first_input(node, layouts, spaces)
    if found is None:
        return None
    x, lay = found
    src, out = shapes[x], shapes[node]
    pos, channels = len(src) + lay.axis, total(spaces, lay)
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
        freeze(spaces, lay, f"{node.name} reshapes the channel axis in a way the pass cannot follow")
        return None
    if out[p] not in merged:  # [.., H * hd] -> [.., H, hd]: whole heads of hd channels
        heads = spaces.new(out[p])
        spaces.relate(lay.segs[0][0], heads, out[p + 1])
        result = Layout(p - len(out), ((heads, 1),))
        add_literal(spaces, result, node, p, len(out))
        return result
    inner = out[p] // src[pos]
    result = Layout(p - len(out), tuple((s, i * inner) for s, i in lay.segs))
    add_literal(spaces, result, node, p, len(out))
    return result
