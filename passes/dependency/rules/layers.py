"""Rules for layers: Linear/Conv (producers and consumers), norms and embeddings.

A Linear or Conv consumes the channels of its input (weight columns, dim 1)
and opens a new space for its output (weight rows and bias, dim 0). A depthwise
conv (``groups == in_channels == out_channels``) keeps its input's space: channel
``c`` of the output reads only channel ``c`` of the input, so both go together,
and ``groups`` follows (a functional or exported conv's literal ``groups`` is a
``"literal"`` member). Another grouped conv splits both its input and its output
channels into ``groups`` blocks that must keep equal counts (``ChannelGroup.blocks``);
the columns of each block are cut for the rows of that block only (its input is frozen
when the conv is functional or exported: the module's attributes say how its blocks are
cut). A matrix product ``x @ W`` with a weight stored ``[in, out]`` (transformers'
``Conv1D`` as ``addmm(bias, x, W)``, see :func:`passes.matching.weights.is_transposed_linear`)
is a Linear whose rows are ``W``'s dim 1 and columns its dim 0. BatchNorm, LayerNorm over the
last dim, and GroupNorm keep their input's space and slice their parameters. A functional or
ATen ``layer_norm`` over the last dim does too (``F.layer_norm(x, [C], weight, bias, eps)``, as
``torch.export`` writes ``nn.LayerNorm``): its weight and bias are sliced and the literal ``C``
of ``normalized_shape`` becomes a ``"literal"`` member. Removing a channel changes a LayerNorm's
mean and variance, so every LayerNorm/GroupNorm is listed in the group's ``inexact``. A functional
or ATen ``embedding(weight, indices)`` (``torch.export``'s ``nn.Embedding``; T5's relative position
bias, whose columns are heads) opens a space of the weight's columns, as ``nn.Embedding`` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from passes.dependency.layout import (
    Layout,
    add_module,
    add_sliced,
    first_input,
    freeze,
    member,
    tensor_fqn,
    total,
    tracked_inputs,
)
from passes.dependency.rules.attention import follow_fused_heads
from passes.dependency.spaces import Spaces
from passes.matching.weights import is_transposed_linear, op_arguments, op_kind
from passes.meta import get_sparse_target
from passes.utils import get_tensor

__all__ = ["follow_layer", "follow_module", "layer_norm", "embedding"]


def _layer_parts(node: fx.Node, gm: fx.GraphModule) -> tuple[fx.Node, str | None, str | None, int, str | None]:
    """(input node, weight FQN, bias FQN, groups, module FQN or None for a functional op); a matrix product
    ``x @ W`` has no groups (1)."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        x = node.args[0] if node.args else node.kwargs["input"]
        bias = f"{node.target}.bias" if module.bias is not None else None
        return x, f"{node.target}.weight", bias, getattr(module, "groups", 1), node.target
    bound = op_arguments(node.target, node.args, node.kwargs)
    bias = bound["bias"]
    bias_fqn = tensor_fqn(bias) if bias is not None else None
    if bias is not None and bias_fqn is None:
        bias_fqn = "?"
    # A call_module that prepare() rewrote into F.conv2d(x, mul(weight, mask), ...) still names its module.
    target = get_sparse_target(node)
    module_fqn = target.call_module_fqn if target is not None else None
    return bound["input"], tensor_fqn(bound["weight"]), bias_fqn, bound.get("groups", 1), module_fqn


def _groups_slot(node: fx.Node) -> int | None:
    """The index of a functional conv's positional ``groups`` argument (``F.conv2d``/``aten.conv2d`` 6,
    ``aten.convolution`` 8), or ``None`` when it is not passed positionally."""
    index = 8 if node.target is torch.ops.aten.convolution.default else 6
    return index if len(node.args) > index and isinstance(node.args[index], int) else None


