"""``BaseSparsifier``: torch.ao.pruning's sparsifier contract on FX graphs.

A sparsifier holds one typed :class:`~fx_sparsity.sparsifier.group.WeightGroup`
per selected weight (``sparsifier.records``), shown to torch.ao.pruning code as
dict-like groups (``sparsifier.groups``), plus per-weight ``state``. It computes
masks in :meth:`BaseSparsifier.step` and serialises with ``state_dict``.
:meth:`BaseSparsifier.prepare` is the prepare recipe: it captures the model once, then
:meth:`BaseSparsifier.prepare_captured` masks it (:mod:`fx_sparsity.sparsifier.preparing`);
fusing is :func:`passes.masking.fuse_masks`; module swapping is :func:`passes.masking.swap_modules`.

The differences from ``torch.ao.pruning.BaseSparsifier``:

* ``prepare`` returns a new ``GraphModule`` (compile style) whose graph holds an
  explicit ``mul(weight, mask)`` per selected weight; the user's model is not
  modified and shares its parameters with the returned module.
* A sparsifier serves one prepared module: preparing a second one with it is an error.
* Masks are buffers ``<module_fqn>.<tensor_name>_mask`` of the returned module, of the
  weight's dtype as torch.ao.pruning's (1 = kept), or bool with ``prepare(...,
  mask_dtype=torch.bool)`` (one byte per weight); ``state_dict`` gives them in that dtype,
  and :meth:`load_state_dict` and the config's initial ``"mask"`` take masks of any real
  dtype (a bool mask must hold 0/1 values, a float one finite values).
* ``state_dict`` returns copies, and ``load_state_dict`` validates everything,
  then copies in: two sparsifiers never share a mask or a state dict.
* Arguments are validated when they are set (config, constructor, scheduler),
  not at the first ``step()``, except where torch.ao.pruning's own behaviour is the
  contract: ``WeightNormSparsifier`` clamps a level outside [0, 1] (NaN is refused), and
  ``NearlyDiagonalSparsifier`` refuses an illegal ``nearliness`` at ``step()`` (before any
  mask changes). A group may carry keys the sparsifier does not name, passed through to
  ``update_mask(**kwargs)``, when its ``update_mask`` takes ``**kwargs`` and it is not one
  of fx_sparsity's own (:meth:`BaseSparsifier.takes_extra_keys`).
"""

from __future__ import annotations

import abc
import copy
import difflib
import inspect
import itertools
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn

from fx_sparsity.config import SparsityConfig, parse_config
from fx_sparsity.meta import clone_without_sparsifier, set_sparsifier
from fx_sparsity.sparsifier.group import STRUCTURAL_KEYS, GroupView, WeightGroup
from fx_sparsity.sparsifier.mask_utils import as_mask
from fx_sparsity.sparsifier.preparing import CaptureMethod, mask_captured
from fx_sparsity.utils.frames import caller_stacklevel
from passes import masked_targets
from passes.capturing import capture
from passes.compat import moved_names, resolve_qualified_name
from passes.masking import check_mask_dtype, fuse_masks, swap_modules
from passes.matching import FqnRule, WeightMatch, find_weights

__all__ = ["BaseSparsifier", "INPUT_NORM_KEY", "INITIAL_MASK_KEY"]

