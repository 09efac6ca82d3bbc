"""A shrunk transformers model back in its own class, with its config updated.

A transformers class takes every size from its config (``num_attention_heads``,
``num_key_value_heads``, ``intermediate_size``, ...), so a shrunk model comes back
only as a new instance built from an updated config. Which fields changed is not
guessed from names: each size field of the config is probed on the meta device
(the class built with the field changed, nothing allocated), which says which
tensor dimensions follow it and how (``rows = heads * head_dim``); the shrunk
tensors' shapes then give candidate values, and each combination that rebuilds
every tensor's shape is tried, fewest changed fields first, until one computes
what the shrunk module computes on the pruner's example inputs (two configs can
give the same shapes: 2 heads of 16 or 4 heads of 8). Where none does (the
layers ended with different sizes, or the class cannot hold a size at all: GPT-2
derives its head size from ``n_embd // n_head``), the error says which tensors
disagree and points to the shrunk ``GraphModule``, which exports and saves.
"""

from __future__ import annotations

import copy
import itertools
import re
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from fx_sparsity.calibration.meta_device import compute_buffers
from fx_sparsity.utils.running import as_model_inputs, eval_mode

__all__ = ["is_transformers_model", "resized_transformers_model", "SIZE_FIELDS"]

# Config fields that size tensors, in the spellings transformers' architectures use.
SIZE_FIELDS = (
    "hidden_size", "n_embd", "d_model",
    "intermediate_size", "n_inner", "d_ff", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim",
    "num_attention_heads", "n_head", "num_heads", "num_key_value_heads", "head_dim", "d_kv",
)
# Probe values for a field the config leaves to its default (GPT-2's n_inner=None means 4 * n_embd).
_UNSET_PROBES = (48, 96)
_MAX_TRIALS = 64


def is_transformers_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (one can exist only once transformers is imported:
    this never imports it)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def _shapes(cls: type, config: Any) -> dict[str, tuple[int, ...]] | None:
    """The state dict's shapes of ``cls(config)`` built on the meta device; ``None`` if the class refuses it."""
    try:
        with torch.device("meta"):
            model = cls(config)
    except Exception:  # a value the class cannot hold (e.g. n_embd % n_head != 0): not a candidate
        return None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _with(config: Any, values: dict[str, int]) -> Any:
    config = copy.deepcopy(config)
    for field, value in values.items():
        setattr(config, field, value)
    return config


