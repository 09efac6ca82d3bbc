"""Running a prepared module on the user's inputs without changing anything.

``lower(example_inputs=...)``, ``calibrate(batches)``, ``prune_sequential`` and ``compare``
accept the same input forms (one tensor, a tuple/list of positional inputs, a dict of keyword
inputs, as a tokenizer returns them), checked here before anything runs, so that a wrong form
gets a ``TypeError`` naming the argument instead of a failure deep inside the model;
:func:`check_inputs_fit` refuses inputs the module's forward does not take (a ``GraphModule``
run by an ``fx.Interpreter`` would drop extra ones silently; a ``torch.export`` capture takes
its inputs in the form it was captured from), :func:`fit_inputs` does both and passes keyword
inputs positionally to a module exported from positional ones, :func:`placeholder_values` gives
the graph's inputs for an interpreter, and :func:`check_batches` refuses an
iterable that is no iterable of inputs (one tensor, ``None``). They run the
module under :func:`eval_mode`: the prepared module shares its buffers with the
user's model, so a forward pass in training mode would update the user's
BatchNorm statistics. :func:`batch_token_mask` finds a batch's padding mask
for ``calibrate(token_mask=...)``.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves

from passes.capturing.inputs import check_cache_slots, check_keywords

__all__ = [
    "ModelInputs",
    "TokenMask",
    "as_model_inputs",
    "batch_token_mask",
    "check_batches",
    "check_inputs_fit",
    "check_token_mask_source",
    "eval_mode",
    "fit_inputs",
    "placeholder_values",
]

ModelInputs = tuple[tuple[Any, ...], dict[str, Any]]


def as_model_inputs(value: Any, name: str) -> ModelInputs:
    """``(args, kwargs)`` for calling a module on ``value``.

    A tensor is one positional input; a tuple or list holds positional inputs;
    a dict (string keys) holds keyword inputs, as a tokenizer returns them. At
    least one tensor must be among them.

    Raises:
        TypeError: ``value`` is none of these forms, naming ``name`` and the fix.

    Example::

        >>> args, kwargs = as_model_inputs(torch.ones(2, 3), "example_inputs")
        >>> len(args), kwargs
        (1, {})
    """
    if isinstance(value, torch.Tensor):
        return (value,), {}
    if isinstance(value, (tuple, list)):
        args, kwargs = tuple(value), {}
    elif isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        args, kwargs = (), dict(value)
    else:
        raise TypeError(
            f"{name} must be a tensor, a tuple of positional inputs or a dict of keyword inputs, "
            f"got {type(value).__name__}"
        )
    if not any(isinstance(v, torch.Tensor) for v in (*args, *kwargs.values())):
        raise TypeError(f"{name} holds no tensor: give the model's inputs, e.g. (torch.randn(1, 16),), got {value!r}"[:300])
    return args, kwargs


def check_batches(batches: Any, name: str = "batches") -> None:
    """Refuse a ``batches`` argument that is not an iterable of model inputs, before any batch runs.

    One tensor is iterable too, but row by row: it is refused with the fix (wrap it in a list), as are
    ``None``, numbers and strings.

    Raises:
        TypeError: ``batches`` is not an iterable of inputs, naming ``name`` and the fix.

    Example::

        >>> check_batches([torch.ones(2, 3)])
        >>> check_batches(torch.ones(2, 3))
        Traceback (most recent call last):
        ...
        TypeError: batches must be an iterable of model inputs, e.g. a list of tensors or a DataLoader; got Tensor (wrap one tensor in a list: [x]; alone it would run row by row)
    """
    if batches is None or isinstance(batches, (torch.Tensor, str, bytes)) or not isinstance(batches, Iterable):
        hint = " (wrap one tensor in a list: [x]; alone it would run row by row)" if isinstance(batches, torch.Tensor) else ""
        raise TypeError(
            f"{name} must be an iterable of model inputs, e.g. a list of tensors or a DataLoader; "
            f"got {type(batches).__name__}{hint}"
        )


def _exported_form(module: nn.Module) -> tuple[int, list[str], list[str]] | None:
    """``(positional count, keyword names, forward's parameter names)`` a ``torch.export`` capture takes its inputs
    in (its input spec), or ``None`` for any other module."""
    codegen = module.graph._codegen if isinstance(module, fx.GraphModule) else None
    if not isinstance(codegen, fx.graph._PyTreeCodeGen) or codegen.pytree_info.in_spec is None:
        return None
    spec = codegen.pytree_info.in_spec
    if spec.type is not tuple or spec.num_children != 2 or spec.child(1).type is not dict:
        return None
    return spec.child(0).num_children, list(spec.child(1).context), list(codegen.pytree_info.orig_args)


def _exported_hint(form: tuple[int, list[str], list[str]] | None) -> str:
    """What a ``torch.export`` capture takes, for an error message ("" for other modules)."""
    if form is None:
        return ""
    count, keys, names = form
    if keys:
        return (f"; the module was captured by torch.export from the keyword inputs {keys}: give a dict with exactly "
                "these keys, the form of the example_inputs it was captured with")
    return (f"; the module was captured by torch.export from {count} positional input(s) ({', '.join(names[:count])}): "
            "to give other inputs (an attention_mask), prepare with example_inputs as a dict holding them, as a "
            "tokenizer returns it")


def check_inputs_fit(module: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any], name: str) -> None:
    """Refuse inputs ``module``'s forward does not take (extra positional inputs, unknown keywords) or lacks
    (required inputs not given), naming them, before anything runs.

    A ``GraphModule`` run by an ``fx.Interpreter`` drops extra positional inputs without a word; this is
    the check it does not make. The forward's signature is the one the capture gave it; a ``torch.export``
    capture takes exactly the inputs it was exported with, in the same form (positional, or a dict with the
    same keys); a key that typed ``**kwargs`` do not take (transformers' ``Unpack[TransformersKwargs]``) is
    refused too. A tensor given positionally where the forward takes a cache (GPT-2's ``(input_ids, cache,
    attention_mask)``) is refused pointing to the dict form.

    Raises:
        TypeError: the inputs do not fit, naming ``name``, the inputs and the forward's parameters.

    Example::

        >>> check_inputs_fit(nn.Linear(3, 2), (torch.ones(1, 3),), {}, "example_inputs")
        >>> check_inputs_fit(nn.Linear(3, 2), (torch.ones(1, 3), torch.ones(1)), {}, "example_inputs")
        Traceback (most recent call last):
        ...
        TypeError: example_inputs holds 2 positional inputs, but Linear's forward takes 1 (input): example_inputs[1] (a tensor of shape (1,)) is not an input of the model; drop it
    """
    form = _exported_form(module)
    try:
        signature = inspect.signature(module.forward)
    except (TypeError, ValueError):  # a forward without a signature: nothing to check against
        return
    parameters = list(signature.parameters.values())
    kinds = {p.kind for p in parameters}
    positional = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    # A captured module's class name is the model's (symbolic tracing) or an internal one (torch.export).
    owner = "the GraphModule's forward" if isinstance(module, torch.fx.GraphModule) else f"{type(module).__name__}'s forward"
    if inspect.Parameter.VAR_POSITIONAL not in kinds and len(args) > len(positional):
        extra = ", ".join(f"{name}[{i}] ({_describe(v)})" for i, v in enumerate(args) if i >= len(positional))
        plural = "is not an input" if len(args) - len(positional) == 1 else "are not inputs"
        raise TypeError(
            f"{name} holds {len(args)} positional inputs, but {owner} takes {len(positional)} "
            f"({', '.join(positional) or 'none'}): {extra} {plural} of the model; drop "
            f"{'it' if len(args) - len(positional) == 1 else 'them'}"
        )
    check_cache_slots(module, args, name)
    check_keywords(module, kwargs, name)
    try:
        signature.bind(*args, **kwargs)
    except TypeError as e:
        empty = inspect.Parameter.empty
        plain = signature.replace(
            parameters=[p.replace(annotation=empty) for p in parameters], return_annotation=empty
        )
        raise TypeError(
            f"{name} does not fit {owner}{plain} ({e}); give the inputs the model takes{_exported_hint(form)}"
        ) from None
    if form is not None and (len(args) != form[0] or set(kwargs) != set(form[1])):
        # The names fit its forward's, but torch.export's module takes its inputs in one form only.
        count, keys, names = form
        given = f"{len(args)} positional input(s)" if args else f"the keys {sorted(kwargs)}"
        if keys:
            raise TypeError(f"{name} gives {given}{_exported_hint(form)}")
        raise TypeError(
            f"{name} gives {given}, but the module was captured by torch.export from {count} positional input(s) "
            f"({', '.join(names[:count])}): give them as a tuple in that order"
        )


def fit_inputs(module: nn.Module, value: Any, name: str) -> ModelInputs:
    """``(args, kwargs)`` for calling ``module`` on ``value`` (:func:`as_model_inputs`), checked with
    :func:`check_inputs_fit`. For a module ``torch.export`` captured from positional inputs, a dict naming
    exactly those inputs (``{"input_ids": ids}`` for ``(ids,)``) is passed positionally, as the names of its
    forward promise (torch.export's module itself refuses keywords then).

    Raises:
        TypeError: ``value`` has no input form or does not fit ``module``, naming ``name`` and the fix.

    Example::

        >>> fit_inputs(nn.Linear(3, 2), {"input": torch.ones(1, 3)}, "batch 0")[1].keys()
        dict_keys(['input'])
    """
    args, kwargs = as_model_inputs(value, name)
    form = _exported_form(module)
    if form is not None and kwargs and not args and not form[1]:
        names = form[2][: form[0]]
        if set(kwargs) == set(names):
            args, kwargs = tuple(kwargs[n] for n in names), {}
    check_inputs_fit(module, args, kwargs, name)
    return args, kwargs


def placeholder_values(gm: fx.GraphModule, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> list[Any]:
    """The value of each placeholder of ``gm``'s graph for ``gm(*args, **kwargs)``, in order, as
    ``fx.Interpreter.run`` takes them (inputs checked by :func:`fit_inputs` first).

    An export capture flattens its inputs with its own input spec (keyword inputs in the spec's order);
    a traced module names its placeholders after the forward's parameters (their defaults filling the rest).

    Raises:
        TypeError: ``kwargs`` names an input the traced module does not take.

    Example::

        >>> gm = torch.fx.symbolic_trace(nn.Linear(3, 2))
        >>> [tuple(v.shape) for v in placeholder_values(gm, (), {"input": torch.ones(1, 3)})]
        [(1, 3)]
    """
    form = _exported_form(gm)
    if form is not None:
        return tree_leaves((tuple(args), {k: kwargs[k] for k in form[1]}))
    if isinstance(gm.graph._codegen, fx.graph._PyTreeCodeGen):
        return list(gm.graph._codegen.process_inputs(*args, **kwargs))
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    bound = dict(zip(names, args))
    unknown = sorted(set(kwargs) - set(names))
    if unknown:
        raise TypeError(f"example_inputs names {unknown}, which are not inputs of the model (inputs: {names})")
    bound.update(kwargs)
    defaults = {n.target: n.args[0] for n in gm.graph.nodes if n.op == "placeholder" and n.args}
    return [bound[name] if name in bound else defaults.get(name) for name in names]


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"[:80]


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` and every submodule in eval mode, and restore each one's own mode afterwards.

    The flags are set directly: a ``torch.export``-captured module refuses ``.eval()``
    (its graph was captured in one mode, which the flags then do not change).

    Example::

        >>> m = nn.Sequential(nn.BatchNorm1d(3))
        >>> with eval_mode(m):
        ...     m(torch.randn(4, 3)).shape
        torch.Size([4, 3])
        >>> m.training, int(m[0].num_batches_tracked)
        (True, 0)
    """
    modes = [(m, m.training) for m in module.modules()]
    for m, _ in modes:
        m.training = False
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


TokenMask = str | Callable[[Any], "torch.Tensor | None"] | None


def check_token_mask_source(token_mask: Any) -> None:
    """Refuse a ``token_mask`` argument that is not a key, a callable or ``None`` (before any batch runs).

    Raises:
        TypeError: ``token_mask`` is something else.
    """
    if token_mask is not None and not isinstance(token_mask, str) and not callable(token_mask):
        raise TypeError(
            "token_mask must be a key of dict batches (like 'attention_mask'), a callable batch -> [batch, seq] "
            f"mask, or None; got {type(token_mask).__name__}"
        )


def batch_token_mask(batch: Any, token_mask: TokenMask, name: str) -> torch.Tensor | None:
    """The ``[batch, seq]`` token mask of ``batch`` (non-zero = a real token), or ``None`` for every position.

    Args:
        batch: one calibration batch, in a form :func:`as_model_inputs` accepts.
        token_mask: a key (a dict batch holding it gives the mask, as a tokenizer's
            ``"attention_mask"``; other batches have none), a callable
            ``batch -> mask or None``, or ``None`` (no mask).
        name: how errors name the batch.

    Raises:
        TypeError: the mask is not a tensor.
        ValueError: the mask is not 2-D or holds values other than 0 and 1
            (an additive ``-inf`` mask would be read backwards).

    Example::

        >>> batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]])}
        >>> batch_token_mask(batch, "attention_mask", "batch 0").sum().item()
        3
    """
    if token_mask is None:
        return None
    if isinstance(token_mask, str):
        mask = batch.get(token_mask) if isinstance(batch, Mapping) else None
        source = f"{name}[{token_mask!r}]"
    else:
        mask = token_mask(batch)
        source = f"token_mask({name})"
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{source} must be a [batch, seq] tensor (1 = a real token, 0 = padding), got {type(mask).__name__}")
    if mask.dim() != 2:
        raise ValueError(
            f"{source} must be [batch, seq] (1 = a real token, 0 = padding), got shape {tuple(mask.shape)}; "
            "give the 2-D padding mask, not an expanded attention bias"
        )
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError(
            f"{source} must hold only 0 and 1 (1 = a real token), got values {mask.unique()[:8].tolist()}; "
            "an additive mask (0 / -inf) reads backwards: pass (bias == 0) instead"
        )
    return mask
