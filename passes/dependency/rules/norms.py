"""Rules for functional batch and group norms: ``F.batch_norm``/``F.group_norm`` and their ATen ops.

A model that calls the functional form on its own tensors (timm's ``BatchNormAct2d`` and
``GroupNorm1``, which symbolic tracing goes through) or a ``torch.export`` capture of
``nn.BatchNorm2d``/``nn.GroupNorm`` (``aten.batch_norm``, ``aten.group_norm``) normalizes the
channel axis, dim 1, with per-channel tensors: the norm keeps its input's space, and its weight,
bias and running statistics are sliced (``"param"`` members), like the modules'. The owner of the
weight, when it is a BatchNorm/GroupNorm module, follows as a ``"module"`` member. A batch norm in
eval mode is a per-channel affine map, so removing a channel is exact; a group norm's statistics
count every channel of its group (the group is ``inexact``), and its ``num_groups`` blocks must keep
equal counts (``ChannelGroup.blocks``), so ``num_groups`` itself never changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from passes.dependency.layout import Layout, add_module, add_sliced, first_input, freeze, tensor_fqn
from passes.dependency.spaces import Spaces

__all__ = ["batch_norm", "group_norm"]

aten = torch.ops.aten
# The positions of each form's arguments.
_ARGUMENTS = {
    F.batch_norm: ("input", "running_mean", "running_var", "weight", "bias", "training"),
    torch.batch_norm: ("input", "weight", "bias", "running_mean", "running_var", "training"),
    aten.batch_norm.default: ("input", "weight", "bias", "running_mean", "running_var", "training"),
    F.group_norm: ("input", "num_groups", "weight", "bias"),
    torch.group_norm: ("input", "num_groups", "weight", "bias"),
    aten.group_norm.default: ("input", "num_groups", "weight", "bias"),
}


def _arguments(node: fx.Node) -> dict:
    args = dict(zip(_ARGUMENTS[node.target], node.args))
    args.update({k: v for k, v in node.kwargs.items() if k in _ARGUMENTS[node.target]})
    return args


def _slice_tensors(node: fx.Node, lay: Layout, tensors: dict, spaces: Spaces) -> str | None:
    """Slice the norm's per-channel tensors at dim 0 and add the module owning them; the norm's name (its owner's
    FQN, or the node's), or ``None`` (after freezing) when one is computed in the graph."""
    fqns = {name: tensor_fqn(t) for name, t in tensors.items() if t is not None}
    computed = [name for name, fqn in fqns.items() if fqn is None]
    if computed:
        freeze(spaces, lay, f"{node.name} computes its {', '.join(computed)} in the graph")
        return None
    for fqn in fqns.values():
        add_sliced(spaces, lay, fqn, "param", 0)
    owner_fqn = next(iter(fqns.values()), "").rpartition(".")[0]
    owner = node.graph.owning_module.get_submodule(owner_fqn) if fqns else None
    if isinstance(owner, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):  # its num_features/num_channels follow
        add_module(spaces, lay, owner_fqn)
    return owner_fqn or node.name


def batch_norm(node: fx.Node, shapes: dict, layouts: dict, spaces: Spaces) -> Layout | None:
    """``batch_norm(x, ...)`` over dim 1: the input's space, its four per-channel tensors sliced."""
    found = first_input(node, layouts, spaces)
    if found is None:
        return None
    x, lay = found
    args = _arguments(node)
    if len(shapes[x]) + lay.axis != 1 or any(inner != 1 for _, inner in lay.segs):
        freeze(spaces, lay, f"{node.name} normalizes a dim other than the channel axis, or flattened channels")
        return None
    names = ("weight", "bias", "running_mean", "running_var")
    if _slice_tensors(node, lay, {n: args.get(n) for n in names}, spaces) is None:
        return None
    return Layout(lay.axis, lay.segs)


def group_norm(node: fx.Node, shapes: dict, layouts: dict, spaces: Spaces) -> Layout | None:
    """``group_norm(x, num_groups, weight, bias)`` over dim 1: the input's space in ``num_groups`` blocks, inexact."""
    found = first_input(node, layouts, spaces)
    if found is None:
        return None
    x, lay = found
    args = _arguments(node)
    groups = args.get("num_groups")
    why = None
    if len(shapes[x]) + lay.axis != 1 or any(inner != 1 for _, inner in lay.segs):
        why = f"{node.name} normalizes a dim other than the channel axis, or flattened channels"
    elif not isinstance(groups, int):
        why = f"{node.name} takes num_groups in a form the pass cannot read"
    elif len(lay.segs) > 1 and groups > 1:
        why = f"{node.name} normalizes groups of channels from several sources"
    if why is not None:
        freeze(spaces, lay, why)
        return None
    name = _slice_tensors(node, lay, {"weight": args.get("weight"), "bias": args.get("bias")}, spaces)
    if name is None:
        return None
    for s, _ in lay.segs:
        spaces.inexact[spaces.find(s)].append(f"GroupNorm {name} (its statistics count every channel)")
    spaces.set_blocks(lay.segs[0][0], groups)
    return Layout(lay.axis, lay.segs)