def _explicit_head_dim(cls: type, config: Any, base: dict[str, tuple[int, ...]]) -> Any:
    """``config`` with ``head_dim = hidden_size // num_attention_heads`` written out when it is implied (Qwen2's
    config has no field, its attention reads ``getattr(config, "head_dim", ...)``), if the class builds the same
    shapes with it: then fewer heads keep their size instead of growing to fill the hidden size."""
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    if getattr(config, "head_dim", None) is not None or not isinstance(hidden, int) or not isinstance(heads, int):
        return config
    explicit = _with(config, {"head_dim": hidden // heads})
    return explicit if _shapes(cls, explicit) == base else config


def _candidates(cls: type, config: Any, base: dict[str, tuple[int, ...]], shrunk: dict[str, tuple[int, ...]]
                ) -> dict[str, list[int]]:
    """For each size field, the values the shrunk shapes imply for it (others unchanged), most frequent first."""
    found: dict[str, list[int]] = {}
    for field in SIZE_FIELDS:
        if not hasattr(config, field):
            continue
        old = getattr(config, field)
        if not (old is None or (isinstance(old, int) and not isinstance(old, bool) and old > 0)):
            continue
        v1, v2 = (old, 2 * old) if old is not None else _UNSET_PROBES
        s1 = base if old is not None else _shapes(cls, _with(config, {field: v1}))
        s2 = _shapes(cls, _with(config, {field: v2}))
        if s1 is None or s2 is None:
            continue
        votes: dict[int, int] = {}
        for name, shape in shrunk.items():
            a_shape, b_shape = s1.get(name), s2.get(name)
            if a_shape is None or b_shape is None or len(a_shape) != len(shape) or len(b_shape) != len(shape):
                continue
            for d1, d2, new in zip(a_shape, b_shape, shape):
                if d1 == d2:
                    continue
                slope, rest = divmod(d2 - d1, v2 - v1)
                if rest or slope <= 0:
                    continue
                value, rest = divmod(new - (d1 - slope * v1), slope)
                if not rest and value > 0:
                    votes[value] = votes.get(value, 0) + 1
        values = sorted(votes, key=lambda v: -votes[v])
        if values and values != [old]:
            found[field] = [v for v in values if v != old]
    return found


def _combinations(candidates: dict[str, list[int]]) -> Iterator[dict[str, int]]:
    """Field assignments, fewest changed fields first."""
    fields = list(candidates)
    for count in range(1, len(fields) + 1):
        for chosen in itertools.combinations(fields, count):
            for values in itertools.product(*(candidates[f] for f in chosen)):
                yield dict(zip(chosen, values))


def _per_layer_sizes(shrunk: dict[str, tuple[int, ...]]) -> list[str]:
    """Tensors of the same place in different layers (``layers.0`` vs ``layers.1``) whose shapes differ."""
    by_place: dict[str, dict[tuple[int, ...], str]] = {}
    for name, shape in shrunk.items():
        by_place.setdefault(re.sub(r"\.\d+\.", ".*.", name), {}).setdefault(shape, name)
    return [", ".join(f"{n} {list(s)}" for s, n in shapes.items()) for shapes in by_place.values() if len(shapes) > 1]


def _build(cls: type, config: Any, source: nn.Module, state: dict[str, torch.Tensor],
           buffers: dict[str, torch.Tensor]) -> nn.Module:
    """``cls(config)`` holding ``state``: built on the meta device, the tensors assigned, non-persistent buffers
    (rotary ``inv_freq``) taken from the shrunk module or, missing there, computed by the model's own init
    (:func:`fx_sparsity.calibration.meta_device.compute_buffers`)."""
    with torch.device("meta"):
        model = cls(config)
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    for fqn, buffer in list(model.named_buffers()):
        if buffer.is_meta and fqn in buffers:
            owner, _, name = fqn.rpartition(".")
            module = model.get_submodule(owner)
            module.register_buffer(name, buffers[fqn].clone(), persistent=name not in module._non_persistent_buffers_set)
    compute_buffers(model)  # those the shrunk module lacks: the class's own init computes them from the config
    left = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"the shrunk module holds no tensor for {', '.join(left[:3])}")
    model.generation_config = copy.deepcopy(getattr(source, "generation_config", None))
    return model.train(source.training)


def _listed(shapes: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{k} {list(s)}" for k, s in list(shapes.items())[:3])


def resized_transformers_model(small: nn.Module, source: nn.Module, example_inputs: Any) -> nn.Module:
    """``type(source)`` built from ``source.config`` with the sizes ``small`` ended with, holding its tensors.

    Args:
        small: the shrunk module (:func:`fx_sparsity.structured.shrink`), its tensors under ``source``'s names.
        source: the transformers model that was prepared (not modified; its config neither).
        example_inputs: the pruner's example inputs; the result must compute what ``small`` does on them.

    Returns:
        A new model of ``source``'s class whose ``config`` has the changed fields updated.

    Raises:
        ValueError: no config of the class holds every shrunk tensor's shape and computes what ``small`` does;
            the message names tensors whose sizes differ between layers, and the other way (the shrunk module).
    """
    cls = type(source)
    state = small.state_dict()
    buffers = dict(small.named_buffers())
    base = {k: tuple(v.shape) for k, v in source.state_dict().items()}
    shrunk = {k: tuple(v.shape) for k, v in state.items()}
    unknown = sorted(set(shrunk) - set(base))
    if unknown:
        raise ValueError(f"the shrunk module has tensors {cls.__name__} lacks ({', '.join(unknown[:3])}); pass the "
                         "model that was prepared as to_model(small, model=...)")
    changed = {k: s for k, s in shrunk.items() if base[k] != s}
    args, kwargs = as_model_inputs(example_inputs, "the pruner's example inputs")
    with torch.no_grad(), eval_mode(small):
        expected = small(*args, **kwargs)
    start = _explicit_head_dim(cls, source.config, base)
    trials = [{}] if not changed else _combinations(_candidates(cls, start, base, shrunk))
    for values in itertools.islice(trials, _MAX_TRIALS):
        config = _with(start, values)
        if _shapes(cls, config) != {**base, **shrunk} and values:
            continue
        model = _build(cls, config, source, state, buffers)
        with torch.no_grad(), eval_mode(model):
            try:
                torch.testing.assert_close(model(*args, **kwargs), expected)
            except Exception:  # the shapes fit, the computation does not (4 heads of 8 for 2 of 16)
                continue
        return model
    uneven = _per_layer_sizes(shrunk)
    why = (f"its layers ended with different sizes ({'; '.join(uneven[:3])}), and {type(source.config).__name__} "
           "holds one size for every layer" if uneven else
           f"no config of {cls.__name__} holds the shrunk sizes ({_listed(changed)}) and computes what the shrunk "
           "module does")
    raise ValueError(
        f"to_model cannot rebuild the shrunk {cls.__name__} as its own class: {why}. Use the shrunk GraphModule "
        "(it runs, exports with torch.export and saves), or prune with one level for every layer and only "
        "what the class can size from its config (whole heads where the head size is a config field, MLP widths)"
    )
