"""Group the channel dimensions of a graph that must shrink together (analysis only, no rewrite).

Every Linear/Conv/Embedding output opens a *channel space*; the pass follows it
through the graph and unites spaces that meet: a residual ``add`` makes both
branches one space, a depthwise conv makes its input and output one space. Each
space collects its *members*, the tensor slices that lose an index when one of
its channels goes: producer weight rows, consumer weight columns (with the offset
of a concatenation and the ``inner`` factor of a flatten into a Linear), biases,
BatchNorm/LayerNorm/GroupNorm parameters and running stats (ATen ``layer_norm``'s too, its
``normalized_shape`` a literal member), embedding columns, parameters combined elementwise (a
position embedding, a layer scale, a class token expanded and concatenated along the tokens), and the modules
whose attributes (``in_features``, ``num_features``, ``groups`` ...) follow.

Attention heads are channel units too: viewing a projection's ``[.., H * hd]`` as
``[.., H, hd]`` relates its channels to a space of ``H`` heads, which ``q @ k^T``,
``softmax``, ``attn @ v`` and ``scaled_dot_product_attention`` unite across q, k and
v; repeated key/value heads (grouped-query attention) make each KV head carry its
query group (see :mod:`passes.dependency.spaces`, :mod:`passes.dependency.rules.attention`).

A literal size at the channel axis of a view, reshape or expand (``view(b, s, 8, 64)``
as ``torch.export`` writes it) is recorded as a ``"literal"`` member, which
:mod:`passes.shrink` lowers by the channels removed.

What the pass cannot prove safe is *frozen*, with the reason: a channel that
reaches a model output, an unknown op, a reshape it cannot follow,
``nn.MultiheadAttention``'s fused ``in_proj_weight`` in a form other than the exported
self-attention of :mod:`passes.dependency.rules.attention` (refused, with the reason).

Shapes come from running the graph once on ``example_inputs`` (in eval mode,
without gradients, so BatchNorm statistics are not touched). Both captured forms
are read: ``call_module`` layers, and ``F.linear``/``F.conv*`` calls whose weight
is a ``get_attr`` or the ``mul(weight, mask)`` node of :mod:`passes.masking.insert`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx

from passes.dependency.spaces import Spaces
from passes.dependency.layout import Layout, follow_node

__all__ = ["Member", "ChannelGroup", "find_channel_groups", "run_recording"]


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
    """

    target: str
    kind: Literal["producer", "consumer", "param", "module", "literal"]
    dim: int = 0
    offset: int = 0
    inner: int = 1

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


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, record: Callable[[fx.Node, Any, tuple, dict], None]) -> None:
        super().__init__(gm)
        self._record = record

    def run_node(self, n: fx.Node) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        result = super().run_node(n)
        self._record(n, result, args, kwargs)
        return result


def _as_args(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(
        f"example_inputs must be a tensor or a tuple of positional inputs, got {type(example_inputs).__name__}"
    )


def run_recording(
    gm: fx.GraphModule, example_inputs: Any, record: Callable[[fx.Node, Any, tuple, dict], None]
) -> Any:
    """Run ``gm`` on ``example_inputs`` in eval mode without gradients, calling
    ``record(node, result, args, kwargs)`` after every node; training flags are restored.

    Example::

        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 2)))
        >>> shapes = {}
        >>> _ = run_recording(gm, torch.ones(1, 4), lambda n, r, a, k: shapes.update({n.name: r.shape}))
        >>> shapes["_0"]
        torch.Size([1, 2])
    """
    args = _as_args(example_inputs)
    flags = [(m, m.training) for m in gm.modules()]
    for module, _ in flags:  # not gm.eval(): an exported module refuses it
        module.training = False
    try:
        with torch.no_grad():
            return _Recorder(gm, record).run(*args)
    finally:
        for module, training in flags:
            module.training = training


def _shape_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(tuple(v.shape) for v in value)
    return None


def find_channel_groups(gm: fx.GraphModule, example_inputs: Any) -> tuple[ChannelGroup, ...]:
    """Group the coupled channel dimensions of ``gm``; nothing is modified.

    Args:
        gm: a captured ``GraphModule`` (symbolic-trace form, or masked by ``prepare``).
        example_inputs: a tensor or tuple of positional inputs, run once for shapes.

    Returns:
        One :class:`ChannelGroup` per channel space that has members, in the order
        their first producer appears; frozen groups say why.

    Example::

        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        >>> [(g.size, g.prunable) for g in find_channel_groups(gm, torch.randn(1, 4))]
        [(8, True), (2, False)]
    """
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"gm must be a torch.fx.GraphModule, got {type(gm).__name__}")
    shapes: dict[fx.Node, Any] = {}
    run_recording(gm, example_inputs, lambda n, result, a, k: shapes.__setitem__(n, _shape_of(result)))
    spaces = Spaces()
    layouts: dict[fx.Node, Layout | tuple | None] = {}
    for node in gm.graph.nodes:
        try:
            layouts[node] = follow_node(node, gm, shapes, layouts, spaces)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            raise RuntimeError(f"dependency analysis failed at {node.format_node()}: {e}") from e
    return _groups(spaces)


def _groups(spaces: Spaces) -> tuple[ChannelGroup, ...]:
    groups = []
    for resolved in spaces.resolve():
        members = tuple(dict.fromkeys(resolved["members"]))
        if not members:
            continue
        reasons = tuple(dict.fromkeys(resolved["reasons"]))
        groups.append(
            ChannelGroup(
                index=len(groups),
                size=resolved["size"],
                members=members,
                blocks=resolved["blocks"],
                frozen_reason="; ".join(reasons) if reasons else None,
                inexact=tuple(dict.fromkeys(resolved["inexact"])),
            )
        )
    return tuple(groups)
