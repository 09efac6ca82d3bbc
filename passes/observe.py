"""Calibration observers: record statistics of the input of masked ops.

:func:`insert_input_observers` puts one ``call_module`` node on an observer in
front of every linear/conv op that reads a given masked weight (in front of its
padding node, for convs with a non-zero ``padding_mode``); all uses of one
weight share one observer. Observers pass their input through unchanged.
:class:`InputNormObserver` (the default) accumulates, per input channel, the sum
of squares over every other dimension (Wanda); :class:`InputHessianObserver`
accumulates ``X^T X`` of the rows the weight's ``[out, in * kernel]`` view
multiplies (SparseGPT), a conv's input unfolded into patches with the op's own
stride, padding, dilation and groups (:func:`input_rows`). Which observer a
weight gets is the caller's choice: a factory per weight, called with the
weight's :class:`SparseTarget` and the conv arguments of each op reading it.
:func:`remove_input_observers` takes the nodes and the observer modules out
again, leaving the graph as it was.

Both mutate and return ``gm`` (the observers, for the insertion).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .match import op_arguments
from .meta import SPARSITY_META_KEY, SparseTarget, get_sparse_target

__all__ = [
    "InputHessianObserver",
    "InputNormObserver",
    "ObserverFactory",
    "accumulate_hessian",
    "input_norm_observer",
    "input_rows",
    "insert_input_observers",
    "remove_input_observers",
]

# factory(target, ops) -> observer module; ``ops`` holds, per op reading the weight, its conv
# arguments (``stride``, ``padding``, ``dilation``, ``groups``, and ``pad`` = (pad, mode) of an
# explicit padding node in front of it, else None); empty dicts for linear ops.
ObserverFactory = Callable[[SparseTarget, list[dict[str, Any]]], nn.Module]
_CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class InputNormObserver(nn.Module):
    """Pass-through module accumulating the squared L2 norm of each input channel.

    Args:
        spatial_dims: 0 for a linear (channels are the last dim), N for an
            N-d conv (channels come before the N spatial dims).
    """

    def __init__(self, spatial_dims: int) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.sum_squares: Tensor | None = None
        self.batches = 0

    def forward(self, x: Tensor) -> Tensor:
        channel_dim = x.dim() - 1 - self.spatial_dims
        squares = x.detach().double().square()
        dims = [d for d in range(x.dim()) if d != channel_dim]
        total = squares.sum(dim=dims) if dims else squares
        self.sum_squares = total if self.sum_squares is None else self.sum_squares + total
        self.batches += 1
        return x

    def norm(self) -> Tensor:
        """L2 norm of each input channel over everything observed (float32)."""
        if self.sum_squares is None:
            raise RuntimeError("the observer saw no input: run calibration batches through the module")
        return self.sum_squares.sqrt().float()


def input_norm_observer(target: SparseTarget, ops: list[dict[str, Any]]) -> InputNormObserver:
    """The default :data:`ObserverFactory`: an :class:`InputNormObserver` for the weight's rank."""
    return InputNormObserver(len(target.weight_shape) - 2)


