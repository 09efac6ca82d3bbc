"""Rules for attention: heads as channel units.

After a projection's ``[.., H * hd]`` output is viewed as ``[.., H, hd]`` (a
relation from its channels to a head space, see :mod:`passes.dependency.spaces`),
the head axis travels among the batch dims of ``q @ k.transpose(-2, -1)``,
``softmax``, ``attn @ v`` and ``F.scaled_dot_product_attention``, which unite
the heads of q, k and v; merging ``[H, hd]`` back gives the output projection's
input columns in blocks of ``hd``. Key/value heads repeated for grouped-query
attention (``expand`` + ``reshape``, ``repeat_interleave``, ``enable_gqa=True``)
are a coarser space: the query heads become their groups. The head dim itself is
never cut.

``nn.MultiheadAttention`` captured by ``torch.export`` computes q, k and v with one
fused ``in_proj_weight`` (rows ``[q; k; v]``) and folds the heads into the batch
(``view(q, [T, B * H, hd])``), which the general rules cannot follow. Its
self-attention decomposition (``need_weights=False``, as ``nn.TransformerEncoderLayer``
and torchvision's ViT call it) is matched node by node instead
(:func:`follow_fused_heads`): a head is then rows ``h*hd .. h*hd+hd-1`` of each
third of ``in_proj_weight``/``in_proj_bias`` and the same columns of ``out_proj``,
and the literal sizes ``E``, ``H`` and ``B * H`` of the decomposition are recorded
for :mod:`passes.shrink` to lower. Any other form is refused with the reason.
"""

from __future__ import annotations

import operator

from torch import fx

from passes.dependency import op_categories as ops
from passes.dependency.layout import Layout, add_literal, align, broadcast, first_input, freeze, member, tensor_fqn
from passes.dependency.spaces import Spaces
from passes.matching.weights import op_arguments, op_kind

__all__ = ["matmul", "softmax", "expand", "attention", "follow_fused_heads"]

aten = ops.aten
# The packed self-attention prologue of F.multi_head_attention_forward, as torch.export writes it:
# linear -> unflatten(-1, [3, E]) -> unsqueeze(0) -> transpose(0, -2) -> squeeze(-2) -> contiguous -> select(0, i).
_PACKED = ((aten.unsqueeze.default, (0,)), (aten.transpose.int, (0, -2)), (aten.squeeze.dim, (-2,)),
           (aten.contiguous.default, ()))


def matmul(node: fx.Node, shapes: dict, layouts: dict, spaces: Spaces) -> Layout | None:
    operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
    for t in operands:
        lay = layouts.get(t)
        if isinstance(lay, Layout) and (len(shapes[t]) < 3 or -lay.axis <= 2):
            for u in operands:
                freeze(spaces, layouts.get(u), f"{node.name} contracts or produces the channel axis")
            return None
    return broadcast(operands, shapes[node], shapes, layouts, spaces, node.name)


def softmax(node: fx.Node, shapes: dict, layouts: dict, spaces: Spaces) -> Layout | None:
    found = first_input(node, layouts, spaces)
    if found is None:
        return None
    x, lay = found
    if node.op == "call_module":
        dim = node.graph.owning_module.get_submodule(node.target).dim
    else:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    rank = len(shapes[x])
    if not isinstance(dim, int) or dim % rank == rank + lay.axis:
        freeze(spaces, lay, f"{node.name} normalizes across the channel axis")
        return None
    return lay


def expand(node: fx.Node, shapes: dict, layouts: dict, spaces: Spaces) -> Layout | None:
    if node.target in ("expand_as", aten.expand_as.default):  # x.expand_as(other): other gives only the shape
        x = node.args[0]
        if not isinstance(layouts.get(x), Layout):
            freeze(spaces, layouts.get(x), f"{node.name} expands channels the pass cannot follow")
            return None
        found = x, layouts[x]
    else:
        found = first_input(node, layouts, spaces)
    if found is None:
        return None
    x, lay = found
    if node.target in ops.EXPANDING:
        if shapes[node][lay.axis] != shapes[x][lay.axis]:
            freeze(spaces, lay, f"{node.name} broadcasts the channel axis")
            return None
        rank = len(shapes[node])
        add_literal(spaces, lay, node, rank + lay.axis, rank)
        return lay
    repeats = node.args[1] if len(node.args) > 1 else node.kwargs.get("repeats")
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    rank = len(shapes[x])
    if not isinstance(repeats, int) or not isinstance(dim, int):
        freeze(spaces, lay, f"{node.name} repeats the channels in a way the pass cannot follow")
        return None
    if dim % rank != rank + lay.axis:
        return lay
    return Layout(lay.axis, tuple((s, inner * repeats) for s, inner in lay.segs))


def attention(node: fx.Node, shapes: dict, layouts: dict, spaces: Spaces) -> Layout | None:
    names = ("query", "key", "value", "attn_mask")
    args = dict(zip(names, node.args))
    args.update({k: v for k, v in node.kwargs.items() if k in names})
    q, k, v, mask = (args.get(n) for n in names)
    tracked = [t for t in (q, k, v) if isinstance(layouts.get(t), Layout)]
    per_head = isinstance(mask, fx.Node) and len(shapes[mask]) >= 3 and shapes[mask][-3] != 1
    if per_head and isinstance(layouts.get(mask), Layout):  # a bias computed per head (T5's position bias)
        tracked.append(mask)
    why = None
    if not isinstance(layouts.get(q), Layout):
        why = f"{node.name} mixes heads with query heads the pass does not track"
    elif any(layouts[t].axis != -3 for t in tracked):
        why = f"{node.name} reads the channels along a dim other than its heads"
    elif per_head and mask not in tracked:
        why = f"{node.name} has a per-head attention mask whose heads the pass does not track"
    if why is not None:
        for t in tracked:
            freeze(spaces, layouts[t], why)
        return None
    ref = layouts[q]
    for t in tracked[1:]:
        lay = layouts[t]
        if node.kwargs.get("enable_gqa") and t is not mask and shapes[t][-3] != shapes[q][-3]:
            repeat = shapes[q][-3] // shapes[t][-3]
            lay = Layout(lay.axis, tuple((s, inner * repeat) for s, inner in lay.segs))
        if not align(spaces, ref, lay, f"{node.name} attends with differently grouped heads"):
            return None
    return Layout(-3, ref.segs)


