"""Turn the user's sparsity config into typed selection rules.

Accepted forms (``None`` selects every Linear and Conv weight):

* torch.ao.pruning's list of dicts: ``[{"tensor_fqn": "fc.weight", "sparsity_level": 0.9}]``;
  ``"module_fqn"`` or a glob ``"pattern"`` may stand in place of ``"tensor_fqn"``;
* a list mixing such dicts and bare strings (``["fc", "layer*.conv?"]``);
* an FQN-keyed dict: ``{"fc": {"sparsity_level": 0.9}, "layer1.*": {}}``.

Strings that contain ``*``, ``?`` or ``[`` are glob patterns; other strings
name a weight tensor or a module exactly. The other keys of an entry override
the sparsifier's defaults for the weights it selects. Precedence when several
entries select one weight: exact tensor FQN, then exact module FQN, then the
first matching pattern (see :mod:`passes.matching.select`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union

from passes.matching import FqnRule, is_pattern

__all__ = ["SparsityConfig", "parse_config", "RESERVED_KEYS"]

SparsityConfig = Union[None, Sequence[Union[str, Mapping[str, Any]]], Mapping[str, Mapping[str, Any]]]

# Keys derived from the selection itself; a config may not set them.
RESERVED_KEYS = frozenset({"module", "tensor_name"})
_SELECTORS = ("tensor_fqn", "module_fqn", "pattern")


def _rule_from_string(key: str, overrides: Mapping[str, Any]) -> FqnRule:
    if is_pattern(key):
        return FqnRule(key, "pattern", overrides)
    return FqnRule(key, "fqn", overrides)


def _rule_from_dict(entry: Mapping[str, Any], index: int) -> FqnRule:
    selectors = {k: entry[k] for k in _SELECTORS if k in entry}
    overrides = {k: v for k, v in entry.items() if k not in _SELECTORS}
    reserved = RESERVED_KEYS & overrides.keys()
    if reserved:
        raise ValueError(
            f"config[{index}] sets {sorted(reserved)}, which are derived from the selection; remove them"
        )
    for key, value in selectors.items():
        if not isinstance(value, str) or not value:
            raise TypeError(f"config[{index}][{key!r}] must be a non-empty string, got {value!r}")
    if not selectors:
        raise ValueError(
            f"config[{index}] = {dict(entry)!r} names no weight: give one of "
            "'tensor_fqn' (e.g. 'fc.weight'), 'module_fqn' (e.g. 'fc') or 'pattern' (e.g. 'layer*.fc')"
        )
    if "tensor_fqn" in selectors and "module_fqn" in selectors:
        tensor_fqn, module_fqn = selectors["tensor_fqn"], selectors["module_fqn"]
        if tensor_fqn.rpartition(".")[0] != module_fqn:
            raise ValueError(
                f"config[{index}] gives tensor_fqn={tensor_fqn!r} and module_fqn={module_fqn!r}, "
                "which disagree; keep only tensor_fqn"
            )
        del selectors["module_fqn"]
    if len(selectors) > 1:
        raise ValueError(f"config[{index}] gives {sorted(selectors)}; give exactly one of them")
    (by, key), = selectors.items()
    if by != "pattern" and is_pattern(key):
        by = "pattern"
    return FqnRule(key, by, overrides)


def parse_config(config: SparsityConfig) -> tuple[FqnRule, ...] | None:
    """Validate ``config`` and turn it into selection rules (``None`` stays ``None``).

    Raises:
        TypeError / ValueError naming the offending entry and the fix.

    Example::

        >>> parse_config([{"tensor_fqn": "fc.weight", "sparsity_level": 0.9}])[0].by
        'tensor_fqn'
    """
    if config is None:
        return None
    if isinstance(config, Mapping):
        if not config:
            raise ValueError("config is empty, which would select nothing: pass None to select every Linear and Conv weight")
        rules = []
        for key, overrides in config.items():
            if not isinstance(key, str) or not key:
                raise TypeError(f"config keys must be non-empty FQN strings, got {key!r}")
            if overrides is None:
                overrides = {}
            if not isinstance(overrides, Mapping):
                raise TypeError(
                    f"config[{key!r}] must be a dict of sparsifier arguments, got {type(overrides).__name__}"
                )
            reserved = RESERVED_KEYS.union(_SELECTORS) & overrides.keys()
            if reserved:
                raise ValueError(f"config[{key!r}] sets {sorted(reserved)}; the key already selects the weight")
            rules.append(_rule_from_string(key, overrides))
        return tuple(rules)
    if isinstance(config, (str, bytes)) or not isinstance(config, Sequence):
        raise TypeError(
            "config must be None, a list of dicts like [{'tensor_fqn': 'fc.weight'}] or an "
            f"FQN-keyed dict like {{'fc': {{'sparsity_level': 0.9}}}}; got {type(config).__name__}"
        )
    if not config:
        raise ValueError("config is empty, which would select nothing: pass None to select every Linear and Conv weight")
    rules = []
    for index, entry in enumerate(config):
        if isinstance(entry, str):
            rules.append(_rule_from_string(entry, {}))
        elif isinstance(entry, Mapping):
            rules.append(_rule_from_dict(entry, index))
        else:
            raise TypeError(
                f"config[{index}] must be a dict (e.g. {{'tensor_fqn': 'fc.weight'}}) or an FQN string, "
                f"got {type(entry).__name__}"
            )
    return tuple(rules)
