"""Capture an ``nn.Module`` as an FX ``GraphModule``.

Symbolic tracing (``torch.fx``) is tried first: it keeps ``nn.Linear``/``nn.Conv``
calls as ``call_module`` nodes, so FQNs read exactly like the user's model. When
it fails (Python control flow on tensors, unsupported built-ins, ...) and
``example_inputs`` are given, the model is captured with
``torch.export.export(...).module()`` instead, which turns such models (for
example Hugging Face transformers) into ATen-level graphs. When both fail, a
:class:`CaptureError` names the failing construct and the remedies.

Both captures work on a clone of the model that shares its tensors (see
:func:`passes.utils.clone_sharing_tensors`), never on the model itself: the tracer
writes onto the module it traces (``_tensor_constant0`` for a module-level tensor,
models caching traced values in their own dicts, export swapping list and dict
attributes for copies), and none of that may reach the user's model. The returned
module shares only parameters and buffers with the model, so later passes may add
buffers and rewrite the graph freely.

An export capture keeps the batch dimension of its inputs dynamic where torch.export
can, and warns when it cannot. Captured modules pickle their graph as it is, node
names, sparsity tags and ``gm.meta`` included, so ``torch.save`` of a prepared,
lowered or squashed module loads again (``fx.GraphModule`` pickles its code and
re-traces it, losing all of that).
"""

from __future__ import annotations

import difflib
import itertools
import os
import traceback
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.export import Dim
from torch.export._unlift import _StatefulGraphModule
from torch.fx.graph_module import _CodeOnlyModule
from torch.utils._pytree import tree_leaves, tree_map

from passes.meta import SPARSITY_META_KEY
from passes.utils import clone_sharing_tensors

__all__ = ["capture", "CaptureError", "CapturedModule"]

_TORCH_DIR = os.path.dirname(torch.__file__)


class CaptureError(RuntimeError):
    """Neither symbolic tracing nor ``torch.export`` could capture the model."""


class _Tracer(fx.Tracer):
    # fx.GraphModule's unpickling (of a module built from one of our graphs outside capture)
    # re-traces the code with a subclass of the tracer, constructed without arguments.
    def __init__(self, leaf_modules: Sequence[type[nn.Module] | str] = ()) -> None:
        super().__init__()
        self._leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self._leaf_names = {m for m in leaf_modules if isinstance(m, str)}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._leaf_names:
            return True
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        if not super().is_leaf_module(m, module_qualified_name):
            return False
        # torch.nn modules are leaves by default, which would hide the Linears inside
        # nn.TransformerEncoderLayer or nn.MultiheadAttention: trace into those.
        return not _holds_weights(m)


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
        exported = isinstance(self, _StatefulGraphModule)
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
    """The ``GraphModule`` :func:`capture` returns for symbolic tracing."""


class _ExportedModule(_PicklesGraph, _StatefulGraphModule):
    """What ``torch.export``'s ``.module()`` returns, pickling like :class:`CapturedModule`."""

    def train(self, mode: bool = True) -> nn.Module:
        # As torch.export's module: its graph was captured in one mode.
        raise NotImplementedError("Calling train() is not supported yet.")

    def eval(self) -> nn.Module:
        raise NotImplementedError("Calling eval() is not supported yet.")


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
    base = _ExportedModule if exported else CapturedModule
    gm = fx.GraphModule.__new__(base)
    gm.__dict__["_body"] = body
    return gm


def _as_exported_module(gm: fx.GraphModule) -> fx.GraphModule:
    """Give ``torch.export``'s module a class that pickles its graph."""
    # GraphModule installs forward on a class of its own per instance (recompile writes it
    # there): the new class must be per instance too.
    gm.__class__ = type("GraphModuleImpl", (_ExportedModule,), {})
    gm.recompile()
    return gm


_WEIGHT_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _holds_weights(m: nn.Module) -> bool:
    """A non-Linear/Conv module holding Linear/Conv submodules, or a MultiheadAttention."""
    if isinstance(m, _WEIGHT_MODULES):
        return False
    if isinstance(m, nn.MultiheadAttention):
        return True
    return any(isinstance(sub, _WEIGHT_MODULES) for sub in m.modules())


