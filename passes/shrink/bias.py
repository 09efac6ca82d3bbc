"""Fold the constants carried by removed channels into the next layers' biases, for :mod:`passes.shrink`.

A removed channel whose producer rows are zero carries ``act(bias)`` (after any
BatchNorm, activation, pooling): the same value for every input. Running the
unshrunk module on the example inputs and on a random input shows which removed
channels are constant at each consumer; their contribution (``W[:, c] @ value``,
or the conv of a constant image) moves into the consumer's bias (``bias_ih_l0``
for an LSTM reading them). Units removed from an LSTM vary with the input, so the
columns that read them inside the LSTM must be zero for the removal to be exact, unless
the units are silent: every gate row and bias entry of theirs zero (as ChannelPruner's
masks make them), a unit's cell and hidden state stay exactly 0 from the zero initial state
(``c = sigmoid(0) c + sigmoid(0) tanh(0) = 0``), and it feeds nothing. Columns read inside a
function that :mod:`passes.dependency.rules.wrapped` follows (Swin's window attention) are not
measured either: they are reported unless zero.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from passes.dependency.analysis import run_recording
from passes.dependency.records import ChannelGroup, Member
from passes.matching.weights import is_transposed_linear, op_arguments, op_kind
from passes.utils import get_tensor, split_fqn

__all__ = ["bias_deltas"]

_CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _consumer_nodes(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """Weight FQN -> the Linear/Conv nodes reading it."""
    found: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if _is_lstm(node, gm):  # its input columns: layer 0's weight_ih, per direction
            for sfx in ("", "_reverse"):
                if hasattr(gm.get_submodule(node.target), f"weight_ih_l0{sfx}"):
                    found.setdefault(f"{node.target}.weight_ih_l0{sfx}", []).append(node)
            continue
        if op_kind(node, gm) is None:
            continue
        if node.op == "call_module":
            fqn = f"{node.target}.weight"
        else:
            weight = op_arguments(node.target, node.args, node.kwargs)["weight"]
            fqn = weight.target if isinstance(weight, fx.Node) and weight.op == "get_attr" else None
        if fqn is not None:
            found.setdefault(fqn, []).append(node)
    return found


def _is_lstm(node: fx.Node, gm: fx.GraphModule) -> bool:
    return node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.LSTM


def _random_like(args: tuple) -> tuple:
    return tuple(torch.randn_like(a) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _measure(gm: fx.GraphModule, example_inputs: Any, wanted: dict[str, list[tuple[Member, torch.Tensor]]]):
    """For each (weight FQN, member, channels): the removed channels' input values over two runs."""
    nodes = _consumer_nodes(gm)
    targets: dict[fx.Node, list[str]] = {}  # a bidirectional LSTM reads its input with two weights
    for fqn in wanted:
        for node in nodes.get(fqn, []):
            targets.setdefault(node, []).append(fqn)
    seen: dict[tuple[str, Member], list[torch.Tensor]] = {}

    def record(node: fx.Node, result: Any, args: tuple, kwargs: dict) -> None:
        if node not in targets:
            return
        x = args[0] if node.op == "call_module" else op_arguments(node.target, args, kwargs)["input"]
        axis = -1 if _is_lstm(node, gm) or op_kind(node, gm) == "linear" else 1
        for fqn, (member, channels) in ((f, w) for f in targets[node] for w in wanted[f]):
            values = x.index_select(axis, member.indices(channels)).movedim(axis, -1)
            seen.setdefault((fqn, member), []).append(values.reshape(-1, values.shape[-1]))

    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    run_recording(gm, args, record)
    run_recording(gm, _random_like(args), record)
    return seen


def _constant(values: list[torch.Tensor]) -> torch.Tensor | None:
    rows = torch.cat(values)
    const = rows[0]
    tol = 1e-6 * (1 + const.abs())
    return const if bool(((rows - const).abs() <= tol).all()) else None