def follow_layer(node: fx.Node, gm: fx.GraphModule, shapes: dict, layouts: dict, spaces: Spaces) -> Layout | None:
    """Members and output layout of a Linear/Conv node (``call_module`` or functional)."""
    linear = op_kind(node, gm) == "linear"
    # x @ W with W stored [in, out]: its output channels are W's dim 1, its inputs dim 0.
    rows, cols = (1, 0) if is_transposed_linear(node, gm) else (0, 1)
    x, weight, bias, groups, module_fqn = _layer_parts(node, gm)
    lay = layouts.get(x)
    lay = lay if isinstance(lay, Layout) else None
    out_rank = len(shapes[node])
    if weight is None or bias == "?":
        freeze(spaces, lay, f"{node.name} computes its weight or bias in the graph")
        return None
    stored = tuple(get_tensor(gm, weight).shape)
    shape = (stored[rows], stored[cols], *stored[2:])  # [out, in, ...] whatever the storage
    depthwise = not linear and groups > 1 and shape[1] == 1 and groups == shape[0]
    if lay is not None:
        pos = len(shapes[x]) + lay.axis
        why = None
        if pos != len(shapes[x]) - 1 if linear else pos != 1:
            why = f"{node.name} reads them along a dim other than its input features"
        elif groups > 1 and module_fqn is None and not depthwise:
            why = f"functional grouped conv {node.name} has a literal groups argument"
        elif depthwise and module_fqn is None and _groups_slot(node) is None:
            why = f"functional depthwise conv {node.name} takes groups as a keyword the pass cannot rewrite"
        elif groups > 1 and not depthwise and (len(lay.segs) > 1 or lay.segs[0][1] != 1):
            why = f"grouped conv {node.name} reads channels from several sources or a flatten"
        elif total(spaces, lay) != shape[1] * groups:
            why = f"{node.name} reads {shape[1] * groups} channels, the pass counted {total(spaces, lay)}"
        if why is not None:
            freeze(spaces, lay, why)
            lay = None
    if depthwise:
        if lay is None:
            s = spaces.new(shape[0])
            spaces.freeze(s, f"depthwise conv {node.name} reads channels that cannot shrink")
            lay = Layout(-1, ((s, 1),))
        out = Layout(1 - out_rank, lay.segs)
        add_sliced(spaces, out, weight, "producer", 0)
        add_sliced(spaces, out, bias, "param", 0)
        add_module(spaces, out, module_fqn)
        if module_fqn is None and _groups_slot(node) is not None:  # the literal groups drops with the channels
            for s, inner in out.segs:
                spaces.add(s, member(node.name, "literal", _groups_slot(node), -1, inner))
        return out
    if lay is not None:
        add_sliced(spaces, lay, weight, "consumer", cols)
        add_module(spaces, lay, module_fqn)
        if groups > 1:
            spaces.set_blocks(lay.segs[0][0], groups)
    if linear and weight.endswith("in_proj_weight"):
        why = follow_fused_heads(node, gm, weight, bias, shapes, spaces)
        if why is None:  # the heads are a space of their own; nothing downstream tracks the fused output
            return None
        out = Layout(-1, ((spaces.new(shape[0]), 1),))
        spaces.freeze(
            out.segs[0][0],
            f"{weight} is nn.MultiheadAttention's fused q/k/v projection in a form the pass does not follow "
            f"({why}): its heads are not removed (call it with need_weights=False as self-attention, or "
            "rewrite it with separate q/k/v Linears)",
        )
        add_sliced(spaces, out, weight, "producer", 0)
        add_sliced(spaces, out, bias, "param", 0)
        return out
    out = Layout(-1 if linear else 1 - out_rank, ((spaces.new(shape[0]), 1),))
    if groups > 1:
        spaces.set_blocks(out.segs[0][0], groups)
    add_sliced(spaces, out, weight, "producer", rows)
    add_sliced(spaces, out, bias, "param", 0)
    add_module(spaces, out, module_fqn)
    return out


