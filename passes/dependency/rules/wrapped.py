"""Rules for functions that models hide from symbolic tracing with ``torch.fx.wrap``: torchvision's Swin.

Symbolic tracing keeps a wrapped function as one ``call_function`` node, its code run as it is
on every call, so the rule says what the function does to the channels (the functions are
matched by module and name in :mod:`passes.dependency.op_categories`, so that ``passes`` needs
no torchvision):

* ``_patch_merging_pad(x)`` gathers the four pixels of each 2x2 patch side by side along the
  channels: the output's last axis is the input's spaces four times over, as a concatenation;
* ``shifted_window_attention(x, qkv_weight, proj_weight, ..., num_heads, ...)`` computes q, k and v
  with ``qkv_weight`` (rows ``[q; k; v]``), heads of ``C // num_heads`` channels where ``C`` is the
  *input's* width, and writes ``proj_weight``'s rows. Its attention is as wide as its input, so the
  heads' channels cannot shrink apart from the input's: channel ``c`` of the input owns row ``c``
  of each third of ``qkv_weight``/``qkv_bias`` and column ``c`` of ``proj_weight``, and each head
  must keep as many channels as the others (the input's space gets ``num_heads`` blocks), so
  ``num_heads`` never changes and each head loses the same number of dims. The output is a new
  space of ``proj_weight``'s rows. Removing channels then changes ``C // num_heads``, by which the
  function scales ``q``: the group is listed ``inexact``. Swin V2's cosine attention
  (``logit_scale``) is frozen, with the reason.

These weights have no mask node (masking rewrites Linear/Conv ops, and these are read inside the
function): :class:`~fx_sparsity.structured.ChannelPruner` scores and zeroes the group's other
producers, and the shrunk module reports the group inexact where the removed channels still
carried values.
"""

from __future__ import annotations

from torch import fx

from passes.dependency.layout import Layout, add_sliced, first_input, freeze, member, tensor_fqn, total
from passes.dependency.spaces import Spaces

__all__ = ["patch_merging", "window_attention", "attention_arguments"]

_ATTENTION_ARGUMENTS = ("input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size", "num_heads",
                        "shift_size", "attention_dropout", "dropout", "qkv_bias", "proj_bias", "logit_scale")


def attention_arguments(args: tuple, kwargs: dict) -> dict:
    """The arguments of a ``shifted_window_attention`` call by name (nodes or values)."""
    named = dict(zip(_ATTENTION_ARGUMENTS, args))
    named.update({k: v for k, v in kwargs.items() if k in _ATTENTION_ARGUMENTS})
    return named


def patch_merging(node: fx.Node, shapes: dict, layouts: dict, spaces: Spaces) -> Layout | None:
    """``_patch_merging_pad(x)``: ``[.., H, W, C] -> [.., H/2, W/2, 4C]``, the input's spaces four times."""
    found = first_input(node, layouts, spaces)
    if found is None:
        return None
    x, lay = found
    if len(shapes[x]) + lay.axis != len(shapes[x]) - 1 or shapes[node][-1] != 4 * total(spaces, lay):
        freeze(spaces, lay, f"{node.name} merges patches along a dim other than the channels")
        return None
    return Layout(-1, lay.segs * 4)


def window_attention(node: fx.Node, shapes: dict, layouts: dict, spaces: Spaces) -> Layout | None:
    """``shifted_window_attention(x, qkv_weight, proj_weight, ...)``: see the module docstring."""
    found = first_input(node, layouts, spaces)
    if found is None:
        return None
    x, lay = found
    args = attention_arguments(node.args, node.kwargs)
    weights = {name: args.get(name) for name in ("qkv_weight", "proj_weight", "qkv_bias", "proj_bias")}
    fqns = {name: tensor_fqn(t) for name, t in weights.items() if t is not None}
    channels, heads = total(spaces, lay), args.get("num_heads")
    why = None
    if len(shapes[x]) + lay.axis != len(shapes[x]) - 1 or any(inner != 1 for _, inner in lay.segs):
        why = f"{node.name} reads them along a dim other than its input features"
    elif args.get("logit_scale") is not None:
        why = f"{node.name} is cosine attention (Swin V2), which normalizes q and k over each head's channels"
    elif any(fqn is None for fqn in fqns.values()) or "qkv_weight" not in fqns or "proj_weight" not in fqns:
        why = f"{node.name} computes its weights in the graph"
    elif not isinstance(heads, int) or channels % heads or len(lay.segs) > 1:
        why = f"{node.name} splits channels from several sources, or a width its head count does not divide"
    if why is not None:
        freeze(spaces, lay, why)
        return None
    add_sliced(spaces, lay, fqns["qkv_weight"], "consumer", 1)
    for third in range(3):  # channel c of the input owns row c of each of q, k and v
        spaces.add(lay.segs[0][0], member(fqns["qkv_weight"], "producer", 0, third * channels))
        if "qkv_bias" in fqns:
            spaces.add(lay.segs[0][0], member(fqns["qkv_bias"], "param", 0, third * channels))
    add_sliced(spaces, lay, fqns["proj_weight"], "consumer", 1)
    spaces.set_blocks(lay.segs[0][0], heads)
    spaces.inexact[spaces.find(lay.segs[0][0])].append(
        f"{node.name} scales q by (C // num_heads) ** -0.5, which shrinks with the channels"
    )
    out = Layout(-1, ((spaces.new(shapes[node][-1]), 1),))
    add_sliced(spaces, out, fqns["proj_weight"], "producer", 0)
    add_sliced(spaces, out, fqns.get("proj_bias"), "param", 0)
    return out