def _failing_construct(exc: BaseException) -> str:
    """``file:line in func: source`` of the innermost frame outside torch, if any."""
    all_frames = traceback.extract_tb(exc.__traceback__)
    frames = [f for f in all_frames if not f.filename.startswith(_TORCH_DIR)]
    if not frames:
        return ""
    f = frames[-1]
    source = f" `{f.line.strip()}`" if f.line else ""
    # Past the user's frame, the failure may sit in a torch.nn module traced into for its Linears.
    after = all_frames[all_frames.index(f) + 1 :]
    inner = [g for g in after if "/nn/modules/" in g.filename and not g.name.endswith("call_impl")]
    if inner:
        module_file = os.path.relpath(inner[-1].filename, _TORCH_DIR)
        source += f", inside torch/{module_file}:{inner[-1].lineno} in {inner[-1].name}"
    return f" at {f.filename}:{f.lineno} in {f.name}{source}"


def _clone(model: nn.Module) -> nn.Module:
    try:
        return clone_sharing_tensors(model)
    except Exception as e:
        raise CaptureError(
            f"capture works on a copy of {type(model).__name__} (copy.deepcopy sharing its parameters and "
            f"buffers), so that tracing never writes onto the model, but copying it failed: "
            f"{type(e).__name__}: {e}. Make the model's attributes deep-copyable (or define __deepcopy__)."
        ) from e


def _batch_dims(example_args: tuple) -> Any:
    """``dynamic_shapes`` marking dim 0 of every tensor input dynamic (pytree-shaped like the inputs)."""
    return tree_map(
        lambda v: {0: Dim.DYNAMIC} if isinstance(v, torch.Tensor) and v.dim() > 0 else None,
        example_args,
    )


def _export_clone(model: nn.Module, example_args: tuple, dynamic_shapes: Any = None) -> fx.GraphModule:
    # Fresh objects each time: export writes onto the module (and a failed export may have
    # left things there), and it marks the dynamic dims on the input tensors themselves.
    args = tree_map(lambda v: v.detach().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v,
                    example_args)
    return _as_exported_module(torch.export.export(_clone(model), args, dynamic_shapes=dynamic_shapes).module())


def _export(model: nn.Module, example_args: tuple, dynamic_shapes: Any) -> fx.GraphModule:
    """``torch.export`` of a clone of ``model``; by default with a dynamic batch dimension."""
    if dynamic_shapes is not None:
        gm = _export_clone(model, example_args, dynamic_shapes)
        gm.meta["dynamic_batch"] = None
        return gm
    name = type(model).__name__
    batches = {v.shape[0] for v in tree_leaves(example_args) if isinstance(v, torch.Tensor) and v.dim() > 0}
    why = None
    if batches & {0, 1}:
        why = (
            "an example input has batch size 0 or 1, which torch.export always specialises; "
            "give example inputs with a batch of 2 or more"
        )
    elif batches:
        try:
            gm = _export_clone(model, example_args, _batch_dims(example_args))
            gm.meta["dynamic_batch"] = True
            return gm
        except Exception as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            # torch's constraint errors list the reasons as "- ..." lines, then advice on its own API.
            detail = next((line[2:] for line in lines if line.startswith("- ")), lines[0] if lines else "")
            detail = detail.split(" If you're using")[0]
            why = f"torch.export could not keep dim 0 dynamic ({type(e).__name__}: {detail})"
    gm = _export_clone(model, example_args)
    if why is not None:
        warnings.warn(
            f"{name} was captured with torch.export for batch size {', '.join(map(str, sorted(batches)))} "
            f"only: {why}. "
            "The captured module refuses other batch sizes; pass dynamic_shapes=... (torch.export's "
            "argument) to choose the dynamic dimensions yourself.",
            stacklevel=3,
        )
    gm.meta["dynamic_batch"] = False
    return gm