def _layer(gm: fx.GraphModule, node: fx.Node) -> tuple[torch.Tensor, int, tuple, bool]:
    """(weight, groups, dilation, padded) of a Linear/Conv node; the weight of ``x @ W`` (stored ``[in, out]``)
    transposed to ``[out, in]``."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.Linear):
            return module.weight, 1, (), False
        padding = module.padding
        padded = padding != "valid" if isinstance(padding, str) else any(p != 0 for p in padding)
        return module.weight, module.groups, tuple(module.dilation), padded
    bound = op_arguments(node.target, node.args, node.kwargs)
    weight = get_tensor(gm, bound["weight"].target)
    if is_transposed_linear(node, gm):
        return weight.t(), 1, (), False
    if weight.dim() == 2:
        return weight, 1, (), False
    ndim = weight.dim() - 2
    dilation = bound["dilation"] if isinstance(bound["dilation"], (tuple, list)) else (bound["dilation"],) * ndim
    padding = bound["padding"]
    if isinstance(padding, str):
        return weight, bound["groups"], tuple(dilation), padding != "valid"
    padded = any(p != 0 for p in torch.atleast_1d(torch.tensor(padding)).tolist())
    return weight, bound["groups"], tuple(dilation), padded


def _reads(weight: torch.Tensor, groups: int, channels: torch.Tensor) -> bool:
    """Whether any weight column at input indices ``channels`` is non-zero (a grouped conv's are per block)."""
    if groups == 1:
        return bool(weight.index_select(1, channels).any())
    per_group = weight.shape[1]
    blocks = weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])
    return any(bool(blocks[c // per_group, :, c % per_group].any()) for c in channels.tolist())


def _delta(weight: torch.Tensor, groups: int, dilation: tuple, member: Member, channels: torch.Tensor,
           const: torch.Tensor) -> torch.Tensor:
    """What the constant ``const`` on ``channels`` adds to each output of the layer (away from padding)."""
    if weight.dim() == 2:
        return weight[:, member.indices(channels)] @ const.to(weight.dtype)
    ndim = weight.dim() - 2
    extent = [(k - 1) * d + 1 for k, d in zip(weight.shape[2:], dilation)]
    image = torch.zeros(1, weight.shape[1] * groups, *extent, dtype=weight.dtype)
    image[0, member.indices(channels)] = const.to(weight.dtype).reshape(-1, *[1] * ndim)
    return _CONVS[ndim](image, weight, None, 1, 0, dilation, groups).flatten()


def _silent(gm: fx.GraphModule, group: ChannelGroup, channels: torch.Tensor) -> bool:
    """Whether every producer row and parameter entry (biases) of ``channels`` in ``group`` is zero."""
    for m in group.members:
        if m.kind not in ("producer", "param"):
            continue
        tensor = get_tensor(gm, m.target)
        if bool(tensor.detach().movedim(m.dim, 0)[m.indices(channels)].any()):
            return False
    return True


def bias_deltas(
    gm: fx.GraphModule, groups: dict[int, ChannelGroup], removed: dict[int, torch.Tensor], example_inputs: Any
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Per consumer weight FQN, what to add to its bias; plus the consumers folded and the inexact notes.

    Args:
        gm: the module before shrinking (run twice, in eval mode, without gradients).
        groups: the channel groups by index.
        removed: channels removed per group index (validated).
        example_inputs: inputs for the runs.
    """
    wanted: dict[str, list[tuple[Member, torch.Tensor]]] = {}
    owner: dict[Member, int] = {}
    for index, channels in removed.items():
        for member in groups[index].consumers:
            wanted.setdefault(member.target, []).append((member, channels))
            owner[member] = index
    deltas: dict[str, torch.Tensor] = {}
    folded, inexact = [], []
    if not wanted:
        return deltas, folded, inexact
    nodes = _consumer_nodes(gm)
    for (fqn, member), values in _measure(gm, example_inputs, wanted).items():
        index, channels = owner[member], removed[owner[member]]
        if _is_lstm(nodes[fqn][0], gm):  # the gates add W_ih @ x to bias_ih: a Linear's fold
            weight, layer_groups, dilation, padded = get_tensor(gm, fqn), 1, (), False
        else:
            weight, layer_groups, dilation, padded = _layer(gm, nodes[fqn][0])
        if not _reads(weight, layer_groups, member.indices(channels)):
            continue  # the consumer's columns are zero (masked) too: the channels add nothing
        const = _constant(values)
        if const is None:
            inexact.append(
                f"group {index}: the removed channels carry values that vary with the input or the position "
                f"into {fqn}: not folded"
            )
            continue
        if not bool(const.any()):
            continue
        delta = _delta(weight.detach(), layer_groups, dilation, member, channels, const)
        deltas[fqn] = deltas[fqn] + delta if fqn in deltas else delta
        folded.append(fqn)
        if padded:
            inexact.append(
                f"group {index}: {fqn} is a padded conv; the removed channels' constant is folded into its "
                "bias, which is exact away from the borders only"
            )
    # Read inside an LSTM (its recurrence, its next layer) or inside a function the dependency rules know (Swin's
    # window attention): not measured.
    for fqn in wanted.keys() - nodes.keys():
        lstm = isinstance(gm.get_submodule(split_fqn(fqn)[0]), nn.LSTM)
        where = "the LSTM" if lstm else "the function that reads it"
        for member, channels in wanted[fqn]:
            if _silent(gm, groups[owner[member]], channels):
                continue
            if _reads(get_tensor(gm, fqn).movedim(member.dim, 1), 1, member.indices(channels)):
                inexact.append(
                    f"group {owner[member]}: the removed units still feed {fqn} inside {where} (its columns for "
                    "them are not zero; ChannelPruner(mask_consumers=True) zeroes them where they have a mask): "
                    "not folded"
                )
    return deltas, folded, inexact
