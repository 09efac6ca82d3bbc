"""Capture an ``nn.Module`` as an FX ``GraphModule``.

Symbolic tracing (``torch.fx``) is tried first: it keeps ``nn.Linear``/``nn.Conv``
calls as ``call_module`` nodes, so FQNs read exactly like the user's model. When
it fails (Python control flow on tensors, unsupported built-ins, ...) and
``example_inputs`` are given, the model is captured with
``torch.export.export(...).module()`` instead, which turns such models (for
example Hugging Face transformers) into ATen-level graphs. When both fail, a
:class:`CaptureError` names the failing construct and the remedies. When tracing
succeeds but keeps Linear/Conv weights in opaque calls (``torch.fx.wrap``'ed
functions, as torchvision's swin_t does) and ``example_inputs`` are given, the export
capture is taken if its graph leaves fewer weights unmatched, with a warning (this
asks :mod:`passes.matching` which weights each graph exposes: the one place capture
looks ahead to the next stage).

Both captures work on a clone of the model that shares its tensors (see
:func:`passes.utils.clone_sharing_tensors`), never on the model itself: the tracer
writes onto the module it traces (``_tensor_constant0`` for a module-level tensor,
models caching traced values in their own dicts, export swapping list and dict
attributes for copies), and none of that may reach the user's model. The returned
module shares only parameters and buffers with the model, so later passes may add
buffers and rewrite the graph freely.

The export capture itself is :mod:`passes.capturing.exporting`: keyword example inputs
(a dict, as a tokenizer returns them) are exported as keywords, a Hugging Face model's
cache is turned off on the copy, and the batch dimension and the sequence length of token
inputs stay dynamic where torch.export can keep them so (a warning says why where it
cannot). The example inputs are checked against the model's forward first
(:mod:`passes.capturing.inputs`). How a module was captured is recorded as a
:class:`passes.meta.CaptureRecord`. Captured modules pickle their graph as it is
(:mod:`passes.capturing.pickling`).
"""

from __future__ import annotations

import difflib
import itertools
import os
import traceback
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import fx, nn
from torch.nn.modules.lazy import LazyModuleMixin

from passes.capturing.exporting import copy_model, export_model
from passes.capturing.inputs import example_args
from passes.capturing.pickling import CapturedModule
from passes.matching.unmatched import unmatched_weights
from passes.matching.weights import find_weights
from passes.meta import SPARSITY_META_KEY, CaptureRecord, set_capture
from passes.utils import user_stacklevel

__all__ = ["capture", "CaptureError"]

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


def _export(model: nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any) -> fx.GraphModule:
    """:func:`~passes.capturing.exporting.export_model`, giving its warnings (dimensions it could not keep dynamic)."""
    gm, messages = export_model(model, args, kwargs, dynamic_shapes)
    for message in messages:
        warnings.warn(message, stacklevel=user_stacklevel())
    return gm


def _export_if_it_masks_more(model: nn.Module, traced: fx.GraphModule, args: tuple, kwargs: dict, dynamic_shapes: Any
                             ) -> fx.GraphModule:
    """``method="auto"`` with example inputs, after symbolic tracing succeeded: the ``torch.export`` capture instead
    when the trace keeps Linear/Conv weights in opaque calls (a ``torch.fx.wrap``'ed function, as torchvision's
    swin_t holds its attention projections) and export's graph leaves fewer weights unmatched; a warning names
    the weights and how to choose. Otherwise (or when export fails) the trace, unchanged."""
    dense = unmatched_weights(model, traced, find_weights(traced))
    if not any(u.opaque for u in dense):
        return traced
    try:
        exported, messages = export_model(model, args, kwargs, dynamic_shapes)
    except Exception:
        return traced  # the trace stands; prepare names the weights it leaves dense, with the remedies
    still = {u.tensor_fqn for u in unmatched_weights(model, exported, find_weights(exported))}
    if len(still) >= len(dense):
        return traced
    exposed = [u for u in dense if u.tensor_fqn not in still]
    shown = ", ".join(u.tensor_fqn for u in exposed[:5]) + (f" and {len(exposed) - 5} more" if len(exposed) > 5 else "")
    warnings.warn(
        f"{type(model).__name__} was captured with torch.export, not symbolic tracing: the trace keeps "
        f"{len(exposed)} Linear/Conv weight(s) in opaque calls ({shown}; {exposed[0].reason}), which torch.export's "
        "graph exposes, so they are masked too. Pass capture_method='export' to choose this capture without the "
        "warning, or capture_method='symbolic_trace' to keep the traced graph (those weights then stay dense).",
        UserWarning,
        stacklevel=user_stacklevel(),
    )
    for message in messages:
        warnings.warn(message, stacklevel=user_stacklevel())
    return exported


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
) -> tuple[tuple, dict] | None:
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
    return example_args(model, example_inputs)


