"""Remove channels physically: a new, smaller, dense ``GraphModule``.

Given the groups of :func:`passes.dependency.find_channel_groups` and the channels
to remove from each, every member loses those indices: producer weight rows,
consumer weight columns (per block for grouped convs), biases, norm parameters
and running statistics, embedding columns; module attributes (``in_features``,
``out_channels``, ``groups`` of a depthwise conv, ``num_features``,
``normalized_shape``, ``embedding_dim``) follow, and literal sizes in the graph (the
head count of ``view(b, s, 8, 64)``, repeat_kv's ``expand``/``reshape``) are lowered
by the channels removed. The input module is not touched: the result is a deep copy
with new tensors.

A removed channel whose value is the same for every input (its producer rows are
zero, so it carries ``act(bias)``) still adds a constant to each consumer. That
constant is measured by running the input module on ``example_inputs`` and on a
random input, and folded into the consumer's bias (as torch.ao.pruning's
``prune_functions`` propagate biases). The fold is exact for Linears and for convs
without padding; a padded conv sees the constant at its borders only partly, and
a channel that changes with the input cannot be folded at all: the report lists both.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from passes.dependency.analysis import ChannelGroup, run_recording
from passes.shrink.bias import bias_deltas
from passes.shrink.modules import update_module
from passes.matching.weights import op_arguments, op_kind
from passes.utils import get_tensor, split_fqn, tensor_aliases

__all__ = ["ShrinkReport", "shrink_channels", "count_macs"]

@dataclass(frozen=True)
class ShrinkReport:
    """What :func:`shrink_channels` did.

    Attributes:
        params_before, params_after: parameter counts (each tensor once).
        macs_before, macs_after: multiply-accumulates of the Linear/Conv layers
            and LSTM weight products on the example inputs (all of the batch).
        channels: ``{group index: (size before, size after)}`` of shrunk groups.
        folded: consumers whose bias received removed channels' constants.
        inexact: where the shrunk module's output differs from the input module's.
    """

    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    channels: Mapping[int, tuple[int, int]] = field(default_factory=dict)
    folded: tuple[str, ...] = ()
    inexact: tuple[str, ...] = ()

    @property
    def exact(self) -> bool:
        return not self.inexact


def count_macs(gm: fx.GraphModule, example_inputs: Any) -> int:
    """Multiply-accumulates of the Linear/Conv ops and ``nn.LSTM`` weight products of ``gm`` on ``example_inputs``.

    Example::

        >>> count_macs(torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 2))), torch.ones(3, 4))
        24
    """
    total = [0]

    def record(node: fx.Node, result: Any, args: tuple, kwargs: dict) -> None:
        if node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.LSTM:
            total[0] += _lstm_macs(gm.get_submodule(node.target), result[0])
            return
        if op_kind(node, gm) is None:
            return
        if node.op == "call_module":
            weight = gm.get_submodule(node.target).weight
        else:
            weight = op_arguments(node.target, args, kwargs)["weight"]
        # Each output entry reads one row of the weight (a grouped conv's rows hold in_channels / groups columns).
        total[0] += result.numel() * weight[0].numel()

    run_recording(gm, example_inputs, record)
    return total[0]


def _lstm_macs(lstm: nn.LSTM, output: torch.Tensor) -> int:
    """Each time step of each sequence multiplies every weight matrix (gates, recurrence, projection) once."""
    steps = output.numel() // output.shape[-1]
    return steps * sum(w.numel() for name, w in lstm.named_parameters() if name.startswith("weight_"))


def _count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _check(groups: Sequence[ChannelGroup], removed: Mapping[int, Any]) -> dict[int, torch.Tensor]:
    by_index = {g.index: g for g in groups}
    checked = {}
    for index, channels in removed.items():
        group = by_index.get(index)
        if group is None:
            raise ValueError(f"removed names group {index!r}, which does not exist (groups 0..{len(groups) - 1})")
        channels = torch.as_tensor(channels, dtype=torch.long).flatten().unique()
        if channels.numel() == 0:
            continue
        if not group.prunable:
            raise ValueError(f"group {index} cannot shrink: {group.frozen_reason}; remove it from `removed`")
        if channels.min() < 0 or channels.max() >= group.size:
            raise ValueError(f"removed[{index}] holds channels outside 0..{group.size - 1}: {channels.tolist()}")
        if channels.numel() == group.size:
            raise ValueError(f"removed[{index}] removes all {group.size} channels of group {index}; keep at least one")
        counts = torch.bincount(channels // (group.size // group.blocks), minlength=group.blocks)
        if group.blocks > 1 and (counts != counts[0]).any():
            raise ValueError(
                f"group {index} has {group.blocks} blocks (grouped conv or GroupNorm) that must lose equally "
                f"many channels; removed[{index}] takes {counts.tolist()}"
            )
        checked[index] = channels
    return checked


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


def _output_shapes(gm: fx.GraphModule, example_inputs: Any) -> list:
    out = run_recording(gm, example_inputs, lambda *a: None)
    return [tuple(t.shape) for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _bias_fqn(gm: fx.GraphModule, weight_fqn: str) -> str | None:
    owner = gm.get_submodule(split_fqn(weight_fqn)[0])
    bias = getattr(owner, "bias", None)
    if split_fqn(weight_fqn)[1] == "weight" and isinstance(bias, torch.Tensor) and bias.shape == owner.weight.shape[:1]:
        # an exported module keeps plain containers: its Linear's bias is the tensor beside the weight
        return f"{split_fqn(weight_fqn)[0]}.bias" if split_fqn(weight_fqn)[0] else "bias"
    if isinstance(owner, (nn.Linear, nn.modules.conv._ConvNd)):
        if owner.bias is None:
            owner.bias = nn.Parameter(torch.zeros(owner.weight.shape[0], dtype=owner.weight.dtype))
        return f"{split_fqn(weight_fqn)[0]}.bias" if split_fqn(weight_fqn)[0] else "bias"
    if type(owner) is nn.LSTM and owner.bias:  # weight_ih_l0[_reverse] -> bias_ih_l0[_reverse]
        owner_fqn, name = split_fqn(weight_fqn)
        return f"{owner_fqn}.{name.replace('weight_ih_', 'bias_ih_')}".lstrip(".")
    return None


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


def shrink_channels(
    gm: fx.GraphModule,
    groups: Sequence[ChannelGroup],
    removed: Mapping[int, Any],
    example_inputs: Any,
) -> tuple[fx.GraphModule, ShrinkReport]:
    """A copy of ``gm`` without the ``removed`` channels of each group; ``gm`` is not modified.

    Args:
        gm: the module the groups were found on (its masks fused, if it had any).
        groups: from :func:`passes.dependency.find_channel_groups` on ``gm``.
        removed: ``{group index: channel numbers}`` to remove.
        example_inputs: a tensor or tuple, to measure removed channels' constants,
            count MACs and check that the output shapes are kept.

    Returns:
        The new ``GraphModule`` (dense, smaller tensors, not sharing any with ``gm``)
        and a :class:`ShrinkReport`.

    Raises:
        ValueError: a group is frozen, unknown, would lose every channel, or its
            blocks would lose unequal counts; nothing is built then.

    Example::

        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        >>> x = torch.randn(2, 4)
        >>> groups = find_channel_groups(gm, x)
        >>> small, report = shrink_channels(gm, groups, {0: [1, 5]}, x)
        >>> small.get_submodule("0").out_features, report.params_after
        (6, 44)
    """
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"gm must be a torch.fx.GraphModule, got {type(gm).__name__}")
    if not isinstance(removed, Mapping):
        raise TypeError(f"removed must be a dict {{group index: channels}}, got {type(removed).__name__}")
    checked = _check(groups, removed)
    by_index = {g.index: g for g in groups}
    deltas, folded, inexact = bias_deltas(gm, by_index, checked, example_inputs)
    for index in checked:
        inexact += [f"group {index}: {note}" for note in by_index[index].inexact]
    new = copy.deepcopy(gm)
    # Unpickling re-traces with the recorded tracer class; capture's takes arguments, the default does not.
    new._tracer_cls, new._tracer_extras = None, {}
    aliases = {fqn: names for names in tensor_aliases(new).values() for fqn in names}
    plain: dict[tuple[str, int], list[torch.Tensor]] = {}
    grouped: dict[str, list[torch.Tensor]] = {}
    modules = {}
    literals: dict[tuple[str, int, int], int] = {}
    for index, channels in checked.items():
        for m in by_index[index].members:
            if m.kind == "module":
                modules[m.target] = new.get_submodule(m.target)
            elif m.kind == "literal":
                key = (m.target, m.dim, m.offset)
                literals[key] = literals.get(key, 0) + len(channels) * m.inner
            elif m.kind == "consumer" and _is_grouped(new, m.target):
                grouped.setdefault(m.target, []).append(m.indices(channels))
            else:
                plain.setdefault((m.target, m.dim), []).append(m.indices(channels))
    with torch.no_grad():
        for fqn, delta in deltas.items():
            bias = _bias_fqn(new, fqn)
            if bias is None:
                inexact.append(f"{fqn} has no bias to fold the removed channels' constant into")
                continue
            _set_tensor(new, bias, get_tensor(new, bias) + delta, aliases)
            if (fqn, 0) in plain:  # a bias made here is not a member: it loses the rows its weight loses
                plain.setdefault((bias, 0), list(plain[(fqn, 0)]))
        for (fqn, dim), parts in plain.items():
            tensor = get_tensor(new, fqn)
            keep = _keep(tensor.shape[dim], torch.cat(parts))
            _set_tensor(new, fqn, tensor.index_select(dim, keep).clone(), aliases)
        for fqn, parts in grouped.items():
            groups_of = new.get_submodule(split_fqn(fqn)[0]).groups
            _set_tensor(new, fqn, _cut_grouped_columns(get_tensor(new, fqn), groups_of, torch.cat(parts)), aliases)
    for module in modules.values():
        update_module(module)
    _rewrite_literals(new.graph, literals)
    new.recompile()
    before, after = _output_shapes(gm, example_inputs), _output_shapes(new, example_inputs)
    if before != after:
        raise RuntimeError(f"shrinking changed the output shapes from {before} to {after}: a dependency was missed")
    report = ShrinkReport(
        params_before=_count_params(gm),
        params_after=_count_params(new),
        macs_before=count_macs(gm, example_inputs),
        macs_after=count_macs(new, example_inputs),
        channels={i: (by_index[i].size, by_index[i].size - len(c)) for i, c in checked.items()},
        folded=tuple(dict.fromkeys(folded)),
        inexact=tuple(dict.fromkeys(inexact)),
    )
    return new, report
