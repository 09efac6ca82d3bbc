"""Rewrite Linear/Conv ops so the graph shows an explicit ``mul(weight, mask)``.

For each selected weight tensor a mask buffer of ones (same shape, device and, by
default, dtype as the weight, torch.ao.pruning's contract and the fastest eager
multiply; ``mask_dtype=torch.bool`` stores one byte per entry instead, which ``mul``
promotes to the weight's dtype) is registered on the module that owns the weight as
``<tensor_name>_mask``, and one ``mul`` node is inserted before the weight's
first use. Every use then reads the masked weight:

* a ``call_module`` on ``nn.Linear``/``nn.ConvNd`` becomes the equivalent
  ``F.linear``/``F.convNd`` call (with an explicit ``F.pad`` for convs whose
  ``padding_mode`` is not ``"zeros"``), so the multiply is visible in the graph;
* a functional/ATen linear or conv, or a matrix product ``x @ W``
  (``addmm``/``mm``/``matmul``), gets its weight argument replaced;
* a ``call_module`` on ``nn.LSTM`` (matches of kind ``"lstm"``, one per masked
  parameter) becomes :func:`passes.masking.lstm.masked_lstm`, reading the masked
  parameters and the plain ``get_attr`` of the others.

Every node created or rewritten is tagged with a :class:`SparseTarget` under
``SPARSITY_META_KEY`` so :mod:`passes.masking.fuse` can undo the rewrite.
The pass mutates and returns ``gm``; callers that must keep their module
(``fx_sparsity.prepare``) hand it a fresh capture.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn

from passes.masking.lstm import LSTM_KIND, masked_lstm
from passes.matching.weights import WeightMatch, weight_position
from passes.meta import SPARSITY_META_KEY, SparseTarget
from passes.utils import get_tensor

__all__ = ["insert_masks", "check_mask_dtype"]

_CONV_FUNCS = {"conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d}


def _check_mask_names(gm: fx.GraphModule, matches: list[WeightMatch]) -> None:
    for match in matches:
        owner = gm.get_submodule(match.module_fqn)
        name = f"{match.tensor_name}_mask"
        if hasattr(owner, name):
            raise ValueError(
                f"cannot add mask buffer {match.module_fqn or '<root>'}.{name}: the module already "
                f"has an attribute {name!r} (is {match.tensor_fqn} masked already?)"
            )


def _functional_call(graph: fx.Graph, node: fx.Node, module: nn.Module, masked: fx.Node, target: SparseTarget) -> fx.Node:
    """A call_function equivalent of ``call_module`` ``node``, reading ``masked`` as its weight."""
    x = node.args[0] if node.args else node.kwargs["input"]
    bias = graph.get_attr(f"{node.target}.bias") if module.bias is not None else None
    name = f"{node.name}_{target.kind}"
    if target.kind == "linear":
        return graph.create_node("call_function", F.linear, (x, masked, bias), name=name)
    if module.padding_mode != "zeros":
        x = graph.call_function(
            F.pad, (x, module._reversed_padding_repeated_twice), {"mode": module.padding_mode}
        )
        x.meta[SPARSITY_META_KEY] = dataclasses.replace(target, role="pad")
        padding = (0,) * (module.weight.dim() - 2)
    else:
        padding = module.padding
    args = (x, masked, bias, module.stride, padding, module.dilation, module.groups)
    return graph.create_node("call_function", _CONV_FUNCS[target.kind], args, name=name)


def check_mask_dtype(mask_dtype: object) -> torch.dtype | None:
    """``mask_dtype`` when it is ``None`` (the weight's dtype), ``torch.bool`` or a floating dtype; else ``TypeError``."""
    if mask_dtype is None or mask_dtype == torch.bool:
        return mask_dtype
    if not isinstance(mask_dtype, torch.dtype) or not mask_dtype.is_floating_point:
        raise TypeError(
            f"mask_dtype must be None (the weight's dtype), torch.bool (one byte per weight) or a floating dtype, "
            f"got {mask_dtype!r}"
        )
    return mask_dtype


def _mask_mul(
    gm: fx.GraphModule, match: WeightMatch, node: fx.Node, masked_weight: dict[str, fx.Node], mask_dtype: torch.dtype | None
) -> fx.Node:
    """The ``mul(weight, mask)`` node of ``match`` (made before ``node``, with its mask buffer, on first use)."""
    if match.tensor_fqn in masked_weight:
        return masked_weight[match.tensor_fqn]
    graph = gm.graph
    base = SparseTarget(match.module_fqn, match.tensor_name, match.kind, match.weight_shape, transposed=match.transposed)
    weight = get_tensor(gm, match.tensor_fqn)
    owner = gm.get_submodule(match.module_fqn)
    owner.register_buffer(base.mask_name, torch.ones_like(weight, dtype=mask_dtype or weight.dtype))
    with graph.inserting_before(node):
        w = graph.get_attr(match.tensor_fqn)
        m = graph.get_attr(base.mask_fqn)
        name = f"masked_{match.tensor_fqn.replace('.', '_')}"
        mul = graph.create_node("call_function", operator.mul, (w, m), name=name)
    mul.meta[SPARSITY_META_KEY] = dataclasses.replace(base, role="mask_mul")
    masked_weight[match.tensor_fqn] = mul
    return mul


def _lstm_call(gm: fx.GraphModule, node: fx.Node, masked: dict[str, fx.Node], target: SparseTarget) -> None:
    """Replace ``call_module`` ``node`` on an nn.LSTM by ``masked_lstm(module, x, params, hx)``."""
    graph, fqn = gm.graph, node.target
    lstm = gm.get_submodule(fqn)
    x = node.args[0] if node.args else node.kwargs["input"]
    hx = node.args[1] if len(node.args) > 1 else node.kwargs.get("hx")
    with graph.inserting_before(node):
        module = graph.get_attr(fqn)
        params = [masked.get(f"{fqn}.{n}") or graph.get_attr(f"{fqn}.{n}") for n in lstm._flat_weights_names]
        new = graph.create_node("call_function", masked_lstm, (module, x, params, hx), name=f"{node.name}_lstm")
    new.meta.update(node.meta)
    new.meta[SPARSITY_META_KEY] = target
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def insert_masks(
    gm: fx.GraphModule, matches: Iterable[WeightMatch], *, mask_dtype: torch.dtype | None = None
) -> fx.GraphModule:
    """Insert a mask buffer of ones and a ``mul(weight, mask)`` node for each match.

    Args:
        gm: the captured graph module (mutated in place).
        matches: the weights to mask, from :func:`passes.matching.weights.find_weights`.
        mask_dtype: ``None`` for masks of each weight's dtype, ``torch.bool`` for one byte per weight, or a
            floating dtype.

    Returns:
        ``gm``, recompiled, with masks at ``<module_fqn>.<tensor_name>_mask``.

    Raises:
        ValueError: a mask name is already taken; nothing is modified then.
        TypeError: ``mask_dtype`` is neither ``None``, ``torch.bool`` nor a floating dtype.

    Example::

        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4)))
        >>> gm = insert_masks(gm, find_weights(gm))
        >>> mask = gm.get_buffer("0.weight_mask")
        >>> mask.dtype, mask.all().item()
        (torch.float32, True)
    """
    mask_dtype = check_mask_dtype(mask_dtype)
    matches = list(matches)
    _check_mask_names(gm, matches)
    by_node: dict[str, list[WeightMatch]] = {}
    for m in matches:
        for name in m.nodes:
            by_node.setdefault(name, []).append(m)
    graph = gm.graph
    masked_weight: dict[str, fx.Node] = {}
    for node in list(graph.nodes):
        if node.name not in by_node:
            continue
        if by_node[node.name][0].kind == LSTM_KIND:
            for match in by_node[node.name]:
                _mask_mul(gm, match, node, masked_weight, mask_dtype)
            target = SparseTarget(node.target, "", LSTM_KIND, (), call_module_fqn=node.target)
            _lstm_call(gm, node, masked_weight, target)
            continue
        (match,) = by_node[node.name]
        base = SparseTarget(
            match.module_fqn, match.tensor_name, match.kind, match.weight_shape, transposed=match.transposed
        )
        mul = _mask_mul(gm, match, node, masked_weight, mask_dtype)
        if node.op == "call_module":
            target = dataclasses.replace(base, call_module_fqn=node.target)
            with graph.inserting_before(node):
                new = _functional_call(graph, node, gm.get_submodule(node.target), mul, target)
            new.meta.update(node.meta)
            new.meta[SPARSITY_META_KEY] = target
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            continue
        position = weight_position(node.target, node.args)
        if isinstance(position, int):
            old_weight = node.args[position]
            node.update_arg(position, mul)
        else:
            old_weight = node.kwargs[position]
            node.update_kwarg(position, mul)
        node.meta[SPARSITY_META_KEY] = base
        # Only the get_attr this pass made dead is erased: a global dead-code sweep
        # could drop nodes the capture keeps on purpose (export's guard calls).
        if not old_weight.users:
            graph.erase_node(old_weight)
    graph.lint()
    gm.recompile()
    return gm
