"""The ``torch.export`` capture: a copy of the model exported on its example inputs, with dynamic dimensions.

:func:`export_model` exports a copy of the model sharing its tensors (:func:`copy_model`), never the model
itself: export writes onto the module it runs (list and dict attributes swapped for copies, a failed export
leaves its traces). Keyword inputs are exported as such (``torch.export.export(model, args, kwargs)``): the
captured module then takes the same dict form, as a tokenizer returns it.

**Caches.** A Hugging Face model returns its KV cache (a ``DynamicCache``, which torch.export cannot output)
while its ``config.use_cache`` is set, as it is by default; the copy's config is turned off
(:func:`turn_off_cache`) unless the example inputs set ``use_cache`` themselves. The user's model and config
are not changed; the captured module returns no cache.

**Dynamic dimensions.** Without ``dynamic_shapes``, dim 0 (the batch) of every tensor input is kept dynamic,
and so is the sequence length of the token inputs (dim 1 of 2-D integer tensors such as ``input_ids`` and
``attention_mask``) and every dimension of the same size (see :func:`passes.capturing.inputs.dynamic_dims`), so
that batches of any size, padded to any length, run through one capture. Where torch.export specialises one
of them (an example of size 0 or 1, which it always specialises, or a model that fixes it), the capture keeps
what it can dynamic, in the order batch and sequence, batch only, sequence only (for an example batch of 1),
static; a warning says what was fixed and why.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves, tree_map

from passes.capturing.inputs import dynamic_dims, sequence_lengths
from passes.capturing.pickling import as_exported_module
from passes.meta import CaptureRecord, set_capture
from passes.utils import clone_sharing_tensors

__all__ = ["copy_model", "export_model", "turn_off_cache"]

_MODULE_INTERNALS = frozenset({"_parameters", "_buffers", "_modules"})


def _uncopyable_attribute(model: nn.Module) -> tuple[str, str, object] | None:
    """``(module FQN, attribute, value)`` of the first module attribute ``copy.deepcopy`` refuses (tensors shared,
    as capture copies them), or ``None`` when each copies on its own."""
    memo: dict[int, object] = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    for fqn, module in model.named_modules():
        for name, value in vars(module).items():
            if name in _MODULE_INTERNALS:
                continue
            try:
                copy.deepcopy(value, dict(memo))
            except Exception:
                return fqn, name, value
    return None


def copy_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` sharing its tensors (:func:`passes.utils.clone_sharing_tensors`), for a capture to write on.

    Raises:
        TypeError: a module attribute cannot be copied, naming the submodule, the attribute and the fix.
    """
    try:
        return clone_sharing_tensors(model)
    except Exception as e:
        found = _uncopyable_attribute(model)
        where = ""
        if found is not None:
            fqn, name, value = found
            owner = f"submodule {fqn!r} ({type(model.get_submodule(fqn)).__name__})" if fqn else "the model itself"
            where = f"the attribute {name!r} of {owner}, a {type(value).__module__}.{type(value).__qualname__}, "
        raise TypeError(
            f"capture works on a copy of {type(model).__name__} (copy.deepcopy sharing its parameters and "
            f"buffers), so that tracing never writes onto the model, but {where or 'the model '}cannot be "
            f"copied ({type(e).__name__}: {e}). Make it deep-copyable (define __deepcopy__ on its class), or set "
            "it outside the model (or after prepare, on the prepared module)."
        ) from e


def turn_off_cache(model: nn.Module) -> list[str]:
    """Set ``config.use_cache = False`` on every config ``model`` and its submodules hold (a Hugging Face model
    then returns no KV cache). Call it on a copy (:func:`copy_model` copies the config with the model).

    Returns:
        The FQNs of the modules whose config was changed (``""`` for the model itself).

    Example::

        >>> import types
        >>> model = copy_model(nn.Linear(2, 2))
        >>> model.config = types.SimpleNamespace(use_cache=True)
        >>> turn_off_cache(model), model.config.use_cache
        ([''], False)
    """
    changed, seen = [], set()
    for fqn, module in model.named_modules():
        config = vars(module).get("config")
        if config is None or id(config) in seen or getattr(config, "use_cache", None) is not True:
            continue
        seen.add(id(config))
        config.use_cache = False
        changed.append(fqn)
    return changed


