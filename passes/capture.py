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
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import fx, nn

from .utils import clone_sharing_tensors

__all__ = ["capture", "CaptureError"]

_TORCH_DIR = os.path.dirname(torch.__file__)


class CaptureError(RuntimeError):
    """Neither symbolic tracing nor ``torch.export`` could capture the model."""


class _Tracer(fx.Tracer):
    def __init__(self, leaf_modules: Sequence[type[nn.Module] | str]) -> None:
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


def _check_args(model: Any, example_inputs: Any, leaf_modules: Any) -> tuple | None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for m in leaf_modules:
        if not (isinstance(m, str) or (isinstance(m, type) and issubclass(m, nn.Module))):
            raise TypeError(
                f"leaf_modules entries must be module FQNs (str) or nn.Module subclasses, got {m!r}"
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
    leaf_modules: Iterable[type[nn.Module] | str] = (),
    concrete_args: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """Capture ``model`` as a new ``GraphModule`` sharing its parameters.

    Args:
        model: the module to capture. It is not modified.
        example_inputs: a tensor or tuple of positional inputs. Only used when
            symbolic tracing fails, to capture with ``torch.export`` instead.
        leaf_modules: module types or FQNs that symbolic tracing keeps as
            ``call_module`` nodes instead of tracing through them.
        concrete_args: passed to the tracer, to fix arguments (flags, ``None``
            masks) that would otherwise reach Python control flow.

    Returns:
        A ``GraphModule``; ``gm.meta["capture"]`` is ``"symbolic_trace"`` or ``"export"``.

    Raises:
        CaptureError: when symbolic tracing fails and there are no
            ``example_inputs``, or when ``torch.export`` fails too.

    Example::

        >>> gm = capture(nn.Sequential(nn.Linear(4, 4)))
        >>> [n.op for n in gm.graph.nodes]
        ['placeholder', 'call_module', 'output']
    """
    leaf_modules = tuple(leaf_modules)
    example_args = _check_args(model, example_inputs, leaf_modules)
    name = type(model).__name__
    clone = _clone(model)
    try:
        tracer = _Tracer(leaf_modules)
        graph = tracer.trace(clone, concrete_args=concrete_args)
        gm = fx.GraphModule(clone, graph, name)
    except Exception as trace_exc:
        where = _failing_construct(trace_exc)
        trace_msg = f"{type(trace_exc).__name__}: {trace_exc}"
        if example_args is None:
            raise CaptureError(
                f"symbolic tracing of {name} failed{where}: {trace_msg}\n"
                "Remedies: pass example_inputs=(...) so the model is captured with torch.export "
                "instead, or mark the module holding that code as a leaf (leaf_modules=[...]) "
                "or fix the offending argument with concrete_args={...}."
            ) from trace_exc
        try:
            # A fresh clone: the traced one may hold what the failed trace left on it.
            gm = torch.export.export(_clone(model), example_args).module()
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