def _check_model(model: Any) -> None:
    """Refuse what capture cannot (or must not) trace, saying what to pass instead."""
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            f"model is a TorchScript {type(model).__name__}: capture needs the Python nn.Module; "
            "pass the model you scripted, before torch.jit.script/trace"
        )
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise TypeError(
            f"model is wrapped in {type(model).__name__}: pass the wrapped model, model.module, "
            "and wrap the prepared module again afterwards"
        )
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise TypeError(
            "model is a torch.compile'd wrapper (OptimizedModule): pass the original model, "
            "model._orig_mod, and compile the prepared module instead"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for fqn, module in model.named_modules():
        if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
            raise ValueError(
                f"model has an uninitialized lazy module {fqn or '<root>'} ({type(module).__name__}): "
                "run one forward pass with a real input first, so its weights get their shapes"
            )
    for fqn, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if tensor.is_meta:
            raise ValueError(
                f"model has tensors on the meta device ({fqn}, ...): capture needs real weights; "
                "materialise them first (model.to_empty(device='cpu') and load the weights)"
            )
    for fqn, module in model.named_modules():
        names = set(module._parameters)
        for name in module._buffers:
            if name.endswith("_mask") and name[: -len("_mask")] in names:
                raise ValueError(
                    f"model is already prepared for sparsity (it has the mask buffer "
                    f"{fqn + '.' if fqn else ''}{name}): prepare the original model, or fold the masks "
                    "into the weights first (lower(gm, 'fuse'))"
                )
    if isinstance(model, fx.GraphModule) and any(SPARSITY_META_KEY in n.meta for n in model.graph.nodes):
        raise ValueError(
            "model is a GraphModule already rewritten by the fx_sparsity passes: prepare the original "
            "model, or fold the masks into the weights first (lower(gm, 'fuse'))"
        )


def _check_leaf_modules(model: nn.Module, leaf_modules: Any) -> tuple[type[nn.Module] | str, ...]:
    if isinstance(leaf_modules, str):
        raise TypeError(
            f"leaf_modules must be an iterable of module FQNs or types, got the string {leaf_modules!r}: "
            f"pass [{leaf_modules!r}]"
        )
    if isinstance(leaf_modules, type):
        leaf_modules = (leaf_modules,)
    try:
        leaf_modules = tuple(leaf_modules)
    except TypeError:
        raise TypeError(
            f"leaf_modules must be an nn.Module subclass or an iterable of module FQNs (str) and "
            f"nn.Module subclasses, got {type(leaf_modules).__name__}"
        ) from None
    fqns = [fqn for fqn, _ in model.named_modules()]
    for m in leaf_modules:
        if isinstance(m, type) and issubclass(m, nn.Module):
            continue
        if not isinstance(m, str):
            raise TypeError(
                f"leaf_modules entries must be module FQNs (str) or nn.Module subclasses, got {m!r}"
            )
        if m not in fqns:
            close = difflib.get_close_matches(m, fqns, n=5, cutoff=0.5)
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise ValueError(f"leaf_modules names {m!r}, which is not a module of {type(model).__name__}{hint}")
    return leaf_modules


def _check_args(
    model: Any, example_inputs: Any, concrete_args: Any, dynamic_shapes: Any, method: Any
) -> tuple | None:
    if method not in ("auto", "symbolic_trace", "export"):
        raise ValueError(f"method must be 'auto', 'symbolic_trace' or 'export', got {method!r}")
    if method == "export" and example_inputs is None:
        raise ValueError("method='export' needs example_inputs=(...) to run torch.export with")
    if concrete_args is not None and not isinstance(concrete_args, dict):
        raise TypeError(
            f"concrete_args must be a dict of forward argument names to values, got {type(concrete_args).__name__}"
        )
    if dynamic_shapes is not None and example_inputs is None:
        raise ValueError(
            "dynamic_shapes is for the torch.export capture, which needs example_inputs: pass example_inputs=(...)"
        )
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(
        "example_inputs must be a tensor or a tuple of positional inputs, "
        f"got {type(example_inputs).__name__}"
    )


def capture(
    model: nn.Module,
    *,
    example_inputs: Any = None,
    leaf_modules: type[nn.Module] | Iterable[type[nn.Module] | str] = (),
    concrete_args: dict[str, Any] | None = None,
    dynamic_shapes: Any = None,
    method: Literal["auto", "symbolic_trace", "export"] = "auto",
) -> fx.GraphModule:
    """Capture ``model`` as a new ``GraphModule`` sharing its parameters.

    Args:
        model: the module to capture. It is not modified.
        example_inputs: a tensor or tuple of positional inputs, for the
            ``torch.export`` capture (when symbolic tracing fails, or with
            ``method="export"``).
        leaf_modules: a module type, or an iterable of module types and FQNs,
            that symbolic tracing keeps as ``call_module`` nodes instead of
            tracing through them.
        concrete_args: passed to the tracer, to fix arguments (flags, ``None``
            masks) that would otherwise reach Python control flow.
        dynamic_shapes: passed to ``torch.export.export`` for the export capture.
            By default dim 0 (the batch) of every tensor input is dynamic where
            export can keep it so; where it cannot (an example batch of 1, or a
            model that fixes the batch size) the capture is static and a
            ``UserWarning`` says why.
        method: ``"auto"`` (symbolic tracing, torch.export when it fails and
            ``example_inputs`` are given), ``"symbolic_trace"`` (no fallback) or
            ``"export"`` (needs ``example_inputs``; for models whose weights
            symbolic tracing hides, in ``torch.fx.wrap``'ed functions say).

    Returns:
        A ``GraphModule`` (a :class:`CapturedModule` for symbolic tracing);
        ``gm.meta["capture"]`` is ``"symbolic_trace"`` or ``"export"``.
        For an export capture, ``gm.meta["dynamic_batch"]`` is ``True`` (dim 0 is
        dynamic), ``False`` (static, warned) or ``None`` (``dynamic_shapes`` given).

    Raises:
        TypeError: ``model`` is not a plain ``nn.Module`` (a ScriptModule, a
            DataParallel/DistributedDataParallel or torch.compile wrapper), or an
            argument has the wrong type (a string as ``leaf_modules``, ...).
        ValueError: ``model`` has uninitialized lazy modules, tensors on the
            meta device, or is already prepared (mask buffers or nodes);
            ``leaf_modules`` names no module; ``dynamic_shapes`` without
            ``example_inputs``.
        CaptureError: when symbolic tracing fails and there are no
            ``example_inputs``, or when ``torch.export`` fails too.

    Example::

        >>> gm = capture(nn.Sequential(nn.Linear(4, 4)))
        >>> [n.op for n in gm.graph.nodes]
        ['placeholder', 'call_module', 'output']
    """
    _check_model(model)
    leaf_modules = _check_leaf_modules(model, leaf_modules)
    example_args = _check_args(model, example_inputs, concrete_args, dynamic_shapes, method)
    name = type(model).__name__
    if method == "export":
        try:
            gm = _export(model, example_args, dynamic_shapes)
        except Exception as e:
            raise CaptureError(
                f"torch.export of {name} failed{_failing_construct(e)}: "
                f"{type(e).__name__}: {str(e).splitlines()[0]}\n"
                "Remedies: rewrite data-dependent control flow with torch.cond, or capture with "
                "method='symbolic_trace' (leaf_modules=[...], concrete_args={...})."
            ) from e
        gm.meta["capture"] = "export"
        return gm
    clone = _clone(model)
    try:
        tracer = _Tracer(leaf_modules)
        graph = tracer.trace(clone, concrete_args=concrete_args)
        gm = CapturedModule(clone, graph, name)
    except Exception as trace_exc:
        where = _failing_construct(trace_exc)
        trace_msg = f"{type(trace_exc).__name__}: {trace_exc}"
        if example_args is None or method == "symbolic_trace":
            raise CaptureError(
                f"symbolic tracing of {name} failed{where}: {trace_msg}\n"
                "Remedies: pass example_inputs=(...) so the model is captured with torch.export "
                "instead, or mark the module holding that code as a leaf (leaf_modules=[...]) "
                "or fix the offending argument with concrete_args={...}."
            ) from trace_exc
        try:
            gm = _export(model, example_args, dynamic_shapes)
        except Exception as export_exc:
            raise CaptureError(
                f"could not capture {name}.\n"
                f"symbolic tracing failed{where}: {trace_msg}\n"
                f"torch.export failed{_failing_construct(export_exc)}: "
                f"{type(export_exc).__name__}: {str(export_exc).splitlines()[0]}\n"
                "Remedies: mark the module holding the failing code as a leaf "
                "(leaf_modules=[...]) or fix the offending argument with concrete_args={...}; "
                "for torch.export, rewrite data-dependent control flow with torch.cond."
            ) from export_exc
        gm.meta["capture"] = "export"
        return gm
    gm.meta["capture"] = "symbolic_trace"
    return gm
