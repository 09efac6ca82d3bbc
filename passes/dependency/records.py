"""The records of the dependency analysis: a slice that shrinks (:class:`Member`) and a group of channels
that shrink together (:class:`ChannelGroup`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["Member", "ChannelGroup"]


@dataclass(frozen=True)
class Member:
    """One slice that loses an index per removed channel.

    Attributes:
        target: a tensor FQN, or a module FQN for ``kind="module"``.
        kind: ``"producer"`` (rows of a Linear/Conv weight, columns of an Embedding:
            what importance is scored on and masks zero), ``"consumer"`` (input
            columns of a Linear/Conv weight), ``"param"`` (any other tensor:
            biases, norm parameters and statistics), ``"module"`` (a module whose
            size attributes are recomputed from its tensors) or ``"literal"`` (a size
            written in the graph, such as the head count of ``view(b, s, 8, 64)``:
            ``target`` names the node, ``dim`` the argument, ``offset`` the position
            in that argument when it is a list of sizes, else ``-1``).
        dim: the tensor dimension that shrinks.
        offset: index along ``dim`` of the group's first channel (concatenation).
        inner: consecutive entries per channel along ``dim`` (a flatten of
            ``[C, H, W]`` into a Linear gives ``inner = H * W``); for a literal, how
            much it drops per removed channel.
        part: for a literal size of a channel space that a split cut into pieces, which
            piece this copy belongs to (each piece's removed channels lower it, even when the
            pieces are one group); ``-1`` otherwise.
    """

    target: str
    kind: Literal["producer", "consumer", "param", "module", "literal"]
    dim: int = 0
    offset: int = 0
    inner: int = 1
    part: int = -1

    def indices(self, channels: torch.Tensor) -> torch.Tensor:
        """Indices along ``dim`` that hold ``channels`` (a 1-D long tensor of channel numbers)."""
        steps = torch.arange(self.inner, device=channels.device)
        return (self.offset + channels[:, None] * self.inner + steps).flatten()


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be removed together, index for index, from every member.

    Attributes:
        index: position in the list :func:`find_channel_groups` returns.
        size: number of channels.
        members: every slice that shrinks, in graph order.
        blocks: the channels form ``blocks`` equal consecutive blocks that must
            keep equal counts (GroupNorm groups); 1 otherwise.
        frozen_reason: why these channels may not shrink, or ``None``.
        inexact: members whose output changes when a channel is removed rather than
            zeroed (LayerNorm/GroupNorm statistics count the channel).
    """

    index: int
    size: int
    members: tuple[Member, ...]
    blocks: int = 1
    frozen_reason: str | None = None
    inexact: tuple[str, ...] = ()

    @property
    def prunable(self) -> bool:
        return self.frozen_reason is None

    @property
    def producers(self) -> tuple[Member, ...]:
        return tuple(m for m in self.members if m.kind == "producer")

    @property
    def consumers(self) -> tuple[Member, ...]:
        return tuple(m for m in self.members if m.kind == "consumer")