def _export_copy(model: nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any) -> fx.GraphModule:
    # Fresh objects each time: export writes onto the module (and a failed export may have
    # left things there), and it marks the dynamic dims on the input tensors themselves.
    fresh = lambda v: v.detach().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v  # noqa: E731
    clone = copy_model(model)
    if "use_cache" not in kwargs:
        turn_off_cache(clone)
    exported = torch.export.export(clone, tree_map(fresh, args), tree_map(fresh, kwargs), dynamic_shapes=dynamic_shapes)
    return as_exported_module(exported.module())


def _reason(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    # torch's constraint errors list the reasons as "- ..." lines, then advice on its own API.
    detail = next((line[2:] for line in lines if line.startswith("- ")), lines[0] if lines else "")
    detail = detail.split(" If you're using")[0]
    return f"{type(e).__name__}: {detail}"


def export_model(
    model: nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any = None
) -> tuple[fx.GraphModule, list[str]]:
    """``torch.export`` of a copy of ``model`` on ``(args, kwargs)``, its :class:`CaptureRecord` set.

    Args:
        model: the module (not modified).
        args, kwargs: the example inputs, as :func:`passes.capturing.inputs.example_args` gives them.
        dynamic_shapes: torch.export's argument; ``None`` keeps the batch and sequence dimensions
            dynamic where export can (see the module docstring).

    Returns:
        The captured module, and the warnings to give (the dimensions that could not stay dynamic, and why).

    Raises:
        Exception: whatever torch.export raises for the static capture (the last one tried).
    """
    if dynamic_shapes is not None:
        gm = _export_copy(model, args, kwargs, dynamic_shapes)
        set_capture(gm, CaptureRecord("export", None))
        return gm, []
    name = type(model).__name__
    batches = sorted({v.shape[0] for v in tree_leaves((args, kwargs)) if isinstance(v, torch.Tensor) and v.dim() > 0})
    lengths = sorted(sequence_lengths(args, kwargs))
    why: dict[str, str] = {}
    if set(batches) & {0, 1}:
        why["batch"] = ("an example input has batch size 0 or 1, which torch.export always specialises; "
                        "give example inputs with a batch of 2 or more")
    if set(lengths) & {0, 1}:
        why["sequence"] = ("an example token input has sequence length 0 or 1, which torch.export always "
                           "specialises; give example inputs of 2 tokens or more")
    can_batch, can_sequence = bool(batches) and "batch" not in why, bool(lengths) and "sequence" not in why
    plans = [(True, True)] * (can_batch and can_sequence) + [(True, False)] * can_batch
    plans += [(False, True)] * (can_sequence and not can_batch) + [(False, False)]
    failures: dict[tuple[bool, bool], str] = {}
    for batch, sequence in plans:
        shapes = dynamic_dims(model, args, kwargs, batch=batch, sequence=sequence) if batch or sequence else None
        if (batch or sequence) and shapes is None:
            continue  # keyword inputs of a forward without a signature: no names to bind dynamic shapes to
        try:
            gm = _export_copy(model, args, kwargs, shapes)
        except Exception as e:
            if not (batch or sequence):
                raise
            failures[(batch, sequence)] = _reason(e)
            continue
        break
    set_capture(gm, CaptureRecord("export", batch))
    warnings = []
    if batches and not batch:
        reason = why.get("batch") or failures.get((True, False)) or failures.get((True, True), "")
        if "batch" not in why:
            reason = f"torch.export could not keep dim 0 dynamic ({reason})"
        warnings.append(
            f"{name} was captured with torch.export for batch size {', '.join(map(str, batches))} only: {reason}. "
            "The captured module refuses other batch sizes; pass dynamic_shapes=... (torch.export's argument) to "
            "choose the dynamic dimensions yourself."
        )
    if lengths and not sequence:
        reason = why.get("sequence") or failures.get((True, True)) or failures.get((False, True), "")
        if "sequence" not in why:
            reason = f"torch.export could not keep it dynamic ({reason})"
        shown = ", ".join(map(str, lengths))
        warnings.append(
            f"{name} was captured with torch.export for sequence length {shown} only (dim 1 of its 2-D integer "
            f"inputs, such as input_ids): {reason}. The captured module refuses batches of other lengths: pad every "
            f"batch to {shown} (a tokenizer's padding='max_length', max_length={lengths[0]}), or pass "
            "dynamic_shapes=... (torch.export's argument) to choose the dynamic dimensions yourself."
        )
    return gm, warnings
