"""Select matched weights by FQN rules.

A rule names a weight by its exact tensor FQN (``"fc.weight"``), by the exact FQN
of a module (``"fc"``), by an exact FQN that may be either (``by="fqn"``), or by
a glob pattern (``"layer*.conv?"``) tried against both module and tensor FQNs. Precedence, when several rules select the same
weight: exact tensor FQN, then exact module FQN, then the first matching pattern
in rule order. Each rule carries overrides (sparsifier arguments) for the weights
it selects.

A rule that selects nothing is an error: the message says what the name is
(a module of another type, a bias, an unused tensor) or lists the closest FQNs.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from torch import nn

from passes.matching.weights import WeightMatch
from passes.utils import split_fqn

__all__ = ["FqnRule", "select_weights", "is_pattern"]

_PRECEDENCE = {"tensor_fqn": 0, "fqn": 0, "module_fqn": 1, "pattern": 2}


def is_pattern(key: str) -> bool:
    """True when ``key`` holds glob characters (``*``, ``?``, ``[``)."""
    return any(c in key for c in "*?[")


@dataclass(frozen=True)
class FqnRule:
    """Select weights by ``key`` (see the module docstring) and attach ``overrides``."""

    key: str
    by: Literal["tensor_fqn", "module_fqn", "fqn", "pattern"]
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key:
            raise ValueError(f"FqnRule.key must be a non-empty string, got {self.key!r}")
        if self.by not in _PRECEDENCE:
            raise ValueError(f"FqnRule.by must be one of {sorted(_PRECEDENCE)}, got {self.by!r}")
        object.__setattr__(self, "overrides", MappingProxyType(dict(self.overrides)))

    def rank(self, match: WeightMatch) -> int:
        """Precedence of this rule for ``match``: lower wins."""
        if self.by == "fqn":
            return 0 if self.key in match.aliases else 1
        return _PRECEDENCE[self.by]

    def selects(self, match: WeightMatch) -> bool:
        if self.by == "tensor_fqn":
            return self.key in match.aliases
        if self.by == "module_fqn":
            return self.key in match.module_fqns
        if self.by == "fqn":
            return self.key in match.aliases or self.key in match.module_fqns
        names = match.aliases + match.module_fqns
        return any(fnmatch.fnmatchcase(name, self.key) for name in names)


def _describe(model: nn.Module, rule: FqnRule, matches: Sequence[WeightMatch]) -> str:
    """Why ``rule`` selects no Linear/Conv weight, for the error message."""
    key = rule.key
    for match in matches:
        if key in match.aliases:
            return f"{key!r} is a weight tensor, not a module: select it with tensor_fqn={key!r}"
        if key in match.module_fqns:
            return (
                f"{key!r} is a module, not a tensor: select it with module_fqn={key!r} "
                f"or tensor_fqn={match.tensor_fqn!r}"
            )
    modules = dict(model.named_modules())
    if key in modules:
        return f"{key!r} is a {type(modules[key]).__name__} module, not a Linear or Conv layer"
    owner, name = split_fqn(key)
    if owner in modules and hasattr(modules[owner], name):
        obj = getattr(modules[owner], name)
        what = type(obj).__name__
        return (
            f"{key!r} is a {what} of {type(modules[owner]).__name__} module {owner!r}, "
            "but no Linear or Conv op in the graph uses it as its weight"
            + ("; only ChannelPruner masks nn.LSTM parameters (whole hidden units)"
               if isinstance(modules[owner], nn.LSTM) else "")
        )
    candidates = [n for m in matches for n in m.aliases + m.module_fqns]
    candidates += [n for n in modules if n]
    close = difflib.get_close_matches(key, list(dict.fromkeys(candidates)), n=5, cutoff=0.5)
    hint = f"; closest FQNs: {', '.join(close)}" if close else ""
    return f"{key!r} names nothing in the model{hint}"


def select_weights(
    model: nn.Module, matches: Sequence[WeightMatch], rules: Sequence[FqnRule] | None
) -> list[tuple[WeightMatch, dict[str, Any]]]:
    """The weights the rules select, each with the overrides of its winning rule.

    Args:
        model: the module whose FQNs the rules name, to describe a name that
            selects nothing: best the user's model, whose containers the
            captured graph module may have flattened.
        matches: output of :func:`passes.matching.weights.find_weights`.
        rules: ``None`` selects every match with no overrides.

    Returns:
        ``(match, overrides)`` pairs in the order of ``matches``.

    Raises:
        ValueError: a rule selects nothing, or two exact rules name the same key.

    Example::

        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
        >>> sel = select_weights(gm, find_weights(gm), [FqnRule("1", "module_fqn", {"sparsity_level": 0.9})])
        >>> [(m.tensor_fqn, dict(o)) for m, o in sel]
        [('1.weight', {'sparsity_level': 0.9})]
    """
    if rules is None:
        return [(m, {}) for m in matches]
    seen: set[str] = set()
    for rule in rules:
        if rule.by != "pattern" and rule.key in seen:
            raise ValueError(f"config names {rule.key!r} twice; merge the two entries")
        seen.add(rule.key)
    for rule in rules:
        if not any(rule.selects(m) for m in matches):
            if rule.by == "pattern":
                raise ValueError(
                    f"config pattern {rule.key!r} matches no Linear or Conv weight; "
                    f"weights are: {', '.join(m.tensor_fqn for m in matches) or 'none'}"
                )
            raise ValueError(
                f"config entry {rule.key!r} selects no Linear or Conv weight: "
                f"{_describe(model, rule, matches)}"
            )
    selected = []
    for match in matches:
        winners = [r for r in rules if r.selects(match)]
        if not winners:
            continue
        # min() is stable: among patterns the first in rule order wins.
        best = min(winners, key=lambda r: r.rank(match))
        selected.append((match, dict(best.overrides)))
    return selected
