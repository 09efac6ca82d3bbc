"""``ChannelPruner``: structured pruning of whole channel groups, step 1 of the two-step flow.

:func:`passes.dependency.find_channel_groups` says which channels must go together
(a residual stream, a conv and the depthwise conv and BatchNorms after it). The
pruner scores each group's channels, picks the ones to remove, and zeroes them in
the explicit ``mul(weight, mask)`` masks of the group's producers (the weight rows
that compute the channel), as torch.ao.pruning's structured pruners do. The model
can be fine-tuned with the masks and ``step()`` called again; step 2,
:func:`fx_sparsity.structured.shrink`, removes the channels physically.

Counting rule (exact, per group of ``n`` channels in ``b`` blocks): remove
``floor(ratio * n)`` channels, then fewer when needed so that the number kept is a
multiple of ``lcm(round_to, b)``; the kept count is rounded *up*, so a group never
loses more than ``ratio * n`` channels (Torch-Pruning rounds the removal up instead).
A group whose kept count cannot be rounded within ``n`` keeps all its channels.

Criteria (``ChannelPruner(criterion=...)``): ``"l1"``/``"l2"``/``"fpgm"`` score the
masked producer rows; ``"taylor"`` scores ``sum |w * dL/dw|`` over every member of
the group that is a parameter with a gradient (producer rows, consumer columns,
biases, norm weights), with gradients from :func:`~fx_sparsity.structured.accumulate_gradients` (consumed by
the next ``step()``) or else the ``.grad`` the user's own training steps left on the
parameters; ``"activation"`` scores the L2 norm of each channel where its
consumers read it (after any norm or activation), from ``fx_sparsity.calibrate``'s
input observers on the consumers. For these two, channels an earlier ``step()``
removed score 0, so gradual pruning only adds channels (as the norm criteria do,
scoring masked weights).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch
from torch import fx, nn

from fx_sparsity.config import SparsityConfig, parse_config
from fx_sparsity.sparsifier.base import INPUT_NORM_KEY, BaseSparsifier
from fx_sparsity.sparsifier.preparing import mask_captured
from fx_sparsity.structured.importance import (
    Criterion,
    activation_importance,
    channel_importance,
    channel_rows,
    channels_to_remove,
    count_to_remove,
    grouped_columns,
    taylor_importance,
)
from fx_sparsity.utils.running import fit_inputs, placeholder_values
from passes.capturing import CaptureError
from passes.dependency import ChannelGroup, find_channel_groups
from passes.masking import LSTM_KIND, find_lstm_weights
from passes.matching import WeightMatch, find_weights, select_weights
from passes.utils import get_tensor, tensor_aliases

__all__ = ["ChannelPruner"]

_WEIGHT_CRITERIA = ("l1", "l2", "fpgm")
_CRITERIA = (*_WEIGHT_CRITERIA, "taylor", "activation")


def _validate(args: dict[str, Any]) -> None:
    ratio, round_to = args.get("sparsity_level"), args.get("round_to")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ValueError(
            f"sparsity_level must be a number in [0, 1), got {ratio!r}; 1 would remove whole channel groups"
        )
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be a positive int (1, 8, 16, ...), got {round_to!r}")


class ChannelPruner(BaseSparsifier):
    r"""Zero whole channel groups in the masks of their producers (step 1); ``shrink`` removes them (step 2).

    Args:
        sparsity_level: the ratio of each group's channels to remove, in ``[0, 1)``
            (see the counting rule in the module docstring; torch.ao.pruning's name, and
            what the schedulers of :mod:`fx_sparsity.levels.scheduler` drive); per-weight
            overridable in the config (the entry of any producer of a group sets that
            group's ratio).
        criterion: ``"l1"`` or ``"l2"`` row norms (saliency) or ``"fpgm"`` (geometric
            median), scored on the masked weights of all the group's producers;
            ``"taylor"`` (``|weight x gradient|`` over the group's members: call
            :func:`accumulate_gradients` or leave ``.grad`` from training steps before
            ``step()``) or ``"activation"`` (L2 norm of each channel's activation at its
            consumers: call ``fx_sparsity.calibrate(gm, batches)`` before ``step()``; the
            consumers get masks, all ones unless ``mask_consumers``, for the observers).
        round_to: the kept count of each group is a multiple of this (8, 16 for
            hardware-friendly shapes); per-weight overridable.
        scope: ``"layer"`` (each group loses ``sparsity_level`` of its channels) or ``"global"``
            (``sparsity_level`` of all selected channels go, chosen by importance divided by
            the group's mean importance; per-weight ratios are then refused).
        mask_consumers: also zero the removed channels' input columns in the
            consumers, so the masked module computes exactly what the shrunk one will
            (else a removed channel still passes its bias on, as in torch.ao.pruning,
            and ``shrink`` folds that constant into the next biases).

    ``prepare`` needs ``example_inputs`` (shapes are followed through the graph).
    With ``config=None`` every group that can shrink is pruned; a config names
    producer layers (``"layer1.0.conv1"``), and naming one whose channels cannot
    shrink (a model output, an unknown op) is a ``ValueError`` with the reason.
    ``frozen`` maps the groups left alone to why; ``unfollowed`` maps the modules whose
    parameters are in no group at all (a layer the dependency analysis does not know,
    such as ``nn.GRU``, or one it cannot reach) to why; both are kept whole. A group's
    producers that have no mask (an embedding table: T5's relative position bias, one
    column per head beside the heads' q/k/v rows) are neither scored nor zeroed, as long as
    the group has a masked producer; ``shrink`` removes their slices, and reports the result
    inexact if the removed channels still carried values that vary with the input.

    An ``nn.LSTM``'s hidden units are a group too: a removed unit's rows in the four gate
    blocks of every layer's ``weight_ih``/``weight_hh`` (``weight_hr``'s rows for a
    projection) and its entries of both biases are masked, the LSTM call becoming
    ``passes.masking.masked_lstm`` over ``mul(parameter, mask)`` nodes (``squash_mask`` and
    ``lower`` restore the ``nn.LSTM`` call). With its gate rows and biases zero a unit's
    cell and hidden state stay exactly 0, so ``shrink`` removes it exactly even without
    ``mask_consumers``. Only ``ChannelPruner`` masks LSTM parameters; other sparsifiers
    leave them dense.

    Example::

        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> pruner = ChannelPruner(sparsity_level=0.5)
        >>> gm = pruner.prepare(model, example_inputs=torch.randn(2, 8))
        >>> pruner.step()
        >>> int(gm.get_buffer("0.weight_mask").sum(1).eq(0).sum())
        8
    """

    def __init__(
        self,
        sparsity_level: float = 0.3,
        criterion: Criterion = "l1",
        round_to: int = 1,
        scope: Literal["layer", "global"] = "layer",
        mask_consumers: bool = False,
    ) -> None:
        # channel_groups: the indices of the channel groups a weight produces (or consumes), which prepare
        # derives from the dependency analysis; a config may not set it.
        defaults = {"sparsity_level": sparsity_level, "round_to": round_to, "channel_groups": ()}
        _validate(defaults)
        if criterion not in _CRITERIA:
            raise ValueError(f"criterion must be one of {', '.join(map(repr, _CRITERIA))}, got {criterion!r}")
        if scope not in ("layer", "global"):
            raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
        super().__init__(defaults=defaults)
        self.criterion, self.scope, self.mask_consumers = criterion, scope, bool(mask_consumers)
        self.channel_groups: tuple[ChannelGroup, ...] = ()
        self.frozen: dict[int, str] = {}
        self.unfollowed: dict[str, str] = {}
        self.example_inputs: Any = None  # as the user gave them (a tensor, a tuple, or a dict of keyword inputs)
        self.graph_inputs: Any = None  # the same, as the captured graph's placeholder values (what passes run)
        # Summed gradients from accumulate_gradients (criterion "taylor"), dropped by the next step().
        self.gradients: dict[str, torch.Tensor] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A pruner pickled before graph_inputs existed (0.1.0) was prepared from a tensor or a tuple: the graph's
        # form already.
        state.setdefault("graph_inputs", state.get("example_inputs"))
        self.__dict__.update(state)

    def prepare(  # type: ignore[override]
        self, model: nn.Module, config: SparsityConfig = None, *, example_inputs: Any = None, **kwargs: Any
    ) -> fx.GraphModule:
        """Find the channel groups of ``model``, then mask the producers (and consumers) of those to prune.

        The arguments are :func:`fx_sparsity.prepare`'s; ``example_inputs`` are required (shapes are
        followed through the graph): a tensor, a tuple of positional inputs or a dict of keyword inputs
        (what a tokenizer returns). The model is captured once: the groups are found on the capture
        (:meth:`prepare_captured`), which is then masked in place.
        """
        if example_inputs is None:
            raise ValueError("ChannelPruner.prepare needs example_inputs=(...): shapes are followed through the graph")
        return super().prepare(model, config, example_inputs=example_inputs, **kwargs)

    def capture(self, model: nn.Module, **capture_args: Any) -> fx.GraphModule:
        """``method="auto"``: symbolic tracing, ``torch.export`` only when tracing fails.

        Unlike :func:`passes.capture`'s ``"auto"`` for masking sparsifiers, a trace that keeps weights
        in ``torch.fx.wrap``'ed calls is kept: the dependency analysis follows the wrapped functions it
        has rules for (torchvision Swin's window attention and patch merging, whose weights the pruner
        scores through the group's other producers), where export's graph would spread them into
        pad/roll/index ops that freeze the groups.
        """
        if capture_args.get("method", "auto") != "auto" or capture_args.get("example_inputs") is None:
            return super().capture(model, **capture_args)
        try:
            return super().capture(model, **{**capture_args, "method": "symbolic_trace"})
        except CaptureError:
            return super().capture(model, **capture_args)

    def prepare_captured(
        self, model: nn.Module, gm: fx.GraphModule, rules: Any, example_inputs: Any, mask_dtype: torch.dtype | None = None
    ) -> fx.GraphModule:
        """The dependency analysis of the captured ``gm``, the plan of what to prune, then the masks."""
        graph_inputs = _graph_inputs(gm, example_inputs)
        groups = find_channel_groups(gm, graph_inputs)
        matches = self.find_weights(gm)
        maskable = {alias for match in matches for alias in match.aliases}
        plan = self._plan(model, groups, rules, matches)
        entries: dict[str, dict[str, Any]] = {}
        for index, overrides in plan.items():
            for m in groups[index].producers:
                if m.target not in maskable:  # a table lookup beside the masked producers: shrink slices it
                    continue
                entry = entries.setdefault(m.target, {"channel_groups": ()})
                if index not in entry["channel_groups"]:  # an LSTM weight produces in four gate blocks
                    entry.update(overrides, channel_groups=entry["channel_groups"] + (index,))
            # An LSTM unit whose gate rows and biases are all zero keeps h = c = 0: its biases are masked too.
            for m in groups[index].members:
                if m.kind == "param" and m.target in maskable:
                    entry = entries.setdefault(m.target, {"channel_groups": ()})
                    entry["channel_groups"] += (index,) if index not in entry["channel_groups"] else ()
            # The activation criterion observes the channels where the consumers read them: they need masks.
            observed = self.mask_consumers or self.criterion == "activation"
            for m in groups[index].consumers if observed else ():
                if m.target not in maskable:
                    continue
                entry = entries.setdefault(m.target, {"channel_groups": ()})
                entry["channel_groups"] += (index,) if index not in entry["channel_groups"] else ()
        self.unfollowed = _unfollowed(gm, groups)
        if not entries:
            reasons = [f"group {i}: {why}" for i, why in self.frozen.items()] + list(self.unfollowed.values())
            raise ValueError(
                f"no channel group of {type(model).__name__} can shrink ({'; '.join(reasons) or 'it has no Linear/Conv'})"
            )
        self.channel_groups, self.example_inputs, self.graph_inputs = groups, example_inputs, graph_inputs
        return mask_captured(self, model, gm, parse_config(entries), matches, mask_dtype=mask_dtype)

    def find_weights(self, gm: fx.GraphModule) -> list[WeightMatch]:
        """Linear/Conv weights and the parameters of each ``nn.LSTM`` (its hidden units are channels)."""
        return find_weights(gm) + find_lstm_weights(gm)

    def make_groups(self, selected: Any) -> Any:
        if not self.channel_groups:
            raise ValueError(
                "a ChannelPruner needs its channel groups, which its own prepare finds: prepare it with "
                "pruner.prepare(model, config, example_inputs=...) (or fx_sparsity.prepare with sparsifier=pruner), "
                "not the masking step of the recipe alone"
            )
        return super().make_groups(selected)

    def _plan(self, model: nn.Module, groups: tuple[ChannelGroup, ...], rules: Any,
              matches: list[WeightMatch]) -> dict[int, dict[str, Any]]:
        def blocker(group: ChannelGroup) -> str | None:
            if not group.prunable:
                return group.frozen_reason
            # A producer's rows are its mask's dim 0, or dim 1 for a weight stored [in, out] (x @ W). Producers
            # without a mask (an embedding table) may sit beside masked ones, which are scored and zeroed.
            masked = [p for p in group.producers if p.target in maskable]
            across = [p.target for p in masked if p.dim != row_dim[p.target]]
            if not masked or across:
                unmaskable = across or [p.target for p in group.producers]
                unmaskable = list(dict.fromkeys(unmaskable))  # an LSTM weight produces in four gate blocks
                return f"its producers {unmaskable} have no mask along their rows (not Linear/Conv/LSTM weights)"
            unobserved = [c.target for c in group.consumers if c.target not in observable]
            if self.criterion == "activation" and (unobserved or not group.consumers):
                return f"criterion 'activation' observes its consumers, and {unobserved or 'none'} cannot be observed"
            return None

        maskable = {alias for match in matches for alias in match.aliases}
        row_dim = {alias: int(match.transposed) for match in matches for alias in match.aliases}
        observable = {alias for match in matches if match.kind != LSTM_KIND for alias in match.aliases}  # Linear/Conv
        self.frozen = {g.index: why for g in groups if (why := blocker(g)) is not None}
        if rules is None:
            return {g.index: {} for g in groups if g.index not in self.frozen and g.producers}
        producer_of = {p.target: g for g in groups for p in g.producers}
        plan: dict[int, dict[str, Any]] = {}
        for match, overrides in select_weights(model, matches, rules):
            if "channel_groups" in overrides:
                raise ValueError(
                    f"config entry for {match.tensor_fqn} sets 'channel_groups', which prepare derives from the "
                    "dependency analysis; remove it"
                )
            group = next((producer_of[a] for a in match.aliases if a in producer_of), None)
            if group is None:
                raise ValueError(f"config selects {match.tensor_fqn}, which produces no channels the pruner follows")
            if group.index in self.frozen:
                raise ValueError(
                    f"config selects {match.tensor_fqn}, whose output channels (group {group.index}) cannot "
                    f"shrink: {self.frozen[group.index]}; remove it from the config"
                )
            if group.index in plan and plan[group.index] != dict(overrides):
                raise ValueError(
                    f"config gives {match.tensor_fqn} {dict(overrides)} but another producer of its channel "
                    f"group {group.index} {plan[group.index]}; coupled layers share one ratio"
                )
            plan[group.index] = dict(overrides)
        return plan

    def validate_group(self, group: dict[str, Any], weight_shape: tuple[int, ...]) -> None:
        _validate(group)

    def validate_groups(self, groups: list[dict[str, Any]]) -> None:
        args: dict[int, tuple] = {}
        for group in groups:
            for index in self._produced(group):
                value = (group["sparsity_level"], group["round_to"])
                if args.setdefault(index, value) != value:
                    raise ValueError(
                        f"producers of channel group {index} disagree on (sparsity_level, round_to): {args[index]} and "
                        f"{value} at {group['tensor_fqn']}; coupled layers share one ratio"
                    )
                if self.scope == "global" and group["sparsity_level"] != self.defaults["sparsity_level"]:
                    raise ValueError(
                        f"{group['tensor_fqn']} sets sparsity_level={group['sparsity_level']} but scope='global' "
                        f"uses one ratio ({self.defaults['sparsity_level']}) for all channels; drop the per-layer "
                        "value or use scope='layer'"
                    )

    def _produced(self, group: dict[str, Any]) -> list[int]:
        producers = lambda i: {p.target for p in self.channel_groups[i].producers}  # noqa: E731
        return [i for i in group.get("channel_groups", ()) if group["tensor_fqn"] in producers(i)]

    def update_mask(self, module: nn.Module, tensor_name: str, **kwargs: Any) -> None:
        raise NotImplementedError("ChannelPruner updates all masks at once in update_masks()")

    def pruned_groups(self) -> list[int]:
        """Indices of the channel groups this pruner scores (those with a producer in its config)."""
        return sorted({i for g in self.groups for i in self._produced(g)})

    def _score(self, index: int, weights: dict[str, Any]) -> torch.Tensor:
        group = self.channel_groups[index]
        if self.criterion in _WEIGHT_CRITERIA:
            rows = [
                channel_rows(self.masked_tensor(weights[p.target]["module"], weights[p.target]["tensor_name"]),
                              self._in_view(p, weights[p.target]), group.size).float()
                for p in group.producers
                if p.target in weights
            ]
            return channel_importance(torch.cat(rows, 1), self.criterion)
        gm = self._require_model("step()")
        if self.criterion == "taylor":
            return self._taylor_score(gm, group, weights)
        sums = []
        for c in group.consumers:
            norm = self.state.get(c.target, {}).get(INPUT_NORM_KEY)
            if norm is None:
                raise ValueError(
                    f"criterion 'activation' needs the activations {c.target} reads: run "
                    "fx_sparsity.calibrate(gm, batches) before step()"
                )
            # The observer's norms run over the input channels (global ones for a grouped conv), along dim 0.
            sums.append(channel_rows(norm.double().square(), dataclasses.replace(c, dim=0), group.size))
        return activation_importance(torch.cat(sums, 1)).float()

    def _in_view(self, member: Any, group: dict[str, Any]) -> Any:
        """``member`` in the ``[out, in]`` view of ``get_mask`` and ``masked_tensor``: its dim swapped for a weight
        stored ``[in, out]`` (``x @ W``), whose members name the stored dims."""
        if member.kind in ("producer", "consumer") and self._is_transposed(group["module"], group["tensor_name"]):
            return dataclasses.replace(member, dim=1 - member.dim)
        return member

    def _taylor_score(self, gm: fx.GraphModule, group: ChannelGroup, weights: dict[str, Any]) -> torch.Tensor:
        rows, grads = [], []
        for m in group.members:
            tensor = get_tensor(gm, m.target) if m.kind != "module" else None
            if not isinstance(tensor, nn.Parameter):
                continue
            grad = self.gradients.get(m.target) if self.gradients else tensor.grad
            if grad is None and m.kind == "producer":
                raise ValueError(
                    f"criterion 'taylor' needs the gradient of {m.target}: call "
                    "fx_sparsity.structured.accumulate_gradients(gm, batches, loss_fn), or run loss.backward() on gm, "
                    "before step()"
                )
            if grad is None:
                continue
            if m.target in weights:  # the weight as the model sees it, masked (stored layout, as the gradient)
                w = weights[m.target]
                tensor = tensor * getattr(w["module"], f"{w['tensor_name']}_mask")
            module = gm.get_submodule(m.target.rpartition(".")[0])
            groups = grouped_columns(module)
            rows.append(channel_rows(tensor.detach(), m, group.size, groups).double())
            grads.append(channel_rows(grad, m, group.size, groups).double())
        return taylor_importance(torch.cat(rows, 1), torch.cat(grads, 1)).float()

    def importance(self) -> dict[int, torch.Tensor]:
        """``{group index: score of each channel}`` under the criterion: what ``step()`` ranks (lowest go first).

        Example::

            >>> pruner = ChannelPruner(0.5)
            >>> gm = pruner.prepare(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)),
            ...                     example_inputs=torch.randn(1, 4))
            >>> {i: tuple(s.shape) for i, s in pruner.importance().items()}
            {0: (3,)}
        """
        weights = {g["tensor_fqn"]: g for g in self.groups}
        dead = self.removed_channels() if self.criterion not in _WEIGHT_CRITERIA else {}
        scores = {}
        for index in self.pruned_groups():
            scores[index] = self._score(index, weights)
            if index in dead:  # removed by an earlier step: stays removed
                scores[index][dead[index]] = 0.0
        return scores

    def update_masks(self) -> None:
        weights = {g["tensor_fqn"]: g for g in self.groups}
        args = {i: (g["sparsity_level"], g["round_to"]) for g in self.groups for i in self._produced(g)}
        scores = self.importance()
        self.gradients = {}
        counts = self._counts(scores, args)
        for g in self.groups:
            self.get_mask(g["module"], g["tensor_name"]).fill_(1)
        kinds = ("producer", "consumer") if self.mask_consumers else ("producer",)
        for index, count in counts.items():
            group = self.channel_groups[index]
            removed = channels_to_remove(scores[index], count, group.blocks)
            for m in group.members:
                if m.target in weights and (m.kind in kinds or m.kind == "param"):  # params: LSTM biases
                    _zero(weights[m.target], self._in_view(m, weights[m.target]), removed, self.get_mask)

    def _counts(self, scores: dict[int, torch.Tensor], args: dict[int, tuple]) -> dict[int, int]:
        groups = self.channel_groups
        if self.scope == "layer":
            return {i: count_to_remove(groups[i].size, args[i][0], args[i][1], groups[i].blocks) for i in scores}
        order = list(scores)
        normalized = torch.cat([scores[i] / scores[i].mean().clamp_min(1e-12) for i in order])
        owner = torch.cat([torch.full((groups[i].size,), n) for n, i in enumerate(order)])
        taken = owner[torch.sort(normalized, stable=True).indices[: math.floor(args[order[0]][0] * len(owner))]]
        counts = {}
        for n, i in enumerate(order):
            size, multiple = groups[i].size, args[i][1] * groups[i].blocks // math.gcd(args[i][1], groups[i].blocks)
            keep = max(size - int((taken == n).sum()), 1)
            counts[i] = size - min(size, -(-keep // multiple) * multiple)
        return counts

    def removed_channels(self) -> dict[int, torch.Tensor]:
        """``{group index: channels}`` whose producer rows are zero in every mask (what ``shrink`` removes)."""
        weights = {g["tensor_fqn"]: g for g in self.groups}
        removed = {}
        for index in {i for g in self.groups for i in self._produced(g)}:
            group = self.channel_groups[index]
            dead = torch.ones(group.size, dtype=torch.bool)
            for p in (p for p in group.producers if p.target in weights):
                mask = self.get_mask(weights[p.target]["module"], weights[p.target]["tensor_name"])
                dim = self._in_view(p, weights[p.target]).dim
                rows = mask.movedim(dim, 0).flatten(1).eq(0).all(1)[p.indices(torch.arange(group.size))]
                dead &= rows.reshape(group.size, -1).all(1)
            removed[index] = dead.nonzero().flatten()
        return removed


def _unfollowed(gm: fx.GraphModule, groups: tuple[ChannelGroup, ...]) -> dict[str, str]:
    """Module FQN -> why, for the modules owning parameters that no channel group holds."""
    members = {m.target for g in groups for m in g.members}
    aliases = tensor_aliases(gm)
    missing: dict[str, list[str]] = {}
    for fqn, tensor in gm.named_parameters():
        if members.isdisjoint(aliases[id(tensor)]):  # a tied weight is followed under any of its names
            owner, _, name = fqn.rpartition(".")
            missing.setdefault(owner, []).append(name)
    return {
        owner: f"{type(gm.get_submodule(owner)).__name__} {owner or '(root)'}: its parameters {names} are in no channel "
        "group (the dependency analysis does not follow this layer, or no channel reaches it); kept whole"
        for owner, names in missing.items()
    }


def _zero(group: dict[str, Any], member: Any, channels: torch.Tensor, get_mask: Any) -> None:
    """Zero ``channels`` of ``member`` in its weight's mask (per block for a grouped conv's input columns)."""
    module, mask = group["module"], get_mask(group["module"], group["tensor_name"])
    groups = getattr(module, "groups", 1) if isinstance(module, nn.modules.conv._ConvNd) else 1
    if member.kind == "consumer" and groups > 1 and mask.shape[1] > 1:
        per_group = mask.shape[1]
        blocks = mask.view(groups, mask.shape[0] // groups, *mask.shape[1:])
        for c in channels.tolist():
            blocks[c // per_group, :, c % per_group] = 0
        return
    mask.index_fill_(member.dim, member.indices(channels), 0)


def _graph_inputs(gm: fx.GraphModule, example_inputs: Any) -> Any:
    """``example_inputs`` in the form the dependency analysis and shrinking run ``gm``'s graph on: a dict of
    keyword inputs (what a tokenizer returns) as the graph's placeholder values, mapped by name and checked
    against ``gm``'s forward; a tensor or a tuple as it is (the passes check those)."""
    if not isinstance(example_inputs, dict):
        return example_inputs
    return tuple(placeholder_values(gm, *fit_inputs(gm, example_inputs, "example_inputs")))
