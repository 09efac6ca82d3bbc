"""Masks on ``nn.LSTM`` parameters: a traceable LSTM call that reads ``mul(weight, mask)`` nodes.

``nn.LSTM`` reads its parameters inside one ``call_module``, so there is no weight
operand to multiply by a mask. :func:`find_lstm_weights` finds the ``call_module``
nodes on (exact) ``nn.LSTM`` modules and gives one :class:`~passes.matching.weights.WeightMatch`
of kind ``"lstm"`` per parameter (``weight_ih_l{k}``, ``weight_hh_l{k}``, the biases,
``weight_hr_l{k}``). :mod:`passes.masking.insert` turns such a call into
:func:`masked_lstm` (``torch._VF.lstm``, the op ``nn.LSTM.forward`` runs) with a
parameter list in which the masked ones are ``mul`` nodes, and :mod:`passes.masking.fuse`
turns it back into the ``call_module`` on the module, with fused parameters.

Nothing selects these matches by default: only a sparsifier that asks for them
(``ChannelPruner``, for hidden units) masks LSTM parameters.
"""

from __future__ import annotations

import torch
from torch import _VF, fx, nn

from passes.matching.weights import WeightMatch
from passes.utils import tensor_aliases

__all__ = ["LSTM_KIND", "find_lstm_weights", "masked_lstm", "is_plain_lstm"]

LSTM_KIND = "lstm"


def is_plain_lstm(module: nn.Module) -> bool:
    """An ``nn.LSTM`` (or subclass) whose ``forward`` is ``nn.LSTM.forward``."""
    return isinstance(module, nn.LSTM) and type(module).forward is nn.LSTM.forward


def masked_lstm(
    module: nn.LSTM,
    input: torch.Tensor,
    params: list[torch.Tensor],
    hx: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``module(input, hx)`` computed with ``params`` in place of ``module._flat_weights``.

    Args:
        module: the LSTM whose configuration (sizes, layers, dropout, training flag) applies.
        input: ``[L, N, H_in]`` (``[N, L, H_in]`` with ``batch_first``) or unbatched ``[L, H_in]``;
            a ``PackedSequence`` is not supported.
        params: one tensor per name of ``module._flat_weights_names``, in that order.
        hx: the initial ``(h_0, c_0)``, or ``None`` for zeros.

    Returns:
        ``(output, (h_n, c_n))``, as ``nn.LSTM`` returns.

    Example::

        >>> lstm = nn.LSTM(3, 4)
        >>> x = torch.randn(5, 2, 3)
        >>> torch.equal(masked_lstm(lstm, x, list(lstm._flat_weights))[0], lstm(x)[0])
        True
    """
    if input.dim() not in (2, 3):
        raise ValueError(f"LSTM: expected input to be 2D or 3D, got {input.dim()}D instead")
    batched = input.dim() == 3
    batch_dim = 0 if module.batch_first else 1
    if not batched:
        input = input.unsqueeze(batch_dim)
    directions = 2 if module.bidirectional else 1
    if hx is None:
        batch = input.size(batch_dim)
        h_size = module.proj_size if module.proj_size > 0 else module.hidden_size
        shape = (module.num_layers * directions, batch)
        hx = (
            torch.zeros(*shape, h_size, dtype=input.dtype, device=input.device),
            torch.zeros(*shape, module.hidden_size, dtype=input.dtype, device=input.device),
        )
    elif not batched:
        hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
    output, h_n, c_n = _VF.lstm(
        input, hx, params, module.bias, module.num_layers, module.dropout, module.training,
        module.bidirectional, module.batch_first,
    )
    if not batched:
        return output.squeeze(batch_dim), (h_n.squeeze(1), c_n.squeeze(1))
    return output, (h_n, c_n)


def find_lstm_weights(gm: fx.GraphModule) -> list[WeightMatch]:
    """One ``"lstm"`` :class:`WeightMatch` per parameter of each ``nn.LSTM`` called as a ``call_module``.

    An LSTM called more than once, or whose parameters are shared with another module,
    or that is called with anything but ``(input)`` / ``(input, hx)``, is left out
    (its call stays opaque, and its parameters dense).

    Example::

        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.LSTM(3, 4, num_layers=2)))
        >>> [(m.tensor_fqn, m.kind) for m in find_lstm_weights(gm)][:3]
        [('0.weight_ih_l0', 'lstm'), ('0.weight_hh_l0', 'lstm'), ('0.bias_ih_l0', 'lstm')]
    """
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and is_plain_lstm(gm.get_submodule(node.target)):
            calls.setdefault(node.target, []).append(node)
    aliases = tensor_aliases(gm)
    matches = []
    for fqn, nodes in calls.items():
        node = nodes[0]
        if len(nodes) > 1 or len(node.args) + len(node.kwargs) > 2 or set(node.kwargs) - {"input", "hx"}:
            continue
        lstm = gm.get_submodule(fqn)
        tensors = [getattr(lstm, name) for name in lstm._flat_weights_names]
        names = [aliases[id(t)] for t in tensors]
        if any(len(n) > 1 for n in names):
            continue
        for name, tensor in zip(lstm._flat_weights_names, tensors):
            tensor_fqn = f"{fqn}.{name}" if fqn else name
            matches.append(WeightMatch(
                tensor_fqn=tensor_fqn, kind=LSTM_KIND, weight_shape=tuple(tensor.shape), aliases=(tensor_fqn,),
                nodes=(node.name,), call_module_fqns=(fqn,),
            ))
    return matches
