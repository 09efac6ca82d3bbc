"""Decide how to shrink, before anything changes: the checked channels, the bias folds, the notes.

:func:`plan_shrink` validates the channels to remove from each group of
:func:`passes.dependency.find_channel_groups` and measures what the removed channels still
carry: a channel whose value is the same for every input (its producer rows are zero, so it
carries ``act(bias)``) adds a constant to each consumer, which :func:`passes.shrink.remove_channels`
folds into the consumer's bias (as torch.ao.pruning's ``prune_functions`` propagate biases).
The constant is measured by running the module on ``example_inputs`` and on a random input.
The fold is exact for Linears and for convs without padding; a padded conv sees the constant
at its borders only partly, and a channel that changes with the input cannot be folded at
all: the plan's ``inexact`` lists both, with the groups' own notes (LayerNorm statistics).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from passes.dependency.analysis import run_recording
from passes.dependency.records import ChannelGroup
from passes.shrink.bias import bias_deltas
from passes.utils import split_fqn

__all__ = ["ShrinkPlan", "plan_shrink", "bias_fqn", "output_shapes"]


@dataclass(frozen=True)
class ShrinkPlan:
    """What :func:`passes.shrink.remove_channels` removes and folds; built by :func:`plan_shrink`.

    Attributes:
        groups: the channel groups that lose channels, by index.
        channels: ``{group index: channel numbers}`` to remove (unique, sorted, long).
        bias_deltas: ``{consumer weight FQN: what to add to its bias}``.
        folded: consumers whose bias receives removed channels' constants.
        inexact: where the shrunk module's output will differ from the input module's.
        example_inputs: the inputs the plan was measured on; the rewrite checks the output shapes on them.
        output_shapes: the shapes of the module's outputs on ``example_inputs``, which shrinking keeps.
    """

    groups: Mapping[int, ChannelGroup]
    channels: Mapping[int, torch.Tensor]
    bias_deltas: Mapping[str, torch.Tensor]
    folded: tuple[str, ...]
    inexact: tuple[str, ...]
    example_inputs: Any
    output_shapes: tuple[tuple[int, ...], ...]


def _checked_channels(groups: Sequence[ChannelGroup], removed: Mapping[int, Any]) -> dict[int, torch.Tensor]:
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


def bias_fqn(gm: fx.GraphModule, weight_fqn: str) -> str | None:
    """The bias that receives the fold into ``weight_fqn``'s outputs: the 1-D tensor beside the weight, a
    Linear/Conv's ``bias`` (which :func:`~passes.shrink.remove_channels` creates when it is ``None``), an LSTM's
    ``bias_ih``; ``None`` when no bias can hold it."""
    owner_fqn, name = split_fqn(weight_fqn)
    owner = gm.get_submodule(owner_fqn)
    bias = getattr(owner, "bias", None)
    own_bias = f"{owner_fqn}.bias" if owner_fqn else "bias"
    # An exported module keeps plain containers: its Linear's bias is the tensor beside the weight (of its rows,
    # or of its columns for a weight stored [in, out], as transformers' Conv1D).
    weight = getattr(owner, "weight", None)
    if name == "weight" and isinstance(bias, torch.Tensor) and isinstance(weight, torch.Tensor):
        if bias.shape == weight.shape[:1] or (weight.dim() == 2 and bias.shape == weight.shape[1:]):
            return own_bias
    if isinstance(owner, (nn.Linear, nn.modules.conv._ConvNd)):
        return own_bias
    if type(owner) is nn.LSTM and owner.bias:  # weight_ih_l0[_reverse] -> bias_ih_l0[_reverse]
        return f"{owner_fqn}.{name.replace('weight_ih_', 'bias_ih_')}".lstrip(".")
    return None


def output_shapes(gm: fx.GraphModule, example_inputs: Any) -> tuple[tuple[int, ...], ...]:
    """The shapes of ``gm``'s tensor outputs on ``example_inputs`` (run in eval mode, without gradients)."""
    out = run_recording(gm, example_inputs, lambda *a: None)
    return tuple(tuple(t.shape) for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


def plan_shrink(
    gm: fx.GraphModule, groups: Sequence[ChannelGroup], removed: Mapping[int, Any], example_inputs: Any
) -> ShrinkPlan:
    """Check ``removed`` against ``groups`` and measure the bias folds; ``gm`` is not modified.

    Args:
        gm: the module the groups were found on (its masks fused, if it had any).
        groups: from :func:`passes.dependency.find_channel_groups` on ``gm``.
        removed: ``{group index: channel numbers}`` to remove.
        example_inputs: a tensor or tuple, to measure removed channels' constants and the output shapes.

    Raises:
        TypeError: ``gm`` is not a ``GraphModule`` or ``removed`` not a dict.
        ValueError: a group is frozen, unknown, would lose every channel, or its
            blocks would lose unequal counts.

    Example::

        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        >>> x = torch.randn(2, 4)
        >>> plan = plan_shrink(gm, find_channel_groups(gm, x), {0: [5, 1]}, x)
        >>> plan.channels[0].tolist(), plan.output_shapes
        ([1, 5], ((2, 2),))
    """
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"gm must be a torch.fx.GraphModule, got {type(gm).__name__}")
    if not isinstance(removed, Mapping):
        raise TypeError(f"removed must be a dict {{group index: channels}}, got {type(removed).__name__}")
    channels = _checked_channels(groups, removed)
    by_index = {g.index: g for g in groups}
    deltas, folded, inexact = bias_deltas(gm, by_index, channels, example_inputs)
    for index in channels:
        inexact += [f"group {index}: {note}" for note in by_index[index].inexact]
    for fqn in [f for f in deltas if bias_fqn(gm, f) is None]:
        inexact.append(f"{fqn} has no bias to fold the removed channels' constant into")
        del deltas[fqn]
    return ShrinkPlan(
        groups={i: by_index[i] for i in channels},
        channels=channels,
        bias_deltas=deltas,
        folded=tuple(dict.fromkeys(folded)),
        inexact=tuple(dict.fromkeys(inexact)),
        example_inputs=example_inputs,
        output_shapes=output_shapes(gm, example_inputs),
    )
