"""``prepare``: the compile-style entry point, as a recipe of named steps.

parse the config -> capture the model -> find its Linear/Conv weights -> select
them -> build and validate the sparsifier's groups -> insert masks -> attach the
sparsifier. Every check runs before the first rewrite, and the user's model is
never modified.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from torch import fx, nn

from passes import FqnRule, UnmatchedWeight, WeightMatch, select_weights, unmatched_weights
from passes.capturing.tracing import capture
from passes.masking.insert import insert_masks

from fx_sparsity.config import SparsityConfig, parse_config
from fx_sparsity.sparsifier import BaseSparsifier, WeightNormSparsifier
from fx_sparsity.utils.frames import caller_stacklevel
from fx_sparsity.deploy.user_model import SOURCE_MODEL_META_KEY, SourceModel

__all__ = ["prepare", "UNMATCHED_META_KEY", "get_unmatched"]

# gm.meta key: the Linear/Conv-like weights of the model that prepare could not mask, as UnmatchedWeight records.
UNMATCHED_META_KEY = "fx_sparsity.unmatched"


def get_unmatched(gm: fx.GraphModule) -> tuple[UnmatchedWeight, ...]:
    """The Linear/Conv-like weights of the user's model that ``prepare`` found no op for (they stay dense)."""
    return tuple(getattr(gm, "meta", {}).get(UNMATCHED_META_KEY, ()))


def _wanted(rules: Sequence[FqnRule] | None, tensor_fqn: str) -> bool:
    """Whether the config would select ``tensor_fqn`` by its name (``None`` selects everything)."""
    if rules is None:
        return True
    names = (tensor_fqn, tensor_fqn.rpartition(".")[0])
    for rule in rules:
        if rule.by == "pattern" and any(fnmatch.fnmatchcase(n, rule.key) for n in names):
            return True
        if rule.by != "pattern" and rule.key in names:
            return True
    return False


def _warn_unmatched(unmatched: Sequence[UnmatchedWeight], rules: Sequence[FqnRule] | None) -> None:
    wanted = [u for u in unmatched if _wanted(rules, u.tensor_fqn)]
    if not wanted:
        return
    lines = "\n".join(f"  {u.tensor_fqn}: {u.reason}; remedy: {u.remedy}" for u in wanted)
    warnings.warn(
        f"{len(wanted)} Linear/Conv-like weight(s) the config selects stay dense, the captured graph gives "
        f"no op to mask them (capture_method='export' with example_inputs often finds them):\n{lines}",
        UserWarning,
        stacklevel=caller_stacklevel(),
    )


def _check_sparsifier(sparsifier: object) -> BaseSparsifier:
    if sparsifier is None:
        return WeightNormSparsifier()
    if not isinstance(sparsifier, BaseSparsifier):
        raise TypeError(
            f"sparsifier must be a BaseSparsifier instance such as WeightNormSparsifier(), got {type(sparsifier).__name__}"
        )
    sparsifier.check_unbound()
    return sparsifier


def _check_hooks(gm: fx.GraphModule, matches: Sequence[WeightMatch]) -> None:
    """Refuse forward hooks on modules whose calls the mask insertion rewrites into functional ops."""
    for match in matches:
        for fqn in match.call_module_fqns:
            module = gm.get_submodule(fqn)
            hooks = len(module._forward_pre_hooks) + len(module._forward_hooks)
            if hooks:
                raise ValueError(
                    f"{fqn!r} ({type(module).__name__}) has {hooks} forward hook(s) or pre-hook(s); prepare "
                    f"rewrites its call into F.{match.kind}(x, weight * mask), which would not run them, and "
                    "the fused and masked modules would then differ. Remove the hooks before prepare, "
                    f"or leave {match.tensor_fqn!r} out of the config"
                )


def prepare(
    model: nn.Module,
    config: SparsityConfig = None,
    *,
    sparsifier: BaseSparsifier | None = None,
    example_inputs: Any = None,
    dynamic_shapes: Any = None,
    capture_method: Literal["auto", "symbolic_trace", "export"] = "auto",
    leaf_modules: type[nn.Module] | Iterable[type[nn.Module] | str] = (),
    concrete_args: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """Return a new ``GraphModule`` computing ``model`` with a mask on each selected weight.

    Capture (symbolic tracing, or ``torch.export`` when that fails and
    ``example_inputs`` are given), match Linear/Conv weights, select them by
    ``config`` and insert ``mul(weight, mask)`` nodes with all-ones mask buffers
    (or the config's initial ``"mask"``). ``model`` is not modified; its
    parameters are shared, not copied.

    Args:
        model: the module to sparsify.
        config: ``None`` selects every Linear and Conv weight; else a list of
            dicts (torch.ao.pruning form) or an FQN-keyed dict whose entries
            override the sparsifier's arguments (see :mod:`fx_sparsity.config`).
        sparsifier: the sparsifier to prepare (one not prepared yet);
            ``WeightNormSparsifier()`` when ``None``. Either way
            ``fx_sparsity.get_sparsifier(gm)`` returns it, ready for ``step()``.
        example_inputs: a tensor or tuple, for the ``torch.export`` fallback.
        dynamic_shapes: for the ``torch.export`` capture; by default dim 0 of every
            tensor input is dynamic where export allows (else a warning says why).
        capture_method: ``"auto"`` (symbolic tracing, export when it fails and
            ``example_inputs`` are given), ``"symbolic_trace"`` or ``"export"``.
        leaf_modules, concrete_args: symbolic-tracing knobs.

    Weights of Linear/Conv-like modules that the graph gives no op for (hidden
    in a ``torch.fx.wrap``'ed function, inside a leaf module, ...) stay dense:
    ``get_unmatched(gm)`` lists them with the reason and the remedy, the
    sparsity table shows them, and a ``UserWarning`` names those the config selects.

    ``gm`` keeps a reference to ``model`` (not pickled) so that
    :func:`fx_sparsity.to_model` can return a pruned copy of its class.

    Returns:
        The prepared ``GraphModule``.

    Raises:
        TypeError / ValueError: bad arguments, a config entry that selects
            nothing or sets an unknown argument, hooks on a masked layer;
            raised before anything is built.
        CaptureError: the model could not be captured.

    Example::

        >>> gm = prepare(nn.Sequential(nn.Linear(8, 8)), {"0": {"sparsity_level": 0.75}})
        >>> get_sparsifier(gm).step()
        >>> gm.get_buffer("0.weight_mask").float().mean().item()  # bool mask: True = kept
        0.25
    """
    sparsifier = _check_sparsifier(sparsifier)
    rules = parse_config(config)
    gm = capture(
        model,
        example_inputs=example_inputs,
        leaf_modules=leaf_modules,
        concrete_args=concrete_args,
        dynamic_shapes=dynamic_shapes,
        method=capture_method,
    )
    matches = sparsifier.find_weights(gm)
    unmatched = unmatched_weights(model, gm, matches)
    selected = select_weights(model, matches, rules)
    if not selected:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv weight to sparsify")
    groups, initial_masks = sparsifier.make_groups(selected)
    chosen = [match for match, _ in selected]
    _check_hooks(gm, chosen)
    gm = insert_masks(gm, chosen)
    sparsifier.attach(gm, groups, initial_masks)
    gm.meta[UNMATCHED_META_KEY] = tuple(unmatched)
    gm.meta[SOURCE_MODEL_META_KEY] = SourceModel(model)  # for to_model(gm)
    _warn_unmatched(unmatched, rules)
    return gm
