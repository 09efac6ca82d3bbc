"""The masking half of the prepare recipe, as named steps.

:meth:`BaseSparsifier.prepare <fx_sparsity.sparsifier.base.BaseSparsifier.prepare>` parses the
config and captures the model once (:func:`passes.capture`); then, here: find its weights ->
note the ones left dense -> select them by the config -> build and validate the sparsifier's
groups -> check hooks -> insert masks -> attach the sparsifier and record what ``prepare``
knows in ``gm.meta``. Every check runs before the first rewrite, and the user's model is never
modified. ``ChannelPruner`` analyses the captured graph in between (its ``prepare_captured``).
The sparsifier is an argument, not an import: this module sits below the sparsifier classes.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch
from torch import fx, nn

from fx_sparsity.meta import set_source_model, set_unmatched
from fx_sparsity.sparsifier.mask_utils import as_mask
from fx_sparsity.utils.frames import caller_stacklevel
from passes.masking import insert_masks
from passes.matching import FqnRule, UnmatchedWeight, WeightMatch, select_weights, unmatched_weights
from passes.utils import get_tensor

if TYPE_CHECKING:
    from fx_sparsity.sparsifier.base import BaseSparsifier

__all__ = ["CaptureMethod", "mask_captured"]

CaptureMethod = Literal["auto", "symbolic_trace", "export"]


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
        f"no op to mask them:\n{lines}",
        UserWarning,
        stacklevel=caller_stacklevel(),
    )


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


def mask_captured(
    sparsifier: BaseSparsifier,
    model: nn.Module,
    gm: fx.GraphModule,
    rules: Sequence[FqnRule] | None,
    matches: Sequence[WeightMatch] | None = None,
    *,
    mask_dtype: torch.dtype | None = None,
) -> fx.GraphModule:
    """Step 2: mask the weights of the captured ``gm`` that ``rules`` select, and bind ``sparsifier`` to it.

    Args:
        sparsifier: an unbound sparsifier (see ``BaseSparsifier.check_unbound``).
        model: the user's model ``gm`` was captured from (FQNs in error messages, ``to_model``).
        gm: its capture, rewritten in place.
        rules: the parsed config (:func:`fx_sparsity.config.parse_config`; ``None`` selects every weight).
        matches: ``sparsifier.find_weights(gm)``, when the caller has them already.
        mask_dtype: the masks' dtype: ``None`` for each weight's own, ``torch.bool`` or a floating dtype.

    Returns:
        ``gm``, masked, with the sparsifier attached.
    """
    matches = sparsifier.find_weights(gm) if matches is None else list(matches)
    unmatched = unmatched_weights(model, gm, matches)
    selected = select_weights(model, matches, rules)
    if not selected:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv weight to sparsify")
    groups, initial_masks = sparsifier.make_groups(selected)
    chosen = [match for match, _ in selected]
    _check_hooks(gm, chosen)
    dtypes = {m.tensor_fqn: mask_dtype or get_tensor(gm, m.tensor_fqn).dtype for m in chosen}
    initial_masks = {
        fqn: as_mask(mask, dtypes[fqn], f"config entry for {fqn}: 'mask'") for fqn, mask in initial_masks.items()
    }
    gm = insert_masks(gm, chosen, mask_dtype=mask_dtype)
    sparsifier.attach(gm, groups, initial_masks)
    set_unmatched(gm, unmatched)
    set_source_model(gm, model)  # for to_model(gm)
    _warn_unmatched(unmatched, rules)
    return gm
