"""Captured modules that pickle their graph as it is.

Unpickling a ``GraphModule`` normally re-traces its code: that drops node meta and
``gm.meta``, merges repeated ``get_attr`` nodes and loses torch.export's output types.
The modules :func:`passes.capture` returns pickle their graph node by node instead, node
names, sparsity tags and ``gm.meta`` included, so ``torch.save`` of a prepared, lowered or
squashed module loads again and can still be stepped, fused or lowered.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx.graph_module import _CodeOnlyModule

from passes.meta import SPARSITY_META_KEY

__all__ = ["CapturedModule", "as_exported_module"]

# Node meta that survives pickling (FakeTensor values and module stacks do not pickle).
_PICKLED_NODE_META = (SPARSITY_META_KEY, "stack_trace")
# Unpickling a GraphModule normally re-traces its code: that drops node meta and gm.meta,
# merges repeated get_attr nodes and loses torch.export's output types. Captured modules
# pickle their graph node by node instead.


@dataclass(frozen=True)
class _NodeRef:
    name: str


@dataclass(frozen=True)
class _OpRef:
    """An operator by name: ``torch.ops`` overloads do not pickle."""

    path: tuple[str, ...]

    def resolve(self) -> object:
        op = torch.ops
        for part in self.path:
            op = getattr(op, part)
        return op


def _encode_target(target: object) -> object:
    if isinstance(target, torch._ops.OpOverload):
        return _OpRef((target.namespace, target._schema.name.split("::")[1], target._overloadname))
    if isinstance(target, torch._ops.HigherOrderOperator):
        return _OpRef(("higher_order", target.name()))
    return target


def _graph_state(graph: fx.Graph) -> dict:
    nodes = [
        (n.op, n.name, _encode_target(n.target), fx.map_arg(n.args, lambda a: _NodeRef(a.name)),
         fx.map_arg(n.kwargs, lambda a: _NodeRef(a.name)), n.type,
         {k: n.meta[k] for k in _PICKLED_NODE_META if k in n.meta})
        for n in graph.nodes
    ]
    return {"nodes": nodes, "codegen": graph._codegen}


def _graph_from_state(state: dict) -> fx.Graph:
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for op, name, target, args, kwargs, type_expr, meta in state["nodes"]:
        args, kwargs = (fx.node.map_aggregate(a, lambda r: env[r.name] if isinstance(r, _NodeRef) else r)
                        for a in (args, kwargs))
        target = target.resolve() if isinstance(target, _OpRef) else target
        node = graph.create_node(op, target, args, kwargs, name=name, type_expr=type_expr)
        node.meta.update(meta)
        env[name] = node
    graph._codegen = state["codegen"]
    return graph


class _PicklesGraph:
    """Mixin for captured GraphModules: a pickle round trip (``torch.save`` of the whole
    module) rebuilds the very graph, with ``gm.meta`` and the sparsity tags of the nodes,
    so a loaded prepared module can still be stepped, fused or lowered."""

    def __reduce__(self) -> tuple:
        body = {k: v for k, v in self.__dict__.items() if k != "_graph"}
        # torch.export's module registers no-op lambdas as hooks (for module-typed inputs,
        # which capture does not take); they do not pickle.
        for hooks in ("_forward_pre_hooks", "_forward_hooks"):
            body[hooks] = {k: h for k, h in body[hooks].items() if getattr(h, "__name__", "") != "<lambda>"}
        exported = not isinstance(self, CapturedModule)  # else an export capture (_exported_module_class)
        if exported:
            # Its train/eval (which refuse) and its guard function are local functions.
            body = {k: v for k, v in body.items() if k not in ("train", "eval")}
            guards = body["_modules"].get("_guards_fn")
            if guards is not None and not isinstance(guards, _InputShapeGuards):
                body["_modules"] = {**body["_modules"], "_guards_fn": _InputShapeGuards.of(self.graph)}
        # The graph goes in the state, pickled after the module: meta may refer back to it.
        return (_new_captured, (body, exported), {"graph": _graph_state(self.graph), "meta": dict(self.meta)})

    def __setstate__(self, state: dict) -> None:
        body = self.__dict__.pop("_body")
        graph = _graph_from_state(state["graph"])
        fx.GraphModule.__init__(self, _CodeOnlyModule(body), graph, body.get("_graphmodule_cls_name", "GraphModule"))
        # Everything else as pickled: modules and tensors the graph does not read, hooks, flags.
        self.__dict__.update({k: v for k, v in body.items() if k != "meta"})
        self.recompile()
        self.meta.update(state["meta"])


class CapturedModule(_PicklesGraph, fx.GraphModule):
    """The ``GraphModule`` :func:`passes.capture` returns for symbolic tracing."""


@functools.cache
def _exported_module_class() -> type:
    """The class of an export capture: torch.export's ``.module()`` class, pickling like :class:`CapturedModule`.
    Made on first use: its base pulls in torch._dynamo (2 s of import time), which symbolic tracing never needs."""
    from torch.export._unlift import _StatefulGraphModule

    class _ExportedModule(_PicklesGraph, _StatefulGraphModule):
        def train(self, mode: bool = True) -> nn.Module:
            # As torch.export's module: its graph was captured in one mode.
            raise NotImplementedError("Calling train() is not supported yet.")

        def eval(self) -> nn.Module:
            raise NotImplementedError("Calling eval() is not supported yet.")

    return _ExportedModule


class _InputShapeGuards(nn.Module):
    """Stands in for torch.export's guard function (generated code, which does not pickle)
    in a pickled export capture: checks the static sizes of the tensor inputs."""

    def __init__(self, shapes: list[tuple[int | None, ...] | None]) -> None:
        super().__init__()
        self.shapes = shapes
        self._is_impure = True

    @classmethod
    def of(cls, graph: fx.Graph) -> _InputShapeGuards:
        shapes = []
        for node in graph.find_nodes(op="placeholder"):
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor):
                shapes.append(None)
                continue
            shapes.append(tuple(d if isinstance(d, int) else None for d in val.shape))
        return cls(shapes)

    def forward(self, *args: Any) -> None:
        for i, (arg, shape) in enumerate(zip(args, self.shapes)):
            if shape is None:
                continue
            torch._assert(arg.dim() == len(shape), f"Guard failed: input {i} must have {len(shape)} dimensions")
            for dim, size in enumerate(shape):
                if size is not None:
                    torch._assert(arg.size(dim) == size, f"Guard failed: input {i}.size()[{dim}] == {size}")


def _new_captured(body: dict, exported: bool) -> fx.GraphModule:
    """An empty instance of the right per-instance class, filled in by ``__setstate__``."""
    base = _exported_module_class() if exported else CapturedModule
    gm = fx.GraphModule.__new__(base)
    gm.__dict__["_body"] = body
    return gm


def as_exported_module(gm: fx.GraphModule) -> fx.GraphModule:
    """Give ``torch.export``'s module a class that pickles its graph."""
    # GraphModule installs forward on a class of its own per instance (recompile writes it
    # there): the new class must be per instance too.
    gm.__class__ = type("GraphModuleImpl", (_exported_module_class(),), {})
    gm.recompile()
    return gm
