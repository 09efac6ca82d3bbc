"""``BaseSparsifier``: torch.ao.pruning's sparsifier contract on FX graphs.

The differences from ``torch.ao.pruning.BaseSparsifier``:

* ``prepare`` returns a new ``GraphModule`` (compile style) whose graph holds an
  explicit ``mul(weight, mask)`` per selected weight; the user's model is not
  modified and shares its parameters with the returned module.
* Masks are buffers ``<module_fqn>.<tensor_name>_mask`` of the returned module.
* ``state_dict`` returns copies, and ``load_state_dict`` copies in: two
  sparsifiers never share a mask or a state dict.
* Conv weights are supported; parameters are validated at ``prepare`` time.
"""

from __future__ import annotations

import abc
import copy
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import fx, nn

from passes import (
    capture,
    clone_sharing_tensors,
    find_weights,
    fuse_masks,
    get_sparse_target,
    insert_masks,
    masked_targets,
    select_weights,
)

from ..config import SparsityConfig, parse_config

__all__ = ["BaseSparsifier", "SPARSIFIER_META_KEY", "get_sparsifier"]

SPARSIFIER_META_KEY = "fx_sparsity.sparsifier"
# Keys of a group that are objects or derived from the graph, not configuration.
_KEYS_NOT_IN_STATE_DICT = ("module",)


def get_sparsifier(gm: fx.GraphModule) -> BaseSparsifier:
    """The sparsifier that prepared ``gm`` (``fx_sparsity.prepare`` makes one when given none).

    Raises:
        ValueError: ``gm`` was not returned by a ``prepare`` call.
    """
    sparsifier = getattr(gm, "meta", {}).get(SPARSIFIER_META_KEY)
    if sparsifier is None:
        raise ValueError(
            f"{type(gm).__name__} was not prepared by fx_sparsity: call fx_sparsity.prepare(model) first"
        )
    return sparsifier


