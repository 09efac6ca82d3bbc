"""The example inputs of an export capture: their forms, and the dimensions kept dynamic by default.

* :func:`example_args` turns ``example_inputs`` (a tensor, a tuple/list of positional inputs, or a dict of
  keyword inputs, as a tokenizer returns them) into ``(args, kwargs)`` checked against the model's forward:
  inputs it does not take are refused, and so is a tensor given positionally where the forward takes its
  cache (GPT-2's ``forward(input_ids, cache, attention_mask, ...)``): the dict form names each input.
  :func:`check_keywords` refuses a keyword input that a forward with ``**kwargs`` does not take, where
  the ``**kwargs`` are typed (transformers' ``**kwargs: Unpack[TransformersKwargs]``).
* :func:`sequence_lengths` finds the sequence lengths of the token inputs (2-D integer or bool tensors:
  ``input_ids``, ``attention_mask``, ``position_ids``, labels), and :func:`dynamic_dims` builds the
  ``dynamic_shapes`` torch.export takes: dim 0 (the batch) of every tensor input and, optionally, every
  dimension whose size is a token input's sequence length (``input_ids`` dim 1, a ``cache_position``'s
  dim 0, ...), so that padded batches of any length run through one capture.

Nothing here runs the model or changes it.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.export import Dim
from torch.utils._pytree import tree_leaves, tree_map

__all__ = ["cache_parameters", "check_cache_slots", "check_keywords", "dynamic_dims", "example_args",
           "is_token_input", "sequence_lengths"]

# Names transformers (and older versions of it) give the forward argument that takes a model's KV cache.
_CACHE_NAMES = frozenset({"cache", "past_key_values", "past_key_value", "past", "layer_past", "mems"})


def _signature(module: nn.Module) -> inspect.Signature | None:
    try:
        return inspect.signature(module.forward)
    except (TypeError, ValueError):  # a forward without a signature: nothing to check against
        return None


def cache_parameters(module: nn.Module) -> set[str]:
    """The parameters of ``module.forward`` that take a cache: named as transformers names them
    (``cache``, ``past_key_values``, ...) or annotated with a ``...Cache`` type.

    Example::

        >>> class Decoder(nn.Module):
        ...     def forward(self, input_ids, past_key_values=None, attention_mask=None): ...
        >>> cache_parameters(Decoder())
        {'past_key_values'}
    """
    signature = _signature(module)
    if signature is None:
        return set()
    return {
        p.name for p in signature.parameters.values()
        if p.name in _CACHE_NAMES or (p.annotation is not inspect.Parameter.empty and "Cache" in str(p.annotation))
    }


def check_cache_slots(module: nn.Module, args: tuple[Any, ...], name: str) -> None:
    """Refuse a tensor that ``args`` would pass positionally to ``module.forward``'s cache parameter.

    GPT-2's forward takes ``(input_ids, cache, attention_mask, ...)``: ``(ids, mask)`` hands the mask to
    the cache, and the model then fails far from the cause.

    Raises:
        TypeError: naming the input, the parameter it fills and the dict form to give instead.

    Example::

        >>> class Decoder(nn.Module):
        ...     def forward(self, input_ids, past_key_values=None, attention_mask=None): ...
        >>> check_cache_slots(Decoder(), (torch.ones(2, 3, dtype=torch.long), None), "example_inputs")
        >>> check_cache_slots(Decoder(), (torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3)), "example_inputs")
        Traceback (most recent call last):
        ...
        TypeError: example_inputs[1] (a tensor of shape (2, 3)) would go to Decoder.forward's parameter 'past_key_values', which takes the model's cache (positional inputs fill input_ids, past_key_values, ... in order): give the inputs by name, as a dict of keyword inputs (what a tokenizer returns), e.g. {'input_ids': ids, 'attention_mask': mask}
    """
    caches = cache_parameters(module)
    signature = _signature(module)
    if not caches or signature is None:
        return
    positional = [p.name for p in signature.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for i, (value, parameter) in enumerate(zip(args, positional)):
        if parameter in caches and isinstance(value, torch.Tensor):
            raise TypeError(
                f"{name}[{i}] (a tensor of shape {tuple(value.shape)}) would go to {type(module).__name__}.forward's "
                f"parameter {parameter!r}, which takes the model's cache (positional inputs fill "
                f"{', '.join(positional[: i + 1])}, ... in order): give the inputs by name, as a dict of keyword "
                "inputs (what a tokenizer returns), e.g. {'input_ids': ids, 'attention_mask': mask}"
            )


def _typed_keywords(module: nn.Module, signature: inspect.Signature) -> frozenset[str] | None:
    """The keys a forward's ``**kwargs: Unpack[SomeTypedDict]`` takes (transformers' models type theirs so),
    or ``None`` where the forward has no ``**kwargs`` or they are untyped (any key fits)."""
    for p in signature.parameters.values():
        if p.kind is not p.VAR_KEYWORD:
            continue
        annotation = p.annotation
        if isinstance(annotation, str):  # postponed (``from __future__ import annotations``): evaluate this one only
            try:
                annotation = eval(annotation, getattr(module.forward, "__globals__", {}))
            except Exception:  # noqa: BLE001  # a name the module does not hold at run time: nothing to check against
                return None
        if typing.get_origin(annotation) is not typing.Unpack:
            return None
        (typed,) = typing.get_args(annotation)
        if not typing.is_typeddict(typed):
            return None
        return frozenset(typed.__required_keys__ | typed.__optional_keys__)
    return None


def check_keywords(module: nn.Module, kwargs: Mapping[str, Any], name: str) -> None:
    """Refuse keyword inputs that ``module.forward`` does not take although its ``**kwargs`` would bind them.

    transformers' causal LMs end their forward with ``**kwargs: Unpack[TransformersKwargs]``, which takes only
    the keys of that TypedDict (``output_attentions``, ``cu_seq_lens_q``, ...); any other key binds, reaches the
    attention layers and is dropped there without a word (a BERT tokenizer's ``token_type_ids`` given to a
    Llama, say). Untyped ``**kwargs`` take any key: nothing to check against.

    Raises:
        TypeError: naming the keys, the forward's inputs and the fix.

    Example::

        >>> from typing import TypedDict, Unpack
        >>> class Options(TypedDict, total=False):
        ...     output_attentions: bool
        >>> class Decoder(nn.Module):
        ...     def forward(self, input_ids, attention_mask=None, **kwargs: Unpack[Options]): ...
        >>> check_keywords(Decoder(), {"input_ids": None, "output_attentions": False}, "example_inputs")
        >>> check_keywords(Decoder(), {"input_ids": None, "token_type_ids": None}, "example_inputs")
        Traceback (most recent call last):
        ...
        TypeError: example_inputs has the key 'token_type_ids', which Decoder.forward does not take (its inputs: input_ids, attention_mask; its **kwargs take only output_attentions): drop it, e.g. {k: v for k, v in inputs.items() if k not in {'token_type_ids'}}
    """
    signature = _signature(module)
    typed = None if signature is None else _typed_keywords(module, signature)
    if typed is None:
        return
    named = [p.name for p in signature.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    unknown = sorted(set(kwargs) - set(named) - typed)
    if unknown:
        keys = ", ".join(repr(k) for k in unknown)
        raise TypeError(
            f"{name} has the key{'s' if len(unknown) > 1 else ''} {keys}, which {type(module).__name__}.forward does "
            f"not take (its inputs: {', '.join(named)}; its **kwargs take only {', '.join(sorted(typed))}): drop "
            f"{'them' if len(unknown) > 1 else 'it'}, e.g. {{k: v for k, v in inputs.items() if k not in {{{keys}}}}}"
        )


def example_args(module: nn.Module, example_inputs: Any, name: str = "example_inputs") -> tuple[tuple, dict]:
    """``(args, kwargs)`` for calling ``module`` on ``example_inputs``, checked against its forward.

    A tensor is one positional input, a tuple or list holds positional inputs, a dict (string keys,
    such as a tokenizer's ``BatchEncoding``) holds keyword inputs.

    Raises:
        TypeError: ``example_inputs`` has none of these forms, does not fit the forward's parameters
            (naming them), has a key typed ``**kwargs`` do not take (see :func:`check_keywords`), or puts a
            tensor in the forward's cache slot (see :func:`check_cache_slots`).

    Example::

        >>> example_args(nn.Linear(3, 2), {"input": torch.ones(1, 3)})[1].keys()
        dict_keys(['input'])
    """
    if isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    elif isinstance(example_inputs, Mapping) and all(isinstance(k, str) for k in example_inputs):
        args, kwargs = (), dict(example_inputs)
    else:
        raise TypeError(
            f"{name} must be a tensor, a tuple of positional inputs or a dict of keyword inputs (what a tokenizer "
            f"returns, e.g. {{'input_ids': ids, 'attention_mask': mask}}), got {type(example_inputs).__name__}"
        )
    check_cache_slots(module, args, name)
    check_keywords(module, kwargs, name)
    signature = _signature(module)
    if signature is not None:
        try:
            signature.bind(*args, **kwargs)
        except TypeError as e:
            given = f"{len(args)} positional input(s)" + (f" and the keywords {sorted(kwargs)}" if kwargs else "")
            raise TypeError(
                f"{name} ({given}) does not fit {type(module).__name__}.forward{_plain(signature)}: {e}; "
                "give the inputs the model takes"
            ) from None
    return args, kwargs


def _plain(signature: inspect.Signature) -> str:
    """The signature without annotations (transformers' are long)."""
    empty = inspect.Parameter.empty
    parameters = [p.replace(annotation=empty) for p in signature.parameters.values()]
    return str(signature.replace(parameters=parameters, return_annotation=empty))


def is_token_input(value: Any) -> bool:
    """A 2-D integer or bool tensor: token ids, a padding mask, positions, labels (``[batch, seq]``)."""
    return isinstance(value, torch.Tensor) and value.dim() == 2 and not value.is_floating_point() and not value.is_complex()


def sequence_lengths(args: tuple, kwargs: Mapping[str, Any]) -> set[int]:
    """The sequence lengths (dim 1) of the token inputs among ``args`` and ``kwargs``.

    Example::

        >>> sequence_lengths((), {"input_ids": torch.ones(2, 7, dtype=torch.long), "pixel_values": torch.ones(2, 3)})
        {7}
    """
    return {v.shape[1] for v in tree_leaves((args, dict(kwargs))) if is_token_input(v)}


def dynamic_dims(module: nn.Module, args: tuple, kwargs: Mapping[str, Any], *, batch: bool, sequence: bool) -> Any:
    """``dynamic_shapes`` for ``torch.export.export(module, args, kwargs)``: ``Dim.DYNAMIC`` for dim 0 of every
    tensor input (``batch``) and for every dimension whose size is a token input's sequence length
    (``sequence``; dim 0 of a 2-D or larger tensor is the batch and never counts as a sequence).

    Returns:
        The spec, shaped like the inputs: a tuple for positional inputs only, else a dict keyed by the
        forward's parameter names (torch.export's form for keyword inputs).

    Example::

        >>> ids = torch.ones(2, 7, dtype=torch.long)
        >>> dynamic_dims(nn.Linear(7, 2), (ids,), {}, batch=False, sequence=True) == ({1: Dim.DYNAMIC},)
        True
    """
    lengths = sequence_lengths(args, kwargs) if sequence else set()

    def spec(value: Any) -> dict[int, Any] | None:
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            return None
        dims = {0: Dim.DYNAMIC} if batch else {}
        first = 1 if value.dim() > 1 else 0
        dims.update({d: Dim.DYNAMIC for d in range(first, value.dim()) if value.shape[d] in lengths})
        return dims or None

    return _shaped_like(module, args, kwargs, spec)


def _shaped_like(module: nn.Module, args: tuple, kwargs: Mapping[str, Any], leaf: Callable[[Any], Any]) -> Any:
    if not kwargs:
        return tree_map(leaf, tuple(args))
    signature = _signature(module)
    if signature is None:  # torch.export binds keyword inputs by the forward's names: none to bind by
        return None
    bound = signature.bind(*args, **kwargs).arguments
    return {k: tree_map(leaf, v) for k, v in bound.items()}
