"""The rule for ``nn.LSTM``: each layer's hidden units are a channel space.

Layer ``l`` of an LSTM (each direction on its own) computes ``H`` hidden units.
Unit ``u`` owns row ``u`` of each of the four gate blocks (input, forget, cell,
output, at offsets ``0, H, 2H, 3H``) of ``weight_ih_l{l}`` and ``weight_hh_l{l}``
(the *producers*, scored and masked like a Linear's rows), the same entries of both
biases, and it is read back by every unit through column ``u`` of ``weight_hh_l{l}``
(the recurrence) and by the next layer through column ``u`` of its ``weight_ih``,
or by the layers after the LSTM for the last one (these are *consumers*). Removing
a unit removes it from all four gates at once, so the shrunk layer is an LSTM of
``H - k`` units. ``nn.LSTM`` has one ``hidden_size`` (and ``proj_size``) for all its
layers and directions, so their spaces are united: unit ``u`` goes from every layer
(torch.ao.pruning's ``LSTMSaliencyPruner`` picks per layer and gate, which only
keeps the sizes equal when every layer loses the same count).

With ``proj_size = P`` the units are still the ``H`` space (``weight_hr_l{l}``'s
columns consume it), and the layer's output is a second space of ``P`` channels:
rows of ``weight_hr_l{l}`` produce it, ``weight_hh_l{l}``'s columns and the next
layer read it. A bidirectional layer's output is its two directions' spaces side
by side, as a concatenation.

Frozen, with the reason: an initial state ``hx`` passed in, and ``h_n``/``c_n``
read anywhere (they stack every layer's units along one axis), or the output tuple
used other than by indexing; an input whose channels are not on the last axis.
"""

from __future__ import annotations

import operator

from torch import fx

from passes.dependency.layout import Layout, add_module, add_sliced, freeze, member, total
from passes.dependency.spaces import Spaces

__all__ = ["follow_lstm"]

_GATES = 4


def _state_reader(node: fx.Node) -> str | None:
    """Why the LSTM's spaces must freeze because of how its output tuple is used, or ``None``."""
    for user in node.users:
        if user.op != "call_function" or user.target is not operator.getitem:
            return f"{node.target}'s output tuple is used whole by {user.name}"
        if user.args[1] != 0 and user.users:
            return f"{node.target}'s final state (h_n, c_n) is read by {', '.join(u.name for u in user.users)}"
    return None


def _add_gates(spaces: Spaces, space: int, target: str, kind: str, size: int) -> None:
    """Rows ``u, H + u, 2H + u, 3H + u`` of ``target``: unit ``u`` in each of the four gates."""
    for gate in range(_GATES):
        spaces.add(space, member(target, kind, 0, gate * size))


def follow_lstm(node: fx.Node, gm: fx.GraphModule, shapes: dict, layouts: dict, spaces: Spaces) -> tuple:
    """Members and output layouts of an ``nn.LSTM`` ``call_module``: ``(output layout, None)``."""
    fqn = node.target
    lstm = gm.get_submodule(fqn)
    x = node.args[0] if node.args else node.kwargs["input"]
    hx = node.args[1] if len(node.args) > 1 else node.kwargs.get("hx")
    lay = layouts.get(x)
    if lay is not None and (
        not isinstance(lay, Layout) or len(shapes[x]) + lay.axis != len(shapes[x]) - 1
        or total(spaces, lay) != lstm.input_size
    ):
        freeze(spaces, lay, f"LSTM {fqn} reads tracked channels other than as the input features of its last dim")
        lay = None
    hidden = lstm.hidden_size
    directions = ("", "_reverse") if lstm.bidirectional else ("",)
    created = []
    for layer in range(lstm.num_layers):
        outputs = []
        for sfx in directions:
            names = {w: f"{fqn}.{w}_l{layer}{sfx}" for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh",
                                                               "weight_hr")}
            if lay is not None:
                add_sliced(spaces, lay, names["weight_ih"], "consumer", 1)
                add_module(spaces, lay, fqn)
            units = spaces.new(hidden)
            if created:  # one hidden_size for every layer and direction: unit u goes from all of them
                spaces.union(created[0], units)
            created.append(units)
            _add_gates(spaces, units, names["weight_ih"], "producer", hidden)
            _add_gates(spaces, units, names["weight_hh"], "producer", hidden)
            if lstm.bias:
                _add_gates(spaces, units, names["bias_ih"], "param", hidden)
                _add_gates(spaces, units, names["bias_hh"], "param", hidden)
            spaces.add(units, member(fqn, "module"))
            out = units
            if lstm.proj_size > 0:
                spaces.add(units, member(names["weight_hr"], "consumer", 1))
                out = spaces.new(lstm.proj_size)
                if len(created) > 1:  # one proj_size likewise
                    spaces.union(created[1], out)
                created.append(out)
                spaces.add(out, member(names["weight_hr"], "producer", 0))
                spaces.add(out, member(fqn, "module"))
            spaces.add(out, member(names["weight_hh"], "consumer", 1))
            outputs.append(out)
        lay = Layout(-1, tuple((s, 1) for s in outputs))
    reasons = [] if hx is None else [f"LSTM {fqn} is given an initial state hx"]
    reasons += [why] if (why := _state_reader(node)) is not None else []
    for s in created if reasons else ():
        spaces.freeze(s, "; ".join(reasons))
    return (lay, None)

