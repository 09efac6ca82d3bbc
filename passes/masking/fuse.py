"""Fuse masks into weights and undo the rewrite of :mod:`passes.masking.insert`.

Each ``mul(weight, mask)`` node is removed: the weight becomes a *new* tensor
``weight * mask`` registered under every FQN the old weight had (so tied weights
stay tied, unless an unmasked op such as a tied embedding still reads one of
those FQNs: that one keeps the dense weight, as it had in the masked module),
the mask buffer is deleted, and each op reads the fused weight directly. Ops that were ``call_module`` before masking are turned back into
``call_module`` nodes on their module, so the graph reads like the captured one
and module swaps (``convert``) take effect; a :func:`passes.masking.lstm.masked_lstm`
call becomes the ``call_module`` on its ``nn.LSTM`` again, once all its parameters are fused.

The old weight tensor is never written to: when it is shared with the user's
model, the user keeps the dense values. The pass mutates and returns ``gm``.
"""

from __future__ import annotations

from torch import fx, nn

from passes.masking.lstm import LSTM_KIND, masked_lstm
from passes.meta import SPARSITY_META_KEY, SparseTarget, get_sparse_target
from passes.utils import ReadIndex, erase_unused_get_attrs, set_tensor, tensor_aliases

__all__ = ["fuse_masks"]


def _set_fused_weight(
    gm: fx.GraphModule, target: SparseTarget, mul: fx.Node, aliases: dict[int, list[str]], reads: ReadIndex
) -> list[str]:
    """Register ``weight * mask`` and delete the mask; return the FQNs that hold the fused weight.

    Every alias of the weight gets the fused tensor, except aliases that unmasked
    nodes still read (an embedding tied to a masked head, say): those keep the
    dense weight, as in the masked module. When every alias is read that way, the
    fused weight goes to a new ``<tensor_name>_fused`` attribute.
    """
    owner = gm.get_submodule(target.module_fqn)
    weight = getattr(owner, target.tensor_name)
    mask = getattr(owner, target.mask_name)
    fused = (weight * mask).detach()
    if isinstance(weight, nn.Parameter):
        fused = nn.Parameter(fused, requires_grad=weight.requires_grad)
    weight_aliases = aliases[id(weight)]
    skip = mul.all_input_nodes
    fused_fqns = [a for a in weight_aliases if not reads.is_read(a, skip)]
    if not fused_fqns:
        name = f"{target.tensor_name}_fused"
        if hasattr(owner, name):
            raise ValueError(f"cannot add {target.module_fqn or '<root>'}.{name}: the module already has it")
        fused_fqns = [f"{target.module_fqn}.{name}" if target.module_fqn else name]
    set_tensor(gm, fused_fqns, fused)
    del owner._buffers[target.mask_name]
    return fused_fqns


def _restore_call_module(graph: fx.Graph, op: fx.Node, target: SparseTarget) -> None:
    x = op.args[0]
    pad = None
    if isinstance(x, fx.Node) and (t := get_sparse_target(x)) is not None and t.role == "pad":
        pad, x = x, x.args[0]
    with graph.inserting_before(op):
        new = graph.call_module(target.call_module_fqn, (x,))
    new.meta.update({k: v for k, v in op.meta.items() if k != SPARSITY_META_KEY})
    op.replace_all_uses_with(new)
    inputs = op.all_input_nodes
    graph.erase_node(op)
    if pad is not None and not pad.users:
        graph.erase_node(pad)
    erase_unused_get_attrs(graph, inputs)


def _restore_lstm(gm: fx.GraphModule, op: fx.Node, target: SparseTarget) -> None:
    """``masked_lstm(module, x, params, hx)`` -> ``call_module`` on the LSTM, which reads the fused parameters."""
    graph = gm.graph
    module, x, params, hx = op.args
    lstm = gm.get_submodule(target.call_module_fqn)
    lstm._init_flat_weights()  # the fused tensors replaced entries of _parameters directly
    with graph.inserting_before(op):
        new = graph.call_module(target.call_module_fqn, (x,) if hx is None else (x, hx))
    new.meta.update({k: v for k, v in op.meta.items() if k != SPARSITY_META_KEY})
    op.replace_all_uses_with(new)
    graph.erase_node(op)
    erase_unused_get_attrs(graph, [module, *params])


def fuse_masks(gm: fx.GraphModule, *, restore_modules: bool = True) -> fx.GraphModule:
    """Fold every mask of ``gm`` into its weight and remove the mask nodes and buffers.

    Args:
        gm: a module prepared by :func:`passes.masking.insert.insert_masks` (mutated in place).
        restore_modules: turn ops that were ``call_module`` before masking back
            into ``call_module`` nodes; with ``False`` they stay functional.

    Returns:
        ``gm``, recompiled.

    Example::

        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4)))
        >>> gm = insert_masks(gm, find_weights(gm))
        >>> [n.op for n in fuse_masks(gm).graph.nodes]
        ['placeholder', 'call_module', 'output']
    """
    graph = gm.graph
    aliases, reads = tensor_aliases(gm), ReadIndex(graph)
    for mul in list(graph.nodes):
        target = get_sparse_target(mul)
        if target is None or target.role != "mask_mul":
            continue
        fused_fqns = _set_fused_weight(gm, target, mul, aliases, reads)
        with graph.inserting_before(mul):
            weight = graph.get_attr(target.tensor_fqn if target.tensor_fqn in fused_fqns else fused_fqns[0])
        mul.replace_all_uses_with(weight)
        weight_inputs = mul.all_input_nodes
        graph.erase_node(mul)
        erase_unused_get_attrs(graph, weight_inputs)
        for op in list(weight.users):
            op_target = get_sparse_target(op)
            module_fqn = op_target.call_module_fqn if op_target is not None else None
            if op_target is not None and op_target.kind == LSTM_KIND:
                continue  # restored below, once every parameter it reads is fused
            if restore_modules and module_fqn is not None and f"{module_fqn}.weight" in fused_fqns:
                _restore_call_module(graph, op, op_target)
            else:
                op.meta.pop(SPARSITY_META_KEY, None)
    for op in list(graph.nodes):
        if op.op != "call_function" or op.target is not masked_lstm:
            continue
        op_target = get_sparse_target(op)
        if restore_modules and op_target is not None:
            _restore_lstm(gm, op, op_target)
        else:
            gm.get_submodule(op.args[0].target)._init_flat_weights()
            op.meta.pop(SPARSITY_META_KEY, None)
    graph.lint()
    gm.recompile()
    return gm