def _export_remedies(e: BaseException) -> str:
    """What to try when torch.export failed with ``e``."""
    if "Cache" in str(e).split("\n")[0]:
        return ("Remedies: the model returns its KV cache, which torch.export cannot output: leave use_cache out of "
                "example_inputs (capture then turns the config's use_cache off on its copy of the model) or give "
                "use_cache=False.")
    return ""


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
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword
            inputs (what a tokenizer returns: ``{"input_ids": ..., "attention_mask": ...}``),
            for the ``torch.export`` capture (when symbolic tracing fails, or with
            ``method="export"``). An export capture takes its inputs in the same form: a
            module captured from a dict is called with the same keys. A Hugging Face model
            is exported with its ``config.use_cache`` off (on the copy capture works on;
            yours keeps its config) unless the dict sets ``use_cache``: the captured module
            returns no KV cache.
        leaf_modules: a module type, or an iterable of module types and FQNs,
            that symbolic tracing keeps as ``call_module`` nodes instead of
            tracing through them.
        concrete_args: passed to the tracer, to fix arguments (flags, ``None``
            masks) that would otherwise reach Python control flow.
        dynamic_shapes: passed to ``torch.export.export`` for the export capture.
            By default dim 0 (the batch) of every tensor input is dynamic, and so is
            the sequence length of token inputs (dim 1 of 2-D integer or bool tensors,
            such as ``input_ids`` and ``attention_mask``, and every dimension of the same
            size), where export can keep them so; where it cannot (an example of size 0
            or 1, or a model that fixes the size) that dimension is static and a
            ``UserWarning`` says why.
        method: ``"auto"`` (symbolic tracing; torch.export when it fails and
            ``example_inputs`` are given, or when the trace keeps Linear/Conv weights in
            opaque calls that export's graph exposes: then a ``UserWarning`` says so; never
            with ``leaf_modules`` or ``concrete_args``, which are symbolic tracing's), ``"symbolic_trace"`` (no fallback) or
            ``"export"`` (needs ``example_inputs``; for models whose weights
            symbolic tracing hides, in ``torch.fx.wrap``'ed functions say).

    Returns:
        A ``GraphModule`` (a :class:`~passes.capturing.pickling.CapturedModule` for symbolic
        tracing); :func:`passes.meta.get_capture` gives its :class:`~passes.meta.CaptureRecord`:
        the method (``"symbolic_trace"`` or ``"export"``) and, for an export capture, whether
        dim 0 is dynamic (``True``), static (``False``, warned) or chosen by ``dynamic_shapes`` (``None``).

    Raises:
        TypeError: ``model`` is not a plain ``nn.Module`` (a ScriptModule, a
            DataParallel/DistributedDataParallel or torch.compile wrapper), cannot be
            copied (naming the module and attribute ``copy.deepcopy`` refuses, such as a
            ``threading.Lock``), or an argument has the wrong type (a string as ``leaf_modules``, ...);
            ``example_inputs`` do not fit the model's forward, or put a tensor in its cache
            slot (GPT-2's ``(input_ids, cache, attention_mask)``: give a dict instead).
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
    inputs = _check_args(model, example_inputs, concrete_args, dynamic_shapes, method)
    name = type(model).__name__
    if method == "export":
        copy_model(model)  # a model that cannot be copied is the user's to fix, not a failure of torch.export
        try:
            gm = _export(model, *inputs, dynamic_shapes)
        except Exception as e:
            raise CaptureError(
                f"torch.export of {name} failed{_failing_construct(e)}: "
                f"{type(e).__name__}: {str(e).splitlines()[0]}\n"
                + (_export_remedies(e) or "Remedies: rewrite data-dependent control flow with torch.cond, or capture "
                   "with method='symbolic_trace' (leaf_modules=[...], concrete_args={...}).")
            ) from e
        return gm
    clone = copy_model(model)
    try:
        tracer = _Tracer(leaf_modules)
        graph = tracer.trace(clone, concrete_args=concrete_args)
        gm = CapturedModule(clone, graph, name)
    except Exception as trace_exc:
        where = _failing_construct(trace_exc)
        trace_msg = f"{type(trace_exc).__name__}: {trace_exc}"
        if inputs is None or method == "symbolic_trace":
            raise CaptureError(
                f"symbolic tracing of {name} failed{where}: {trace_msg}\n"
                "Remedies: pass example_inputs=(...) (or a dict of keyword inputs, as a tokenizer returns them) "
                "so the model is captured with torch.export instead, or mark the module holding that code as a "
                "leaf (leaf_modules=[...]) or fix the offending argument with concrete_args={...}."
            ) from trace_exc
        try:
            gm = _export(model, *inputs, dynamic_shapes)
        except Exception as export_exc:
            raise CaptureError(
                f"could not capture {name}.\n"
                f"symbolic tracing failed{where}: {trace_msg}\n"
                f"torch.export failed{_failing_construct(export_exc)}: "
                f"{type(export_exc).__name__}: {str(export_exc).splitlines()[0]}\n"
                + (_export_remedies(export_exc) or "Remedies: mark the module holding the failing code as a leaf "
                   "(leaf_modules=[...]) or fix the offending argument with concrete_args={...}; "
                   "for torch.export, rewrite data-dependent control flow with torch.cond.")
            ) from export_exc
        return gm
    set_capture(gm, CaptureRecord("symbolic_trace"))
    if method == "auto" and inputs is not None and not leaf_modules and concrete_args is None:
        return _export_if_it_masks_more(model, gm, *inputs, dynamic_shapes)
    return gm
