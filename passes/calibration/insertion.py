"""Put calibration observers in front of masked ops, and take them out again.

:func:`insert_input_observers` puts one ``call_module`` node on an observer
(:mod:`passes.calibration.observers`) in front of every linear/conv op that reads a given
masked weight (in front of its padding node, for convs with a non-zero
``padding_mode``); all uses of one weight share one observer. Which observer a
weight gets is the caller's choice: a factory per weight, called with the
weight's :class:`SparseTarget` and the conv arguments of each op reading it.
:func:`remove_input_observers` takes the nodes and the observer modules out
again, leaving the graph as it was.

Both mutate and return ``gm`` (the observers, for the insertion).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from torch import fx, nn

from passes.calibration.observers import ObserverFactory, input_norm_observer
from passes.matching.weights import op_arguments
from passes.meta import SPARSITY_META_KEY, SparseTarget, get_sparse_target

__all__ = ["insert_input_observers", "remove_input_observers"]


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