def input_rows(
    x: Tensor,
    weight_shape: tuple[int, ...],
    *,
    stride: object = 1,
    padding: object = 0,
    dilation: object = 1,
    groups: int = 1,
    pad: tuple[tuple[int, ...], str] | None = None,
) -> Tensor:
    """The rows the weight's ``[out, in * kernel]`` view multiplies, per conv group (float64).

    A linear's input ``[..., in]`` gives ``[1, N, in]``. A conv's input is
    unfolded into patches (``in_per_group * kernel`` values each, channel-major
    like the weight's view) with the conv's own stride, padding and dilation:
    ``[groups, N, in_per_group * kernel]``, where group ``g`` holds the input
    channels the outputs of group ``g`` read.

    Args:
        x: the op's input (batched or not).
        weight_shape: ``[out, in]`` or ``[out, in / groups, *kernel]``.
        stride, padding, dilation, groups: the conv's arguments.
        pad: ``(pad, mode)`` of an explicit ``F.pad`` in front of the conv
            (``padding_mode`` other than ``"zeros"``), applied first.

    Returns:
        float64 tensor ``[groups, rows, columns]``.

    Example::

        >>> input_rows(torch.ones(2, 3, 4, 4), (8, 3, 3, 3)).shape
        torch.Size([1, 8, 27])
    """
    x = x.detach().double()
    if len(weight_shape) == 2:
        return x.reshape(1, -1, x.shape[-1])
    spatial = len(weight_shape) - 2
    if x.dim() == spatial + 1:
        x = x.unsqueeze(0)
    if pad is not None:
        x = F.pad(x, pad[0], mode=pad[1])
    channels, kernel = x.shape[1], tuple(weight_shape[2:])
    positions = math.prod(kernel)
    # A depthwise conv with a one-hot kernel per output channel copies each patch value out.
    eye = torch.eye(positions, dtype=x.dtype, device=x.device).reshape(positions, 1, *kernel)
    patches = _CONVS[spatial](x, eye.repeat(channels, *([1] * (spatial + 1))), None, stride, padding, dilation, channels)
    columns = channels // groups * positions
    return patches.reshape(patches.shape[0], groups, columns, -1).permute(1, 0, 3, 2).reshape(groups, -1, columns)


def accumulate_hessian(hessian: Tensor | None, rows: Tensor) -> Tensor:
    """``hessian + rows^T rows`` per group (float64); ``hessian=None`` starts from zero.

    Example::

        >>> accumulate_hessian(None, torch.ones(1, 5, 2)).tolist()
        [[[5.0, 5.0], [5.0, 5.0]]]
    """
    rows = rows.double()
    update = rows.transpose(1, 2) @ rows
    return update if hessian is None else hessian + update


class InputHessianObserver(nn.Module):
    """Pass-through module accumulating ``X^T X`` (float64) of the rows the weight multiplies.

    Args:
        weight_shape: the observed weight's shape.
        stride, padding, dilation, groups, pad: the conv's arguments (see :func:`input_rows`).

    Example::

        >>> observer = InputHessianObserver((4, 3))
        >>> _ = observer(torch.ones(2, 5, 3))
        >>> observer.hessian().shape, observer.rows
        (torch.Size([1, 3, 3]), 10)
    """

    def __init__(
        self,
        weight_shape: tuple[int, ...],
        stride: object = 1,
        padding: object = 0,
        dilation: object = 1,
        groups: int = 1,
        pad: tuple[tuple[int, ...], str] | None = None,
    ) -> None:
        super().__init__()
        self.weight_shape = tuple(weight_shape)
        self.conv = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups, "pad": pad}
        self.sum_outer: Tensor | None = None
        self.rows = 0

    @classmethod
    def for_target(cls, target: SparseTarget, ops: list[dict[str, Any]]) -> InputHessianObserver:
        """An :data:`ObserverFactory`: refuses a weight read by convs with different arguments."""
        if any(op != ops[0] for op in ops):
            raise ValueError(
                f"{target.tensor_fqn} is read by convs with different arguments {ops}: one input Hessian "
                "cannot describe them; exclude it from the config"
            )
        return cls(target.weight_shape, **(ops[0] if ops else {}))

    def forward(self, x: Tensor) -> Tensor:
        kwargs = self.conv if len(self.weight_shape) > 2 else {}
        rows = input_rows(x, self.weight_shape, **kwargs)
        self.sum_outer = accumulate_hessian(self.sum_outer, rows)
        self.rows += rows.shape[1]
        return x

    def hessian(self) -> Tensor:
        """``X^T X`` over everything observed: ``[groups, columns, columns]`` float64."""
        if self.sum_outer is None:
            raise RuntimeError("the observer saw no input: run calibration batches through the module")
        return self.sum_outer


