"""Remove channels physically, in place: the module's layers become smaller and dense.

Given a :class:`~passes.shrink.plan.ShrinkPlan`, every member of a shrunk group loses the
planned indices: producer weight rows, consumer weight columns (per block for grouped convs),
biases, norm parameters and running statistics, embedding columns; module attributes
(``in_features``, ``out_channels``, ``groups`` of a depthwise conv, ``num_features``,
``normalized_shape``, ``embedding_dim``) follow, and literal sizes in the graph (the head count
of ``view(b, s, 8, 64)``, repeat_kv's ``expand``/``reshape``) are lowered by the channels
removed. The plan's bias folds are added to the consumers' biases (a Linear/Conv without a
bias gets one).

Like every pass, :func:`remove_channels` rewrites the module it is given and returns it: its
submodules' attributes and graph change, while the tensors it replaces are never written to
(the new ones are fresh), so a clone sharing tensors (:func:`passes.utils.clone_sharing_tensors`)
is all a caller must make to keep its module.
"""

from __future__ import annotations

import copy
import operator
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn

from passes.dependency.records import ChannelGroup
from passes.shrink.modules import update_module
from passes.shrink.plan import ShrinkPlan, bias_fqn, output_shapes, plan_shrink
from passes.shrink.report import ShrinkReport, compare_shrunk
from passes.utils import get_tensor, split_fqn, tensor_aliases

__all__ = ["remove_channels", "shrink_channels"]


def _set_tensor(gm: fx.GraphModule, fqn: str, value: torch.Tensor, aliases: dict[str, list[str]]) -> None:
    old = get_tensor(gm, fqn)
    for alias in aliases.get(fqn, [fqn]):
        owner, name = split_fqn(alias)
        module = gm.get_submodule(owner)
        if isinstance(old, nn.Parameter):
            module._parameters[name] = nn.Parameter(value, requires_grad=old.requires_grad)
        elif name in module._buffers:
            module._buffers[name] = value
        else:
            setattr(module, name, value)


