"""Calibration observers: record the per-channel L2 norm of the input of masked ops.

:func:`insert_input_observers` puts one ``call_module`` node on an
:class:`InputNormObserver` in front of every linear/conv op that reads a given
masked weight (in front of its padding node, for convs with a non-zero
``padding_mode``); all uses of one weight share one observer. The observer
passes its input through unchanged and accumulates, per input channel, the sum
of squares over every other dimension. :func:`remove_input_observers` takes the
nodes and the observer modules out again, leaving the graph as it was.

Both mutate and return ``gm`` (the observers, for the insertion).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from torch import Tensor, fx, nn

from .match import op_arguments
from .meta import SPARSITY_META_KEY, get_sparse_target

__all__ = ["InputNormObserver", "insert_input_observers", "remove_input_observers"]


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


def _observer_name(gm: fx.GraphModule, tensor_fqn: str) -> str:
    base = f"{tensor_fqn.replace('.', '_')}_input_observer"
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


def insert_input_observers(gm: fx.GraphModule, tensor_fqns: Iterable[str]) -> dict[str, InputNormObserver]:
    """Observe the input of every op reading one of the masked weights ``tensor_fqns``.

    Returns:
        tensor FQN -> its observer (a submodule of ``gm`` until removal).

    Raises:
        ValueError: an FQN is not a masked weight with an op; ``gm`` is unchanged then.
    """
    wanted = list(tensor_fqns)
    ops: dict[str, list[fx.Node]] = {fqn: [] for fqn in wanted}
    for node in gm.graph.nodes:
        target = get_sparse_target(node)
        if target is not None and target.role == "op" and target.tensor_fqn in ops:
            ops[target.tensor_fqn].append(node)
    missing = [fqn for fqn, nodes in ops.items() if not nodes]
    if missing:
        raise ValueError(f"no masked linear/conv op reads {missing}; observers go in front of masked ops")
    graph = gm.graph
    observers = {}
    for fqn, nodes in ops.items():
        target = get_sparse_target(nodes[0])
        observer = InputNormObserver(len(target.weight_shape) - 2)
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