class BaseSparsifier(abc.ABC):
    r"""Base class of all sparsifiers.

    Subclasses implement :meth:`update_mask`, and may override
    :meth:`validate_group` to check their arguments before anything is modified.

    Args:
        defaults: default sparsifier arguments; a config entry's own keys win.

    Attributes:
        model: the prepared ``GraphModule`` (``None`` before :meth:`prepare`).
        groups: one dict per selected weight: ``tensor_fqn``, ``module_fqn``,
            ``tensor_name``, ``module`` (the owner of the weight and its mask
            inside ``model``) and the merged arguments.
        state: per-tensor state keyed by tensor FQN (``step_count`` at least).
        enable_mask_update: :meth:`step` does nothing while ``False``.

    Example::

        >>> class RowZero(BaseSparsifier):
        ...     def update_mask(self, module, tensor_name, **kwargs):
        ...         getattr(module, tensor_name + "_mask")[0] = 0
        >>> sparsifier = RowZero()
        >>> gm = sparsifier.prepare(nn.Sequential(nn.Linear(4, 4)), None)
        >>> sparsifier.step()
        >>> gm.get_buffer("0.weight_mask")[0].sum().item()
        0.0
    """

    def __init__(self, defaults: dict[str, Any] | None = None) -> None:
        if defaults is not None and not isinstance(defaults, Mapping):
            raise TypeError(f"defaults must be a dict or None, got {type(defaults).__name__}")
        self.defaults: dict[str, Any] = dict(defaults or {})
        self.state: dict[str, dict[str, Any]] = defaultdict(dict)
        self.groups: list[dict[str, Any]] = []
        self.enable_mask_update = True
        self.model: fx.GraphModule | None = None

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.groups):
            lines.append(f"\tGroup {i}")
            lines += [f"\t    {k}: {group[k]}" for k in sorted(group) if k != "module"]
        return "\n".join(lines + [")"])

    # ----------------------------------------------------------------- hooks
    def validate_group(self, group: dict[str, Any], weight_shape: tuple[int, ...]) -> None:
        """Raise ``ValueError``/``TypeError`` when ``group``'s arguments cannot work.

        Called for every group at :meth:`prepare` (before any rewrite) and at
        :meth:`step` (before any mask changes). The base accepts everything.
        """

    def validate_groups(self, groups: list[dict[str, Any]]) -> None:
        """Raise ``ValueError`` when the groups cannot work together (after :meth:`validate_group`).

        Called at :meth:`prepare` and :meth:`step`. The base accepts everything.
        """

    def update_masks(self) -> None:
        """Update every group's mask; the base calls :meth:`update_mask` per group.

        Override it when masks depend on several groups at once (a global threshold).
        """
        for group in self.groups:
            self.update_mask(**group)

    @abc.abstractmethod
    def update_mask(self, module: nn.Module, tensor_name: str, **kwargs: Any) -> None:
        """Update ``getattr(module, tensor_name + "_mask")`` in place.

        ``module`` owns the weight and its mask inside the prepared module;
        ``kwargs`` holds the rest of the group (``tensor_fqn``, arguments, ...).
        """

    # ------------------------------------------------------------- utilities
    @staticmethod
    def get_mask(module: nn.Module, tensor_name: str) -> torch.Tensor:
        """The mask buffer of ``module.<tensor_name>``."""
        return getattr(module, f"{tensor_name}_mask")

    @staticmethod
    def masked_tensor(module: nn.Module, tensor_name: str) -> torch.Tensor:
        """The weight as the model sees it: ``weight * mask`` (what torch.ao.pruning scores)."""
        return getattr(module, tensor_name) * getattr(module, f"{tensor_name}_mask")

    def _require_model(self, what: str) -> fx.GraphModule:
        if self.model is None:
            raise RuntimeError(f"{what} needs a prepared model: call prepare(model, config) first")
        return self.model

    def _weight_shape(self, group: dict[str, Any]) -> tuple[int, ...]:
        return tuple(getattr(group["module"], group["tensor_name"]).shape)

    # ------------------------------------------------------------------ API
    def prepare(
        self,
        model: nn.Module,
        config: SparsityConfig = None,
        *,
        example_inputs: Any = None,
        leaf_modules: Iterable[type[nn.Module] | str] = (),
        concrete_args: dict[str, Any] | None = None,
    ) -> fx.GraphModule:
        """Capture ``model`` and insert a mask for every weight ``config`` selects.

        Args:
            model: the user's module; never modified.
            config: ``None`` (every Linear and Conv weight), a torch.ao.pruning
                list of dicts, or an FQN-keyed dict (see :mod:`fx_sparsity.config`).
            example_inputs: used to capture with ``torch.export`` when symbolic
                tracing fails.
            leaf_modules, concrete_args: symbolic-tracing knobs (see :func:`passes.capture`).

        Returns:
            The prepared ``GraphModule``; ``self.model`` refers to it and
            ``get_sparsifier(gm)`` returns this sparsifier.
        """
        rules = parse_config(config)
        gm = capture(model, example_inputs=example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args)
        selected = select_weights(model, find_weights(gm), rules)
        if not selected:
            raise ValueError(f"{type(model).__name__} has no Linear or Conv weight to sparsify")
        groups = []
        for match, overrides in selected:
            group = copy.deepcopy(self.defaults)
            group.update(overrides)
            group.update(tensor_fqn=match.tensor_fqn, module_fqn=match.module_fqn, tensor_name=match.tensor_name)
            self.validate_group(group, match.weight_shape)
            groups.append(group)
        self.validate_groups(groups)
        gm = insert_masks(gm, [match for match, _ in selected])
        for group in groups:
            group["module"] = gm.get_submodule(group["module_fqn"])
        gm.meta[SPARSIFIER_META_KEY] = self
        self.model, self.groups, self.state = gm, groups, defaultdict(dict)
        return gm

    def step(self) -> None:
        """Update every group's mask (under ``no_grad``) when ``enable_mask_update`` is set."""
        model = self._require_model("step()")
        if not masked_targets(model):
            raise RuntimeError("step() after squash_mask(): the masks are gone; prepare the model again")
        if not self.enable_mask_update:
            return
        for group in self.groups:
            self.validate_group(group, self._weight_shape(group))
        self.validate_groups(self.groups)
        with torch.no_grad():
            self.update_masks()
            for group in self.groups:
                state = self.state[group["tensor_fqn"]]
                state["step_count"] = state.get("step_count", 0) + 1

    def state_dict(self) -> dict[str, Any]:
        """``{"state": ..., "groups": ...}``: deep copies, masks included under ``state[fqn]["mask"]``."""
        state = {fqn: copy.deepcopy(dict(s)) for fqn, s in self.state.items()}
        for group in self.groups:
            mask = self.get_mask(group["module"], group["tensor_name"])
            state.setdefault(group["tensor_fqn"], {})["mask"] = mask.detach().clone()
        groups = [
            {k: copy.deepcopy(v) for k, v in g.items() if k not in _KEYS_NOT_IN_STATE_DICT} for g in self.groups
        ]
        return {"state": state, "groups": groups}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> None:
        """Restore groups, state and masks from :meth:`state_dict`, copying every tensor.

        The sparsifier must be prepared on a model with the same weights; each
        group's weight must have a mask in it. With ``strict=False``, groups
        whose weight has no mask are dropped instead of raising.
        """
        model = self._require_model("load_state_dict()")
        if not isinstance(state_dict, Mapping) or not {"state", "groups"} <= state_dict.keys():
            raise ValueError("state_dict must be a dict with 'state' and 'groups', as state_dict() returns")
        masked = {t.tensor_fqn: t for t in masked_targets(model)}
        groups, masks = [], {}
        for group in state_dict["groups"]:
            fqn = group.get("tensor_fqn")
            if fqn not in masked:
                if strict:
                    raise ValueError(
                        f"state_dict group {fqn!r} has no mask in the prepared model; prepare with a "
                        f"config that selects it (masked: {', '.join(masked) or 'none'}) or pass strict=False"
                    )
                continue
            group = copy.deepcopy(dict(group))
            group["module"] = model.get_submodule(masked[fqn].module_fqn)
            groups.append(group)
        for fqn, s in state_dict["state"].items():
            mask = s.get("mask")
            if mask is None or fqn not in masked:
                continue
            target_mask = model.get_buffer(masked[fqn].mask_fqn)
            if tuple(mask.shape) != tuple(target_mask.shape):
                raise ValueError(
                    f"mask of {fqn!r} has shape {tuple(mask.shape)} but the prepared weight has "
                    f"{tuple(target_mask.shape)}"
                )
            masks[fqn] = (target_mask, mask)
        for target_mask, mask in masks.values():
            target_mask.copy_(mask)
        state = defaultdict(dict)
        for fqn, s in state_dict["state"].items():
            state[fqn] = {k: copy.deepcopy(v) for k, v in s.items() if k != "mask"}
        self.groups, self.state = groups, state

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
        known = {g["module_fqn"] for g in self.groups}
        unknown = sorted(per_layer.keys() - known)
        if unknown:
            raise ValueError(f"params_to_keep_per_layer names {unknown}, which are not sparsified modules: {sorted(known)}")
        keep_all = tuple(params_to_keep or ())
        for group in self.groups:
            missing = [k for k in keep_all + per_layer.get(group["module_fqn"], ()) if k not in group]
            if missing:
                raise ValueError(f"cannot keep {missing} for {group['module_fqn']!r}: its group has {sorted(group)}")
        fuse_masks(model)
        for group in self.groups:
            keys = keep_all + per_layer.get(group["module_fqn"], ())
            if keys:
                group["module"].sparse_params = {k: group[k] for k in keys}
        return model

    def convert(
        self,
        module: fx.GraphModule,
        mapping: Mapping[type[nn.Module], type[nn.Module]],
        inplace: bool = False,
    ) -> fx.GraphModule:
        """Swap sparsified modules for ``mapping[type(m)].from_dense(m)`` after fusing their masks.

        Only modules called by a ``call_module`` node whose weight was masked
        are swapped; others stay as they are.

        Args:
            module: a module returned by :meth:`prepare` (masked or squashed).
            mapping: dense module type -> sparse module type with ``from_dense``.
            inplace: modify ``module`` instead of a copy sharing its parameters.
        """
        if not isinstance(mapping, Mapping) or not mapping:
            raise ValueError("mapping must be a non-empty dict like {nn.Linear: MySparseLinear}")
        for dense, sparse in mapping.items():
            if not callable(getattr(sparse, "from_dense", None)):
                raise TypeError(f"mapping[{dense.__name__}] = {sparse!r} has no from_dense(module) classmethod")
        if not isinstance(module, fx.GraphModule):
            raise TypeError(f"module must be the GraphModule prepare() returned, got {type(module).__name__}")
        targets = [get_sparse_target(n) for n in module.graph.nodes]
        fqns = {t.call_module_fqn for t in targets if t is not None and t.call_module_fqn}
        if not fqns:
            # Already squashed: the graph calls the sparsified modules directly.
            sparsified = {g["module_fqn"] for g in self.groups}
            fqns = {n.target for n in module.graph.nodes if n.op == "call_module" and n.target in sparsified}
        if not inplace:
            module = _clone_without_sparsifier(module)
        fuse_masks(module)
        swaps = {}
        for fqn in sorted(fqns):
            dense = module.get_submodule(fqn)
            if type(dense) in mapping:
                swaps[fqn] = _swap(dense, mapping[type(dense)])
        for node in module.graph.nodes:
            for fqn, new in swaps.items():
                if node.op == "get_attr" and node.target.startswith(fqn + "."):
                    rest = node.target[len(fqn) + 1 :]
                    try:
                        new.get_submodule(rest.rpartition(".")[0])
                        getattr(new.get_submodule(rest.rpartition(".")[0]), rest.rpartition(".")[2])
                    except AttributeError as e:
                        raise ValueError(
                            f"cannot swap {fqn!r} for {type(new).__name__}: the graph also reads "
                            f"{node.target!r}, which the new module does not have"
                        ) from e
        for fqn, new in swaps.items():
            _set_submodule(module, fqn, new)
        module.recompile()
        return module


def _clone_without_sparsifier(gm: fx.GraphModule) -> fx.GraphModule:
    sparsifier = gm.meta.pop(SPARSIFIER_META_KEY, None)
    try:
        return clone_sharing_tensors(gm)
    finally:
        if sparsifier is not None:
            gm.meta[SPARSIFIER_META_KEY] = sparsifier


def _swap(dense: nn.Module, sparse_cls: type[nn.Module]) -> nn.Module:
    new = sparse_cls.from_dense(dense)
    for hook in dense._forward_pre_hooks.values():
        new.register_forward_pre_hook(hook)
    for hook in dense._forward_hooks.values():
        new.register_forward_hook(hook)
    devices = {t.device for t in [*dense.parameters(), *dense.buffers()]}
    if len(devices) == 1:
        new.to(next(iter(devices)))
    return new


def _set_submodule(root: nn.Module, fqn: str, new: nn.Module) -> None:
    owner, _, name = fqn.rpartition(".")
    setattr(root.get_submodule(owner), name, new)