def _keep(size: int, drop: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(size, dtype=torch.bool)
    keep[drop] = False
    return keep.nonzero().flatten()


def _is_grouped(gm: fx.GraphModule, weight_fqn: str) -> bool:
    module = gm.get_submodule(split_fqn(weight_fqn)[0])
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and module.weight.shape[1] > 1


def _cut_grouped_columns(weight: torch.Tensor, groups: int, drop: torch.Tensor) -> torch.Tensor:
    """Drop input channels ``drop`` (global numbers) from a grouped conv weight, each block from its own rows."""
    per_group = weight.shape[1]
    rows = weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])
    blocks = [rows[k][:, _keep(per_group, drop[drop // per_group == k] - k * per_group)] for k in range(groups)]
    return torch.cat(blocks)


def _ensure_bias(gm: fx.GraphModule, bias: str) -> bool:
    """Give a Linear/Conv without a bias a zero one, to receive a fold; whether one was made."""
    owner = gm.get_submodule(split_fqn(bias)[0])
    if isinstance(owner, (nn.Linear, nn.modules.conv._ConvNd)) and owner.bias is None:
        owner.bias = nn.Parameter(torch.zeros(owner.weight.shape[0], dtype=owner.weight.dtype))
        return True
    return False


def _lowered(graph: fx.Graph, node: fx.Node, size: Any, drop: int, made: dict) -> Any:
    """``size - drop`` for a literal int, or a ``sym * (k - drop)`` node for a ``sym * k`` node (which
    torch.export shares among layers, so it is not changed in place; one new node per new value)."""
    if isinstance(size, int):
        return size - drop
    if isinstance(size, fx.Node) and size.target is operator.mul and isinstance(size.args[1], int):
        key = (size, size.args[1] - drop)
        if key not in made:
            with graph.inserting_after(size):
                made[key] = graph.call_function(operator.mul, (size.args[0], key[1]))
        return made[key]
    raise RuntimeError(f"{node.format_node()} has no literal size to lower by {drop}")


def _rewrite_literals(graph: fx.Graph, drops: Mapping[tuple[str, int, int], int]) -> None:
    """Lower each literal size (node name, argument, position in a list or -1) by its removed count."""
    nodes = {n.name: n for n in graph.nodes}
    replaced, made = [], {}
    for (name, arg, pos), drop in drops.items():
        node = nodes.get(name)
        if node is None:
            raise RuntimeError(f"the literal size of node {name!r} was recorded, but the graph has no such node")
        args = list(node.args)
        if pos < 0:
            replaced.append(args[arg])
            args[arg] = _lowered(graph, node, args[arg], drop, made)
        else:
            sizes = list(args[arg])
            replaced.append(sizes[pos])
            sizes[pos] = _lowered(graph, node, sizes[pos], drop, made)
            args[arg] = type(node.args[arg])(sizes)
        node.args = tuple(args)
    for old in dict.fromkeys(n for n in replaced if isinstance(n, fx.Node)):
        if not old.users:
            graph.erase_node(old)


def remove_channels(gm: fx.GraphModule, plan: ShrinkPlan) -> fx.GraphModule:
    """Remove the channels of ``plan`` from ``gm``, in place, and fold its bias constants.

    Args:
        gm: the module ``plan`` was made on, or a clone of it (see the module docstring).
        plan: from :func:`passes.shrink.plan_shrink`.

    Returns:
        ``gm``, shrunk and recompiled; its output shapes on the plan's example inputs are those the plan recorded.

    Raises:
        RuntimeError: the output shapes changed (a dependency the analysis missed) or a recorded literal size is
            gone from the graph.

    Example::

        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        >>> x = torch.randn(2, 4)
        >>> plan = plan_shrink(gm, find_channel_groups(gm, x), {0: [1, 5]}, x)
        >>> small = remove_channels(clone_sharing_tensors(gm), plan)
        >>> small.get_submodule("0").out_features, gm.get_submodule("0").out_features
        (6, 8)
    """
    # Unpickling a plain GraphModule re-traces with the recorded tracer class; capture's takes arguments.
    gm._tracer_cls, gm._tracer_extras = None, {}
    aliases = {fqn: names for names in tensor_aliases(gm).values() for fqn in names}
    plain: dict[tuple[str, int], list[torch.Tensor]] = {}
    grouped: dict[str, list[torch.Tensor]] = {}
    modules = {}
    literals: dict[tuple[str, int, int], int] = {}
    for index, channels in plan.channels.items():
        for m in plan.groups[index].members:
            if m.kind == "module":
                modules[m.target] = gm.get_submodule(m.target)
            elif m.kind == "literal":
                key = (m.target, m.dim, m.offset)
                literals[key] = literals.get(key, 0) + len(channels) * m.inner
            elif m.kind == "consumer" and _is_grouped(gm, m.target):
                grouped.setdefault(m.target, []).append(m.indices(channels))
            else:
                plain.setdefault((m.target, m.dim), []).append(m.indices(channels))
    with torch.no_grad():
        for fqn, delta in plan.bias_deltas.items():
            bias = bias_fqn(gm, fqn)
            if bias is None:
                continue  # the plan lists it as inexact
            made = _ensure_bias(gm, bias)
            _set_tensor(gm, bias, get_tensor(gm, bias) + delta, aliases)
            if made and (fqn, 0) in plain:  # a bias made here is not a member: it loses the rows its weight loses
                plain.setdefault((bias, 0), list(plain[(fqn, 0)]))
        for (fqn, dim), parts in plain.items():
            tensor = get_tensor(gm, fqn)
            keep = _keep(tensor.shape[dim], torch.cat(parts))
            _set_tensor(gm, fqn, tensor.index_select(dim, keep).clone(), aliases)
        for fqn, parts in grouped.items():
            groups_of = gm.get_submodule(split_fqn(fqn)[0]).groups
            _set_tensor(gm, fqn, _cut_grouped_columns(get_tensor(gm, fqn), groups_of, torch.cat(parts)), aliases)
    for module in modules.values():
        update_module(module)
    _rewrite_literals(gm.graph, literals)
    gm.recompile()
    after = output_shapes(gm, plan.example_inputs)
    if after != plan.output_shapes:
        raise RuntimeError(
            f"shrinking changed the output shapes from {list(plan.output_shapes)} to {list(after)}: a dependency was missed"
        )
    return gm


def shrink_channels(
    gm: fx.GraphModule,
    groups: Sequence[ChannelGroup],
    removed: Mapping[int, Any],
    example_inputs: Any,
) -> tuple[fx.GraphModule, ShrinkReport]:
    """Deprecated: ``plan_shrink``, ``remove_channels`` on a deep copy, and ``compare_shrunk``, in one call.

    Returns a deep copy of ``gm`` without the ``removed`` channels (sharing no tensor with ``gm``) and its
    :class:`ShrinkReport`, as fx_sparsity 0.1.0 did; ``gm`` is not modified.
    """
    warnings.warn(
        "passes.shrink_channels(gm, groups, removed, x) is deprecated: use plan = passes.shrink.plan_shrink(gm, "
        "groups, removed, x); small = passes.shrink.remove_channels(clone_sharing_tensors(gm), plan); "
        "report = passes.shrink.compare_shrunk(gm, small, plan)",
        DeprecationWarning,
        stacklevel=2,
    )
    plan = plan_shrink(gm, groups, removed, example_inputs)
    new = remove_channels(copy.deepcopy(gm), plan)
    return new, compare_shrunk(gm, new, plan)