def _only_user(node: fx.Node, target: object, args: tuple = ()) -> fx.Node:
    users = list(node.users)
    if len(users) != 1 or users[0].target is not target or tuple(users[0].args[1 : 1 + len(args)]) != args:
        raise LookupError(f"the decomposition differs at {node.name}, which should feed one {target}{list(args)}")
    return users[0]


def _match_fused(node: fx.Node, shapes: dict) -> dict:
    """The nodes of an exported nn.MultiheadAttention self-attention after its in_proj ``node``, or LookupError."""
    width = shapes[node][-1] // 3
    x = _only_user(node, aten.unflatten.int, (-1, [3, width]))
    unflatten = x
    for target, args in _PACKED:
        x = _only_user(x, target, args)
    selects = sorted(x.users, key=lambda n: n.args[2] if len(n.args) > 2 else -1)
    if [(n.target, n.args[1:]) for n in selects] != [(aten.select.int, (0, i)) for i in range(3)]:
        raise LookupError(f"{x.name} is not split into q, k and v (cross-attention or kdim/vdim)")
    folded, unfolded = [], []
    for select in selects:
        folded.append(_only_user(select, aten.view.default))
        unfolded.append(_only_user(_only_user(folded[-1], aten.transpose.int, (0, 1)), aten.view.default))
    attention = {n for v in unfolded for n in v.users}
    if len(attention) != 1 or next(iter(attention)).target is not aten.scaled_dot_product_attention.default:
        raise LookupError("q, k and v do not meet in one scaled_dot_product_attention (need_weights=True?)")
    sdpa = attention.pop()
    if list(sdpa.args[:3]) != unfolded:
        raise LookupError(f"{sdpa.name} does not read q, k and v in order")
    mask = sdpa.args[3] if len(sdpa.args) > 3 else sdpa.kwargs.get("attn_mask")
    if isinstance(mask, fx.Node) and len(shapes[mask]) >= 3 and shapes[mask][-3] != 1:
        raise LookupError(f"{sdpa.name} has a per-head attention mask")
    merged = _only_user(_only_user(sdpa, aten.permute.default, ([2, 0, 1, 3],)), aten.reshape.default)
    out_proj = list(merged.users)
    if len(out_proj) != 1 or out_proj[0].op != "call_function" or op_arguments(
        out_proj[0].target, out_proj[0].args, out_proj[0].kwargs
    ).get("input") is not merged:
        raise LookupError(f"{merged.name} does not feed out_proj alone")
    return {"unflatten": unflatten, "folded": folded, "unfolded": unfolded, "merged": merged, "out_proj": out_proj[0]}


def follow_fused_heads(
    node: fx.Node, gm: fx.GraphModule, weight: str, bias: str | None, shapes: dict, spaces: Spaces
) -> str | None:
    """Add the heads of the exported nn.MultiheadAttention whose fused in_proj is ``node`` as one channel space;
    ``None`` when matched, else why not (nothing is added then)."""
    try:
        found = _match_fused(node, shapes)
    except LookupError as e:
        return str(e)
    if op_kind(found["out_proj"], gm) != "linear":
        return f"{found['out_proj'].name} is not out_proj's linear"
    out_proj = found["out_proj"]
    out_weight = tensor_fqn(op_arguments(out_proj.target, out_proj.args, out_proj.kwargs)["weight"])
    width = shapes[node][-1] // 3
    batch, heads, _, head_dim = shapes[found["unfolded"][0]]
    merged_sizes = found["merged"].args[1]
    if out_weight is None or heads * head_dim != width or merged_sizes[-1] != width:
        return "its q/k/v widths, heads and out_proj do not line up"
    space = spaces.new(heads)
    for offset in (0, width, 2 * width):
        spaces.add(space, member(weight, "producer", 0, offset, head_dim))
        if bias is not None:
            spaces.add(space, member(bias, "param", 0, offset, head_dim))
    spaces.add(space, member(out_weight, "consumer", 1, 0, head_dim))
    literals = {(found["unflatten"].name, 2, 1, head_dim), (found["merged"].name, 1, len(merged_sizes) - 1, head_dim)}
    for folded, unfolded in zip(found["folded"], found["unfolded"]):
        if len(unfolded.args[1]) != 4 or unfolded.args[1][1] != heads or len(folded.args[1]) != 3:
            spaces.freeze(space, f"{folded.name} or {unfolded.name} has sizes the pass cannot read")
            continue
        literals.add((unfolded.name, 1, 1, 1))
        size = folded.args[1][1]
        if isinstance(size, fx.Node) and size.target is operator.mul and size.args[1] == heads:
            literals.add((folded.name, 1, 1, 1))  # sym_size * H with a dynamic batch, often shared by several layers
        elif size == batch * heads:
            literals.add((folded.name, 1, 1, batch))
        else:
            spaces.freeze(space, f"{folded.name} folds the heads into the batch with a size the pass cannot read")
    for name, arg, pos, per in sorted(literals):
        spaces.add(space, member(name, "literal", arg, pos, per))
    return None
