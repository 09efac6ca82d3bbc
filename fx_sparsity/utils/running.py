"""Running a prepared module on the user's inputs without changing anything.

``lower(example_inputs=...)`` and ``calibrate(batches)`` accept the same input
forms (one tensor, a tuple/list of positional inputs, a dict of keyword inputs),
checked here before anything runs, so that a wrong form gets a ``TypeError``
naming the argument instead of a failure deep inside the model; :func:`check_inputs_fit`
refuses inputs the module's forward does not take (a ``GraphModule`` run by an
``fx.Interpreter`` would drop extra ones silently) and :func:`check_batches` an
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
from torch import nn

__all__ = [
    "ModelInputs",
    "TokenMask",
    "as_model_inputs",
    "batch_token_mask",
    "check_batches",
    "check_inputs_fit",
    "check_token_mask_source",
    "eval_mode",
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


def check_inputs_fit(module: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any], name: str) -> None:
    """Refuse inputs ``module``'s forward does not take (extra positional inputs, unknown keywords) or lacks
    (required inputs not given), naming them, before anything runs.

    A ``GraphModule`` run by an ``fx.Interpreter`` drops extra positional inputs without a word; this is
    the check it does not make. The forward's signature is the one the capture gave it (a ``torch.export``
    capture takes exactly the inputs it was exported with).

    Raises:
        TypeError: the inputs do not fit, naming ``name``, the inputs and the forward's parameters.

    Example::

        >>> check_inputs_fit(nn.Linear(3, 2), (torch.ones(1, 3),), {}, "example_inputs")
        >>> check_inputs_fit(nn.Linear(3, 2), (torch.ones(1, 3), torch.ones(1)), {}, "example_inputs")
        Traceback (most recent call last):
        ...
        TypeError: example_inputs holds 2 positional inputs, but Linear's forward takes 1 (input): example_inputs[1] (a tensor of shape (1,)) is not an input of the model; drop it
    """
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
    try:
        signature.bind(*args, **kwargs)
    except TypeError as e:
        empty = inspect.Parameter.empty
        plain = signature.replace(
            parameters=[p.replace(annotation=empty) for p in parameters], return_annotation=empty
        )
        raise TypeError(f"{name} does not fit {owner}{plain} ({e}); give the inputs the model takes") from None


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