def follow_module(node: fx.Node, gm: fx.GraphModule, shapes: dict, layouts: dict, spaces: Spaces) -> Layout | None:
    """Members and output layout of a BatchNorm, LayerNorm, GroupNorm or Embedding ``call_module``."""
    fqn = node.target
    module = gm.get_submodule(fqn)
    if isinstance(module, nn.Embedding):
        out = Layout(-1, ((spaces.new(module.embedding_dim), 1),))
        add_sliced(spaces, out, f"{fqn}.weight", "producer", 1)
        add_module(spaces, out, fqn)
        return out
    x = node.args[0]
    lay = layouts.get(x)
    if not isinstance(lay, Layout):
        freeze(spaces, lay, f"{fqn} reads tracked channels in a way the pass cannot follow")
        return None
    pos = len(shapes[x]) + lay.axis
    names = [n for n, t in module.named_parameters(recurse=False)] + [
        n for n, t in module.named_buffers(recurse=False) if t is not None and t.dim() == 1
    ]
    if any(inner != 1 for _, inner in lay.segs):
        why = f"{fqn} normalizes flattened channels"
    elif isinstance(module, nn.LayerNorm):
        ok = len(module.normalized_shape) == 1 and pos == len(shapes[x]) - 1 and module.weight is not None
        why = None if ok else f"LayerNorm {fqn} normalizes other dims or has no affine weight"
    elif isinstance(module, nn.GroupNorm):
        ok = pos == 1 and module.affine and len(lay.segs) == 1
        why = None if ok else f"GroupNorm {fqn} is not affine or spans several channel sources"
    else:
        why = None if pos == 1 and names else f"BatchNorm {fqn} has no per-channel tensor to slice"
    if why is not None:
        freeze(spaces, lay, why)
        return None
    for name in names:
        add_sliced(spaces, lay, f"{fqn}.{name}", "param", 0)
    add_module(spaces, lay, fqn)
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        for s, _ in lay.segs:
            spaces.inexact[spaces.find(s)].append(f"{type(module).__name__} {fqn} (its statistics count every channel)")
    if isinstance(module, nn.GroupNorm):
        spaces.set_blocks(lay.segs[0][0], module.num_groups)
    return Layout(lay.axis, lay.segs)


def layer_norm(node: fx.Node, shapes: dict, layouts: dict, spaces: Spaces) -> Layout | None:
    """``layer_norm(x, normalized_shape, weight, bias, eps)`` over the channel axis, the last one."""
    found = first_input(node, layouts, spaces)
    if found is None:
        return None
    x, lay = found
    names = ("input", "normalized_shape", "weight", "bias")
    args = dict(zip(names, node.args))
    args.update({k: v for k, v in node.kwargs.items() if k in names})
    size, weight, bias = args.get("normalized_shape"), args.get("weight"), args.get("bias")
    tensors = {"weight": weight, "bias": bias}
    fqns = {k: tensor_fqn(t) for k, t in tensors.items() if t is not None}
    why = None
    if len(node.args) < 2 or not isinstance(size, (list, tuple)) or len(size) != 1 or not isinstance(size[0], int):
        why = f"{node.name} normalizes over several dims or takes normalized_shape in a form the pass cannot rewrite"
    elif len(shapes[x]) + lay.axis != len(shapes[x]) - 1:
        why = f"{node.name} normalizes a dim other than the channel axis"
    elif any(inner != 1 for _, inner in lay.segs):
        why = f"{node.name} normalizes flattened channels"
    elif any(fqn is None for fqn in fqns.values()):
        why = f"{node.name} computes its weight or bias in the graph"
    if why is not None:
        freeze(spaces, lay, why)
        return None
    for fqn in fqns.values():
        add_sliced(spaces, lay, fqn, "param", 0)
    owner = fqns["weight"].rpartition(".")[0] if "weight" in fqns else ""
    for s, inner in lay.segs:
        spaces.add(s, member(node.name, "literal", 1, 0, inner))
        note = f"LayerNorm {owner or node.name} (its statistics count every channel)"
        spaces.inexact[spaces.find(s)].append(note)
    return Layout(lay.axis, lay.segs)



def embedding(node: fx.Node, shapes: dict, layouts: dict, spaces: Spaces) -> Layout | None:
    """``aten.embedding(weight, indices)`` or ``F.embedding(indices, weight)``: a new space of ``weight``'s columns
    on the output's last axis; tracked indices are frozen (they index rows, they carry no channels)."""
    weight = node.args[1] if node.target is F.embedding else node.args[0]
    for n in tracked_inputs(node, layouts):
        freeze(spaces, layouts[n], f"{node.name} reads them as indices")
    fqn = tensor_fqn(weight)
    if fqn is None or len(shapes.get(weight) or ()) != 2:
        return None
    out = Layout(-1, ((spaces.new(shapes[weight][1]), 1),))
    add_sliced(spaces, out, fqn, "producer", 1)
    return out
