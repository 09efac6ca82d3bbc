"""Swap masked modules for sparse module types (torch.ao.pruning's ``convert``), in place.

Everything is checked before anything changes: the mapping, the module, and
that every new module holds every attribute the graph reads from the module it
replaces. Only then are the masks fused (:func:`passes.masking.fuse_masks`) and the
modules swapped. Like every pass it rewrites the module it is given and returns it:
``BaseSparsifier.convert`` hands it a clone unless asked for ``inplace=True``.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping

from torch import fx, nn

from passes.masking.fuse import fuse_masks
from passes.meta import get_sparse_target

__all__ = ["swap_modules"]


def _fused_copy(dense: nn.Module) -> nn.Module:
    """A shallow copy of ``dense`` whose weight is ``weight * mask`` and which has no mask buffer."""
    fused = copy.copy(dense)
    fused._parameters = dict(dense._parameters)
    fused._buffers = dict(dense._buffers)
    mask = fused._buffers.pop("weight_mask", None)
    if mask is not None:
        weight = dense.weight
        fused._parameters["weight"] = nn.Parameter((weight * mask).detach(), requires_grad=weight.requires_grad)
    return fused


def _new_module(dense: nn.Module, sparse_cls: type[nn.Module]) -> nn.Module:
    new = sparse_cls.from_dense(_fused_copy(dense))
    for hook in dense._forward_pre_hooks.values():
        new.register_forward_pre_hook(hook)
    for hook in dense._forward_hooks.values():
        new.register_forward_hook(hook)
    devices = {t.device for t in [*dense.parameters(), *dense.buffers()]}
    if len(devices) == 1:
        new.to(next(iter(devices)))
    return new


def _check_reads(graph: fx.Graph, fqn: str, new: nn.Module) -> None:
    """Raise when the graph reads an attribute of module ``fqn`` that ``new`` lacks (masks excepted)."""
    for node in graph.nodes:
        if node.op != "get_attr" or not node.target.startswith(fqn + "."):
            continue
        owner, _, name = node.target[len(fqn) + 1 :].rpartition(".")
        if name.endswith("_mask"):
            continue  # fused away before the swap
        try:
            getattr(new.get_submodule(owner), name)
        except AttributeError as e:
            raise ValueError(
                f"cannot swap {fqn!r} for {type(new).__name__}: the graph also reads "
                f"{node.target!r}, which the new module does not have"
            ) from e


def swap_modules(
    module: fx.GraphModule,
    mapping: Mapping[type[nn.Module], type[nn.Module]],
    sparsified: Collection[str],
) -> fx.GraphModule:
    """Fuse the masks of ``module``, then swap each sparsified module ``m`` for ``mapping[type(m)].from_dense(m)``.

    Only modules in ``sparsified`` that a graph node calls (as ``call_module``,
    or as the module a masked op replaced) are swapped; others stay as they are.
    Hooks of a swapped module move to its replacement.

    Args:
        module: a module returned by ``prepare`` (masked or squashed).
        mapping: dense module type -> sparse module type with a ``from_dense`` classmethod.
        sparsified: FQNs of the modules whose weights were sparsified.

    Returns:
        ``module``, its masks fused and its modules swapped.

    Raises:
        TypeError / ValueError: a bad mapping or module, or a new module that
            lacks an attribute the graph reads; nothing is modified then.
    """
    if not isinstance(mapping, Mapping) or not mapping:
        raise ValueError("mapping must be a non-empty dict like {nn.Linear: MySparseLinear}")
    for dense, sparse in mapping.items():
        if not callable(getattr(sparse, "from_dense", None)):
            raise TypeError(f"mapping[{getattr(dense, '__name__', dense)}] = {sparse!r} has no from_dense(module) classmethod")
    if not isinstance(module, fx.GraphModule):
        raise TypeError(f"module must be the GraphModule prepare() returned, got {type(module).__name__}")
    called = set()
    for node in module.graph.nodes:
        target = get_sparse_target(node)
        if target is not None and target.call_module_fqn:
            called.add(target.call_module_fqn)
        elif node.op == "call_module":
            called.add(node.target)
    swaps = {}
    for fqn in sorted(called & set(sparsified)):
        dense = module.get_submodule(fqn)
        if type(dense) in mapping:
            new = _new_module(dense, mapping[type(dense)])
            _check_reads(module.graph, fqn, new)
            swaps[fqn] = new
    module = fuse_masks(module)
    for fqn, new in swaps.items():
        owner, _, name = fqn.rpartition(".")
        setattr(module.get_submodule(owner), name, new)
    module.recompile()
    return module
