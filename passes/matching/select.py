"""Select matched weights by FQN rules.

A rule names a weight by its exact tensor FQN (``"fc.weight"``), by the exact FQN
of a module (``"fc"``), by an exact FQN that may be either (``by="fqn"``), or by
a glob pattern (``"layer*.conv?"``) tried against both module and tensor FQNs. Precedence, when several rules select the same
weight: exact tensor FQN, then exact module FQN, then the first matching pattern
in rule order. Each rule carries overrides (sparsifier arguments) for the weights
it selects.

Names are those of the model the rules are written for (the user's model) as well as the captured
module's: a module reachable under two attributes (``self.b = self.a``) is selected by either name,
though symbolic tracing keeps only the first. Two exact rules naming one weight under two names with
different overrides are an error (neither has precedence).

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

from passes.matching.weights import WeightMatch, weight_parametrizations
from passes.utils import split_fqn, tensor_aliases

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

    def rank(self, match: WeightMatch | _Names) -> int:
        """Precedence of this rule for ``match``: lower wins."""
        if self.by == "fqn":
            return 0 if self.key in match.aliases else 1
        return _PRECEDENCE[self.by]

    def selects(self, match: WeightMatch | _Names) -> bool:
        if self.by == "tensor_fqn":
            return self.key in match.aliases
        if self.by == "module_fqn":
            return self.key in match.module_fqns
        if self.by == "fqn":
            return self.key in match.aliases or self.key in match.module_fqns
        names = match.aliases + match.module_fqns
        return any(fnmatch.fnmatchcase(name, self.key) for name in names)


@dataclass(frozen=True)
class _Names:
    """Every name of a matched weight, in the captured module and in the model the rules name: a module
    reachable under two attributes (``self.b = self.a``) gives its weight two names in the model, while
    the captured module (symbolic tracing keeps the first) may know only one."""

    aliases: tuple[str, ...]
    module_fqns: tuple[str, ...]


def _names(model: nn.Module, matches: Sequence[WeightMatch]) -> list[_Names]:
    """The :class:`_Names` of each match: its own, plus the model's names of the same tensor."""
    model_names = tensor_aliases(model)
    tensor_of = {fqn: tid for tid, fqns in model_names.items() for fqn in fqns}
    found = []
    for match in matches:
        tid = next((tensor_of[a] for a in match.aliases if a in tensor_of), None)
        extra = tuple(n for n in model_names.get(tid, ()) if n not in match.aliases)
        owners = tuple(split_fqn(n)[0] for n in extra)
        found.append(_Names(match.aliases + extra, tuple(dict.fromkeys(match.module_fqns + owners))))
    return found


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
    modules = dict(model.named_modules(remove_duplicate=False))
    owner, name = split_fqn(key)
    parts = key.split(".")
    # The module, the weight, or one of the parametrization's own tensors (<module>.parametrizations.weight.original).
    parametrized = parts[: parts.index("parametrizations")] if "parametrizations" in parts else None
    for fqn in (key, owner, *([".".join(parametrized)] if parametrized is not None else [])):
        if fqn in modules and weight_parametrizations(modules[fqn]):
            return (
                f"{fqn!r} is a {type(modules[fqn]).__name__} whose weight the parametrization "
                f"{', '.join(weight_parametrizations(modules[fqn]))} computes on each access: there is no stored "
                f"weight tensor to mask. Remove the parametrization before prepare "
                f"(torch.nn.utils.parametrize.remove_parametrizations(model.get_submodule({fqn!r}), 'weight')), "
                "or select only unparametrized layers"
            )
    if key in modules:
        return f"{key!r} is a {type(modules[key]).__name__} module, not a Linear or Conv layer"
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
        model: the module whose FQNs the rules name (its names of a weight select it too,
            and describe a name that selects nothing): best the user's model, whose
            containers the captured graph module may have flattened, and whose aliased
            modules symbolic tracing keeps under one name.
        matches: output of :func:`passes.matching.weights.find_weights`.
        rules: ``None`` selects every match with no overrides.

    Returns:
        ``(match, overrides)`` pairs in the order of ``matches``.

    Raises:
        ValueError: a rule selects nothing, two exact rules name the same key, or two exact rules
            name one weight under two of its names with different overrides.

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
    names = _names(model, matches)
    for rule in rules:
        if not any(rule.selects(n) for n in names):
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
    for match, match_names in zip(matches, names):
        winners = [r for r in rules if r.selects(match_names)]
        if not winners:
            continue
        # min() is stable: among patterns the first in rule order wins.
        best = min(winners, key=lambda r: r.rank(match_names))
        _check_not_ambiguous(match, match_names, best, winners)
        selected.append((match, dict(best.overrides)))
    return selected


def _check_not_ambiguous(match: WeightMatch, names: _Names, best: FqnRule, winners: Sequence[FqnRule]) -> None:
    """Refuse two exact rules of the same precedence that name one weight (under two of its names, a module and
    its alias) with different overrides: neither can win by the documented precedence."""
    if best.by == "pattern":
        return
    rivals = [
        r for r in winners
        if r is not best and r.by != "pattern" and r.rank(names) == best.rank(names) and r.overrides != best.overrides
    ]
    if rivals:
        raise ValueError(
            f"config entries {best.key!r} and {rivals[0].key!r} name the same weight {match.tensor_fqn} (its names: "
            f"{', '.join(names.aliases)}) with different arguments; merge them into one entry"
        )