# A config key that is not an argument: torch.ao.pruning's initial mask of the weight.
INITIAL_MASK_KEY = "mask"
# Where fx_sparsity.calibrate stores each weight's input-channel norms (sparsifier.state[tensor_fqn][INPUT_NORM_KEY]),
# for sparsifiers that name no other statistic (Wanda, ChannelPruner's "activation" criterion, OWL).
INPUT_NORM_KEY = "input_norm"


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class BaseSparsifier(abc.ABC):
    r"""Base class of all sparsifiers.

    Subclasses implement :meth:`update_mask` (or :meth:`update_masks`), and may
    override :meth:`validate_group` / :meth:`validate_groups` to check their
    arguments before anything is modified.

    Args:
        defaults: the sparsifier's arguments and their default values. A config
            entry may override these keys (and give an initial ``"mask"``); any
            other key is an error.

    Attributes:
        model: the prepared ``GraphModule`` (``None`` before :meth:`prepare`).
        groups: torch.ao.pruning's dict-like view of each group (see :class:`GroupView`).
        records: the typed groups (:class:`WeightGroup`), in the same order.
        state: per-tensor state keyed by tensor FQN (what the sparsifier keeps: statistics, ...).
        steps: how many times :meth:`step` updated masks.
        enable_mask_update: :meth:`step` does nothing while ``False``.

    Example::

        >>> class RowZero(BaseSparsifier):
        ...     def update_mask(self, module, tensor_name, **kwargs):
        ...         getattr(module, tensor_name + "_mask")[0] = 0
        >>> sparsifier = RowZero()
        >>> gm = sparsifier.prepare(nn.Sequential(nn.Linear(4, 4)), None)
        >>> sparsifier.step()
        >>> gm.get_buffer("0.weight_mask")[0].tolist()
        [0.0, 0.0, 0.0, 0.0]
    """

    steps = 0  # also for sparsifiers pickled by fx_sparsity 0.1.0, which had no such attribute
    releasing_statistics = False  # set during step(release_statistics=True), for update_masks

    def __init__(self, defaults: Mapping[str, Any] | None = None) -> None:
        if defaults is not None and not isinstance(defaults, Mapping):
            raise TypeError(f"defaults must be a dict or None, got {type(defaults).__name__}")
        reserved = (set(STRUCTURAL_KEYS) | {INITIAL_MASK_KEY}) & set(defaults or {})
        if reserved:
            raise ValueError(f"defaults may not set {sorted(reserved)}: they name the weight or its mask")
        self.defaults: dict[str, Any] = dict(defaults or {})
        self.state: dict[str, dict[str, Any]] = defaultdict(dict)
        self.groups: list[GroupView] = []
        self.enable_mask_update = True
        self.steps = 0  # calls of step(); schedulers check that step() ran before them
        self.model: fx.GraphModule | None = None
        self._transposed: list[tuple[nn.Module, str]] = []  # (owner, tensor name) of weights stored [in, out]

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for i, record in enumerate(self.records):
            lines.append(f"\tGroup {i}")
            lines += [f"\t    {k}: {v}" for k, v in sorted(record.to_dict().items())]
        return "\n".join(lines + [")"])

    @property
    def records(self) -> tuple[WeightGroup, ...]:
        """The typed groups, one per sparsified weight, in graph order."""
        return tuple(view.record for view in self.groups)

    def update_group(self, tensor_fqn: str, **args: Any) -> None:
        """Set arguments of one group (validated first), e.g. ``update_group("fc.weight", sparsity_level=0.8)``."""
        for view in self.groups:
            if view.record.tensor_fqn == tensor_fqn:
                for key, value in args.items():
                    view[key] = value
                return
        raise KeyError(f"{tensor_fqn!r} is not sparsified; groups: {[r.tensor_fqn for r in self.records]}")

    # ----------------------------------------------------------------- hooks
    def validate_group(self, group: Mapping[str, Any], weight_shape: tuple[int, ...]) -> None:
        """Raise ``ValueError``/``TypeError`` when ``group``'s arguments cannot work.

        Called for every group at :meth:`prepare`, whenever an argument is set,
        and at :meth:`step`, always before anything changes. The base accepts everything.
        """

    def check_step(self, group: Mapping[str, Any], weight_shape: tuple[int, ...]) -> None:
        """Raise ``ValueError``/``TypeError`` when ``group`` cannot be stepped; called at :meth:`step` for every group
        before any mask changes. For arguments torch.ao.pruning accepts when they are set and refuses at ``step()``
        (``NearlyDiagonalSparsifier``'s ``nearliness``); the base accepts everything."""

    def validate_groups(self, groups: Sequence[Mapping[str, Any]]) -> None:
        """Raise ``ValueError`` when the groups cannot work together (after :meth:`validate_group`).

        Called at :meth:`prepare`, :meth:`load_state_dict` and :meth:`step`. The base accepts everything.
        """

    def target_sparsity(self, group: Mapping[str, Any]) -> float | None:
        """The fraction of zeros ``group`` aims at, for reports; ``None`` when unknown."""
        return None

    def find_weights(self, gm: fx.GraphModule) -> list[WeightMatch]:
        """The weights of the captured ``gm`` this sparsifier can select: ``passes.find_weights(gm)``
        (Linear and Conv weights). ``ChannelPruner`` adds ``nn.LSTM`` parameters."""
        return find_weights(gm)

    def update_masks(self) -> None:
        """Update every group's mask; the base calls :meth:`update_mask` per group.

        Override it when masks depend on several groups at once (a global threshold).
        """
        for group in self.groups:
            self.update_mask(**group)

    @abc.abstractmethod
    def update_mask(self, module: nn.Module, tensor_name: str, **kwargs: Any) -> None:
        """Update ``getattr(module, tensor_name + "_mask")`` (1 or ``True`` = kept) in place.

        ``module`` owns the weight and its mask inside the prepared module;
        ``kwargs`` holds the rest of the group (``tensor_fqn``, arguments, ...).
        """

    # ------------------------------------------------------------- utilities
    def _is_transposed(self, module: nn.Module, tensor_name: str) -> bool:
        return any(m is module and n == tensor_name for m, n in self._transposed)

    def get_mask(self, module: nn.Module, tensor_name: str) -> torch.Tensor:
        """The mask buffer (1 or ``True`` = kept) of ``module.<tensor_name>``, in the ``[out, in]`` view (a
        transposed view of the buffer for a weight stored ``[in, out]``; writing into it writes the buffer)."""
        mask = getattr(module, f"{tensor_name}_mask")
        return mask.t() if self._is_transposed(module, tensor_name) else mask

    def to_stored_layout(self, module: nn.Module, tensor_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (in the ``[out, in]`` view) in the layout ``module.<tensor_name>`` is stored in."""
        return tensor.t() if self._is_transposed(module, tensor_name) else tensor

    def masked_tensor(self, module: nn.Module, tensor_name: str) -> torch.Tensor:
        """The weight as the model sees it: ``weight * mask`` (what torch.ao.pruning scores), ``[out, in]`` view."""
        masked = getattr(module, tensor_name) * getattr(module, f"{tensor_name}_mask")
        return masked.t() if self._is_transposed(module, tensor_name) else masked

    def _require_model(self, what: str) -> fx.GraphModule:
        if self.model is None:
            raise RuntimeError(f"{what} needs a prepared model: call prepare(model, config) first")
        return self.model

    def _validate_record(self, record: WeightGroup) -> None:
        self.validate_group(record.to_dict(), record.view_shape)

    @classmethod
    def takes_extra_keys(cls) -> bool:
        """Whether config entries and state dicts may carry keys that are not arguments of this sparsifier.

        torch.ao.pruning passes a group's extra keys through to ``update_mask(**kwargs)``, and its own tests save and
        load them (``{"tensor_fqn": "linear1.weight", "test": 3}``). fx_sparsity does so for sparsifiers written
        outside fx_sparsity whose ``update_mask`` takes ``**kwargs``; its own sparsifiers name every argument, so an
        unknown key there is a mistake, refused with the closest argument.
        """
        method = cls.update_mask
        if (method.__module__ or "").split(".")[0] == "fx_sparsity":
            return False
        return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(method).parameters.values())

    def _check_keys(self, keys: Iterable[str], where: str) -> None:
        unknown = [k for k in keys if k not in self.defaults]
        extra_ok = self.takes_extra_keys()
        for key in unknown:
            close = difflib.get_close_matches(key, list(self.defaults), n=1, cutoff=0.8 if extra_ok else 0.6)
            if extra_ok and not close:
                continue  # passed through to update_mask(**kwargs), as torch.ao.pruning does
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"{where} sets {key!r}, which is not an argument of {type(self).__name__} "
                f"(its arguments: {', '.join(sorted(self.defaults)) or 'none'}){hint}"
            )

    # --------------------------------------------------------------- prepare
    def make_groups(
        self, selected: Sequence[tuple[WeightMatch, Mapping[str, Any]]]
    ) -> tuple[tuple[WeightGroup, ...], dict[str, torch.Tensor]]:
        """Typed, validated groups for the selected weights, and the initial masks the config gives.

        Args:
            selected: ``(match, overrides)`` pairs from :func:`passes.select_weights`.

        Returns:
            The groups, and ``{tensor_fqn: mask}`` for entries with an initial ``"mask"``.

        Raises:
            ValueError / TypeError: an unknown or invalid argument, or an initial
                mask of the wrong shape; nothing is modified.
        """
        groups, masks = [], {}
        for match, overrides in selected:
            overrides = dict(overrides)
            where = f"config entry for {match.tensor_fqn}"
            if INITIAL_MASK_KEY in overrides:
                masks[match.tensor_fqn] = _check_initial_mask(overrides.pop(INITIAL_MASK_KEY), match, where)
            self._check_keys(overrides, where)
            args = {**copy.deepcopy(self.defaults), **overrides}
            record = WeightGroup(match.tensor_fqn, match.kind, match.weight_shape, args, match.transposed)
            self._validate_record(record)
            groups.append(record)
        self.validate_groups([g.to_dict() for g in groups])
        return tuple(groups), masks

    def check_unbound(self) -> None:
        """Raise ``ValueError`` when this sparsifier already prepared a module (one sparsifier, one module)."""
        if self.model is not None:
            raise ValueError(
                f"this {type(self).__name__} already prepared a module and steps its masks; a sparsifier "
                f"serves one prepared module: make a new one, e.g. {type(self).__name__}(...) or "
                "copy.deepcopy(sparsifier) before the first prepare"
            )

    def attach(self, gm: fx.GraphModule, groups: Sequence[WeightGroup], initial_masks: Mapping[str, torch.Tensor]) -> None:
        """Bind this sparsifier to the prepared ``gm``: its groups, initial masks and ``gm.meta``.

        Subclasses may extend it (call ``super().attach`` first) to act once a module is prepared.
        """
        self.check_unbound()
        views = [GroupView(g, gm.get_submodule(g.module_fqn), self._validate_record) for g in groups]
        with torch.no_grad():
            for fqn, mask in initial_masks.items():
                gm.get_buffer(f"{fqn}_mask").copy_(mask)
        set_sparsifier(gm, self)
        self.model, self.groups, self.state = gm, views, defaultdict(dict)
        self._transposed = [(v.module, v.record.tensor_name) for v in views if v.record.transposed]

    def prepare(
        self,
        model: nn.Module,
        config: SparsityConfig = None,
        *,
        example_inputs: Any = None,
        dynamic_shapes: Any = None,
        capture_method: CaptureMethod = "auto",
        leaf_modules: type[nn.Module] | Iterable[type[nn.Module] | str] = (),
        concrete_args: dict[str, Any] | None = None,
        mask_dtype: torch.dtype | None = None,
    ) -> fx.GraphModule:
        """``fx_sparsity.prepare(model, config, sparsifier=self, ...)``: see there for the arguments.

        The recipe: check, parse the config, capture the model once (:func:`passes.capture`), then
        :meth:`prepare_captured`.

        Returns:
            The prepared ``GraphModule``; ``self.model`` refers to it and
            ``get_sparsifier(gm)`` returns this sparsifier.
        """
        self.check_unbound()
        _refuse_meta(model)
        rules = parse_config(config)
        mask_dtype = check_mask_dtype(mask_dtype)
        gm = self.capture(
            model,
            example_inputs=example_inputs,
            dynamic_shapes=dynamic_shapes,
            method=capture_method,
            leaf_modules=leaf_modules,
            concrete_args=concrete_args,
        )
        return self.prepare_captured(model, gm, rules, example_inputs, mask_dtype)

    def capture(self, model: nn.Module, **capture_args: Any) -> fx.GraphModule:
        """The capture :meth:`prepare` masks: :func:`passes.capture` with ``capture_args`` (its keyword
        arguments). A sparsifier that reads the graph differently may choose another capture for
        ``method="auto"`` (:class:`~fx_sparsity.structured.ChannelPruner` does)."""
        return capture(model, **capture_args)

    def prepare_captured(
        self,
        model: nn.Module,
        gm: fx.GraphModule,
        rules: Sequence[FqnRule] | None,
        example_inputs: Any,
        mask_dtype: torch.dtype | None = None,
    ) -> fx.GraphModule:
        """The second half of :meth:`prepare`: mask the weights of the captured ``gm`` that ``rules`` select
        (:func:`fx_sparsity.sparsifier.preparing.mask_captured`). A sparsifier that analyses the graph first
        (``ChannelPruner`` finds its channel groups) overrides it; ``gm`` is rewritten in place."""
        return mask_captured(self, model, gm, rules, mask_dtype=mask_dtype)

    # ------------------------------------------------------------------ step
    def step(self, tensor_fqns: Iterable[str] | None = None, *, release_statistics: bool = False) -> None:
        """Update the groups' masks (under ``no_grad``) when ``enable_mask_update`` is set.

        Args:
            tensor_fqns: step only the groups of these weights (``prune_sequential`` steps one block at a
                time); ``None`` steps every group. While a subset steps, :attr:`groups` holds that subset,
                so :meth:`update_masks` (of any subclass) sees only it; every group is validated either way.
            release_statistics: the stepped groups' calibration statistics (``state[fqn][calibration_key]``)
                are consumed: removed from :attr:`state` once used, and a sparsifier may reuse their memory
                (``prune_sequential`` without ``keep_statistics``). ``SparseGPTSparsifier`` then prunes and
                writes one weight at a time, releasing each Hessian as its weight is done and factorising it
                in its own memory, so that one weight's Hessian is held while it steps instead of all of
                them: an error then leaves the weights stepped before it with their new masks and weights.

        Raises:
            KeyError: ``tensor_fqns`` names a weight this sparsifier has no group for.
        """
        model = self._require_model("step()")
        if not masked_targets(model):
            raise RuntimeError("step() after squash_mask(): the masks are gone; prepare the model again")
        if not self.enable_mask_update:
            return
        for record in self.records:
            self._validate_record(record)
            self.check_step(record.to_dict(), record.view_shape)
        self.validate_groups([r.to_dict() for r in self.records])
        views = self.groups
        if tensor_fqns is not None:
            wanted = set(tensor_fqns)
            unknown = sorted(wanted - {v.record.tensor_fqn for v in views})
            if unknown:
                raise KeyError(f"step() names {unknown}, which have no group; groups: {[r.tensor_fqn for r in self.records]}")
            self.groups = [v for v in views if v.record.tensor_fqn in wanted]
        self.releasing_statistics = release_statistics
        try:
            with torch.no_grad():
                self.update_masks()
            if release_statistics:
                key = getattr(self, "calibration_key", INPUT_NORM_KEY)  # as fx_sparsity.calibrate stores it
                for group in self.groups:
                    self.state.get(group["tensor_fqn"], {}).pop(key, None)
        finally:
            self.groups = views
            self.releasing_statistics = False
        self.steps += 1

    # ----------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, Any]:
        """``{"sparsifier", "state", "groups"}``: deep copies; the masks (while there are any, in their buffers' dtype)
        under ``state[fqn]["mask"]``."""
        state = {fqn: copy.deepcopy(dict(s)) for fqn, s in self.state.items()}
        model = self.model
        for record in self.records:
            mask = getattr(model.get_submodule(record.module_fqn), f"{record.tensor_name}_mask", None)
            if isinstance(mask, torch.Tensor):
                state.setdefault(record.tensor_fqn, {})["mask"] = mask.detach().clone()
        groups = [copy.deepcopy(r.to_dict()) for r in self.records]
        return {"sparsifier": _qualified_name(type(self)), "state": state, "groups": groups}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> None:
        """Restore groups, state and masks from :meth:`state_dict`, copying every tensor.

        Everything is validated before anything changes: the state dict must come
        from a sparsifier of this type, its groups must name masked weights of the
        prepared module with valid arguments, and its masks must have their shapes.
        Masks may have any real dtype (torch.ao.pruning's float masks, fx_sparsity 0.1.0's
        bool ones); they are copied into the module's mask buffers, in the buffers' dtype: a bool
        buffer takes 0/1 values only, a float one any finite values.

        As in torch.ao.pruning, the state dict's groups and state replace this sparsifier's:
        a masked weight the state dict has no group for keeps its mask but is no longer
        stepped by this sparsifier (a ``UserWarning`` names it).

        Args:
            state_dict: what :meth:`state_dict` returned.
            strict: every group of the state dict must match a masked weight of the prepared
                module; with ``False``, groups without a mask are dropped.
        """
        model = self._require_model("load_state_dict()")
        groups, state, masks = self._parse_state_dict(model, state_dict, strict)
        with torch.no_grad():
            for fqn, mask in masks.items():
                model.get_buffer(f"{fqn}_mask").copy_(mask)
        loaded = {record.tensor_fqn for record in groups}
        dropped = [r.tensor_fqn for r in self.records if r.tensor_fqn not in loaded]
        self.groups = [GroupView(g, model.get_submodule(g.module_fqn), self._validate_record) for g in groups]
        self.state = defaultdict(dict, state)
        self._transposed = [(v.module, v.record.tensor_name) for v in self.groups if v.record.transposed]
        if dropped:
            warnings.warn(
                f"the state dict has no group for {dropped}: as in torch.ao.pruning its groups replace this "
                f"{type(self).__name__}'s, so these weights keep their masks but are no longer stepped",
                UserWarning,
                stacklevel=caller_stacklevel(),
            )

    def _parse_state_dict(
        self, model: fx.GraphModule, state_dict: Any, strict: bool
    ) -> tuple[list[WeightGroup], dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
        """Validated ``(groups, state, masks)`` of ``state_dict``; raises before anything changes."""
        if not isinstance(state_dict, Mapping) or not {"state", "groups"} <= state_dict.keys():
            raise ValueError("state_dict must be a dict with 'state' and 'groups', as state_dict() returns")
        kind = state_dict.get("sparsifier", _qualified_name(type(self)))
        # A state dict saved before the classes moved names its class by its old path, which still resolves.
        if kind != _qualified_name(type(self)) and resolve_qualified_name(kind) is not type(self):
            raise ValueError(
                f"state_dict comes from a {kind}, not a {_qualified_name(type(self))}: "
                "load it into a sparsifier of that type"
            )
        raw_state, raw_groups = state_dict["state"], state_dict["groups"]
        if not isinstance(raw_state, Mapping) or not all(isinstance(s, Mapping) for s in raw_state.values()):
            raise ValueError("state_dict['state'] must map tensor FQNs to dicts, as state_dict() returns")
        if isinstance(raw_groups, (str, bytes)) or not isinstance(raw_groups, Sequence):
            raise ValueError("state_dict['groups'] must be a list of group dicts, as state_dict() returns")
        masked = {t.tensor_fqn: t for t in masked_targets(model)}
        groups = []
        for i, raw in enumerate(raw_groups):
            if not isinstance(raw, Mapping) or not isinstance(raw.get("tensor_fqn"), str):
                raise ValueError(f"state_dict['groups'][{i}] must be a dict with a 'tensor_fqn' string, got {raw!r}")
            fqn = raw["tensor_fqn"]
            if fqn not in masked:
                if strict:
                    raise ValueError(
                        f"state_dict group {fqn!r} has no mask in the prepared model; prepare with a "
                        f"config that selects it (masked: {', '.join(masked) or 'none'}) or pass strict=False"
                    )
                continue
            args = {k: copy.deepcopy(v) for k, v in raw.items() if k not in STRUCTURAL_KEYS}
            self._check_keys(args, f"state_dict group {fqn!r}")
            missing = sorted(self.defaults.keys() - args.keys())
            if missing:
                raise ValueError(f"state_dict group {fqn!r} lacks the arguments {missing}")
            target = masked[fqn]
            record = WeightGroup(fqn, target.kind, target.weight_shape, args, target.transposed)
            self._validate_record(record)
            groups.append(record)
        names = [g.tensor_fqn for g in groups]
        if len(set(names)) != len(names):
            raise ValueError(f"state_dict names a weight twice among its groups: {names}")
        self.validate_groups([g.to_dict() for g in groups])
        state, masks = {}, {}
        for fqn, raw in raw_state.items():
            if fqn not in names:
                continue
            mask = raw.get("mask")
            if mask is not None:
                expected = masked[fqn].weight_shape
                if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != expected:
                    shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
                    raise ValueError(f"mask of {fqn!r} has shape {shape} but the prepared weight has {expected}")
                buffer = model.get_buffer(f"{fqn}_mask")
                masks[fqn] = as_mask(mask, buffer.dtype, f"state_dict mask of {fqn!r}")
            state[fqn] = {k: copy.deepcopy(v) for k, v in raw.items() if k != "mask"}
        return groups, state, masks

    # -------------------------------------------------------- squash, convert
    def squash_mask(
        self,
        params_to_keep: Iterable[str] | None = None,
        params_to_keep_per_layer: Mapping[str, Iterable[str]] | None = None,
    ) -> fx.GraphModule:
        """Fuse the masks into the weights of the prepared module and remove them.

        Weights become new tensors ``weight * mask`` (the user's parameters keep
        their dense values); mask nodes and buffers are removed and ``call_module``
        nodes restored. When ``params_to_keep`` (keys kept for every layer) or
        ``params_to_keep_per_layer`` (``{module_fqn: keys}``) is given, each
        sparsified module gets a ``sparse_params`` dict of those group values.

        Returns:
            The prepared module, now squashed.
        """
        model = self._require_model("squash_mask()")
        per_layer = {k: tuple(v) for k, v in (params_to_keep_per_layer or {}).items()}
        known = {r.module_fqn for r in self.records}
        unknown = sorted(per_layer.keys() - known)
        if unknown:
            raise ValueError(f"params_to_keep_per_layer names {unknown}, which are not sparsified modules: {sorted(known)}")
        keep_all = tuple(params_to_keep or ())
        for view in self.groups:
            missing = [k for k in keep_all + per_layer.get(view["module_fqn"], ()) if k not in view]
            if missing:
                raise ValueError(f"cannot keep {missing} for {view['module_fqn']!r}: its group has {sorted(view)}")
        fuse_masks(model)
        for view in self.groups:
            keys = keep_all + per_layer.get(view["module_fqn"], ())
            if keys:
                view.module.sparse_params = {k: view[k] for k in keys}
        return model

    def convert(
        self,
        module: fx.GraphModule,
        mapping: Mapping[type[nn.Module], type[nn.Module]],
        inplace: bool = False,
    ) -> fx.GraphModule:
        """Swap sparsified modules for ``mapping[type(m)].from_dense(m)`` after fusing their masks.

        See :func:`passes.masking.swap_modules`; only this sparsifier's weights' modules are
        swapped, in a clone of ``module`` sharing its tensors unless ``inplace``.
        """
        if not isinstance(module, fx.GraphModule):
            raise TypeError(f"module must be the GraphModule prepare() returned, got {type(module).__name__}")
        target = module if inplace else clone_without_sparsifier(module)
        return swap_modules(target, mapping, {r.module_fqn for r in self.records})


def _refuse_meta(model: Any) -> None:
    """A model with tensors on the meta device gets the pointer to prepare_on_meta (capture would refuse it too)."""
    if not isinstance(model, nn.Module):
        return
    meta = next((f for f, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta), None)
    if meta is not None:
        raise ValueError(
            f"model has tensors on the meta device ({meta}, ...): prepare needs real weights. For a model "
            "built on the meta device because it is too large for memory, use "
            "fx_sparsity.calibration.prepare_on_meta(model, config, sparsifier=...), then "
            "prune_sequential(gm, batches, weights=SafetensorsWeights(checkpoint)); else materialise the "
            "tensors first (model.to_empty(device='cpu') and load the weights)"
        )


def _check_initial_mask(mask: Any, match: WeightMatch, where: str) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{where}: 'mask' must be a tensor of the weight's shape {match.weight_shape}, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(match.weight_shape):
        raise ValueError(f"{where}: 'mask' has shape {tuple(mask.shape)}, the weight has {tuple(match.weight_shape)}")
    return mask.detach()


# Names of fx_sparsity 0.1.0's fx_sparsity.sparsifier.base that now live in fx_sparsity.meta.
__getattr__ = moved_names(
    __name__,
    {
        "get_sparsifier": "fx_sparsity.meta",
        "clone_without_sparsifier": "fx_sparsity.meta",
        "SPARSIFIER_META_KEY": "fx_sparsity.meta:SPARSIFIER_KEY",
    },
)