def _conv_arguments(op: fx.Node, target: SparseTarget) -> dict[str, Any]:
    """The conv arguments an observer in front of ``op`` needs; ``{}`` for a linear."""
    if target.kind == "linear":
        return {}
    args = op_arguments(op.target, op.args, op.kwargs)
    x = args["input"]
    pad_target = get_sparse_target(x) if isinstance(x, fx.Node) else None
    pad = None
    if pad_target is not None and pad_target.role == "pad":
        pad = (tuple(x.args[1]), x.kwargs.get("mode", "constant"))
    return {k: args[k] for k in ("stride", "padding", "dilation", "groups")} | {"pad": pad}


def _observer_name(gm: fx.GraphModule, tensor_fqn: str) -> str:
    base = f"{tensor_fqn.replace('.', '_')}_input_observer"
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


def insert_input_observers(
    gm: fx.GraphModule, tensor_fqns: Iterable[str] | Mapping[str, ObserverFactory]
) -> dict[str, nn.Module]:
    """Observe the input of every op reading one of the masked weights ``tensor_fqns``.

    Args:
        gm: a module with masks (mutated in place).
        tensor_fqns: the weights to observe, each with an :class:`InputNormObserver`;
            or a mapping tensor FQN -> :data:`ObserverFactory` choosing each weight's observer.

    Returns:
        tensor FQN -> its observer (a submodule of ``gm`` until removal).

    Raises:
        ValueError: an FQN is not a masked weight with an op, or a factory
            refuses it; ``gm`` is unchanged then.

    Example::

        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 2)))
        >>> gm = insert_masks(gm, find_weights(gm))
        >>> observers = insert_input_observers(gm, {"0.weight": InputHessianObserver.for_target})
        >>> _ = gm(torch.randn(3, 4))
        >>> hessian = observers["0.weight"].hessian()
        >>> _ = remove_input_observers(gm)
        >>> tuple(hessian.shape)
        (1, 4, 4)
    """
    factories = dict(tensor_fqns) if isinstance(tensor_fqns, Mapping) else dict.fromkeys(tensor_fqns, input_norm_observer)
    ops: dict[str, list[fx.Node]] = {fqn: [] for fqn in factories}
    for node in gm.graph.nodes:
        target = get_sparse_target(node)
        if target is not None and target.role == "op" and target.tensor_fqn in ops:
            ops[target.tensor_fqn].append(node)
    missing = [fqn for fqn, nodes in ops.items() if not nodes]
    if missing:
        raise ValueError(f"no masked linear/conv op reads {missing}; observers go in front of masked ops")
    built = {}
    for fqn, nodes in ops.items():
        target = get_sparse_target(nodes[0])
        built[fqn] = factories[fqn](target, [_conv_arguments(op, target) for op in nodes])
    graph = gm.graph
    observers = {}
    for fqn, nodes in ops.items():
        target = get_sparse_target(nodes[0])
        observer = built[fqn]
        name = _observer_name(gm, fqn)
        gm.add_submodule(name, observer)
        observers[fqn] = observer
        for op in nodes:
            x = op_arguments(op.target, op.args, op.kwargs)["input"]
            pad = get_sparse_target(x) if isinstance(x, fx.Node) else None
            consumer, source = (x, x.args[0]) if pad is not None and pad.role == "pad" else (op, x)
            with graph.inserting_before(consumer):
                node = graph.call_module(name, (source,))
            node.meta[SPARSITY_META_KEY] = dataclasses.replace(target, role="observer")
            consumer.replace_input_with(source, node)
    graph.lint()
    gm.recompile()
    return observers


def remove_input_observers(gm: fx.GraphModule) -> fx.GraphModule:
    """Remove every observer node and module :func:`insert_input_observers` added."""
    graph = gm.graph
    names = set()
    for node in list(graph.nodes):
        target = get_sparse_target(node)
        if target is not None and target.role == "observer":
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            names.add(node.target)
    for name in names:
        delattr(gm, name)
    graph.lint()
    gm.recompile()
    return gm

