"""Find the Linear and Conv weights of a captured graph.

Both forms the captures produce are recognised:

* ``call_module`` nodes on ``nn.Linear`` / ``nn.Conv1d/2d/3d`` (symbolic tracing);
* ``call_function`` nodes on ``F.linear`` / ``F.conv*`` or their ATen ops
  (``torch.export``, or user code calling the functional API) whose weight is a
  ``get_attr`` node;
* matrix products whose second operand is a 2-D ``get_attr`` tensor and whose
  first is not (``addmm(bias, x, W)``, ``mm(x, W)``, ``matmul(x, W)``, ``x @ W``,
  as transformers' ``Conv1D`` computes): a linear layer whose weight is stored
  ``[in, out]``, transposed relative to ``nn.Linear``; such matches have
  ``transposed=True``.

Matches are grouped by weight *tensor* (by identity, not by name), so a weight
used by several nodes, or tied between modules, is one :class:`WeightMatch`
with several uses. A weight a parametrization computes on each access
(``torch.nn.utils.parametrizations.weight_norm``...) is no stored tensor and is not
matched; :mod:`passes.matching.unmatched` reports it.

:mod:`passes.matching.unmatched` says, for each Linear/Conv-like weight these matches
leave dense, why and what to do.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from passes.meta import get_sparse_target, mask_nodes
from passes.utils import get_tensor, split_fqn, tensor_aliases

__all__ = [
    "WeightMatch",
    "find_weights",
    "find_masked_weights",
    "op_kind",
    "op_arguments",
    "weight_position",
    "is_transposed_linear",
    "weight_of",
    "weight_parametrizations",
]

aten = torch.ops.aten

_FUNCTION_KINDS: dict[object, str] = {
    F.linear: "linear",
    aten.linear.default: "linear",
    F.conv1d: "conv1d",
    F.conv2d: "conv2d",
    F.conv3d: "conv3d",
    aten.conv1d.default: "conv1d",
    aten.conv2d.default: "conv2d",
    aten.conv3d.default: "conv3d",
    aten.conv1d.padding: "conv1d",
    aten.conv2d.padding: "conv2d",
    aten.conv3d.padding: "conv3d",
    aten.convolution.default: "conv",
}

# Matrix products x @ W: positional names, weight last. A call_method target is the method
# name; torch.Tensor's methods are there for code that calls them as functions.
_MATMUL_SIGNATURES: dict[object, tuple[str, ...]] = {
    torch.addmm: ("bias", "input", "weight"),
    aten.addmm.default: ("bias", "input", "weight"),
    "addmm": ("bias", "input", "weight"),
    torch.Tensor.addmm: ("bias", "input", "weight"),
    torch.mm: ("input", "weight"),
    aten.mm.default: ("input", "weight"),
    "mm": ("input", "weight"),
    torch.Tensor.mm: ("input", "weight"),
    torch.matmul: ("input", "weight"),
    aten.matmul.default: ("input", "weight"),
    "matmul": ("input", "weight"),
    torch.Tensor.matmul: ("input", "weight"),
    operator.matmul: ("input", "weight"),
}

_MODULE_KINDS: dict[type[nn.Module], str] = {
    nn.Linear: "linear",
    nn.Conv1d: "conv1d",
    nn.Conv2d: "conv2d",
    nn.Conv3d: "conv3d",
}


@dataclass(frozen=True)
class WeightMatch:
    """One Linear/Conv weight tensor and the graph nodes that use it as a weight.

    Attributes:
        tensor_fqn: canonical FQN of the weight (the first name ``named_parameters`` gives).
        kind: ``"linear"``, ``"conv1d"``, ``"conv2d"`` or ``"conv3d"`` (``"lstm"`` for the
            ``nn.LSTM`` parameters of :func:`passes.masking.lstm.find_lstm_weights`).
        weight_shape: shape of the weight.
        aliases: every FQN under which the tensor is reachable (tied weights have several).
        nodes: names of the nodes using it as their weight, in graph order.
        call_module_fqns: FQNs of the modules called by ``call_module`` uses.
        transposed: the weight is stored ``[in, out]`` (used as ``x @ W``, as by
            transformers' ``Conv1D``), not ``[out, in]`` like ``nn.Linear``'s.
    """

    tensor_fqn: str
    kind: str
    weight_shape: tuple[int, ...]
    aliases: tuple[str, ...]
    nodes: tuple[str, ...]
    call_module_fqns: tuple[str, ...]
    transposed: bool = False

    @property
    def module_fqn(self) -> str:
        return split_fqn(self.tensor_fqn)[0]

    @property
    def tensor_name(self) -> str:
        return split_fqn(self.tensor_fqn)[1]

    @property
    def module_fqns(self) -> tuple[str, ...]:
        """Every module FQN that names this weight: owners of its aliases and called modules."""
        owners = [split_fqn(a)[0] for a in self.aliases]
        return tuple(dict.fromkeys(owners + list(self.call_module_fqns)))


def _module_kind(module: nn.Module) -> str | None:
    for cls, kind in _MODULE_KINDS.items():
        # A subclass that overrides forward computes something else: not a match.
        if isinstance(module, cls) and type(module).forward is cls.forward:
            return kind
    return None


_PARAMETERS = {
    "linear": ("input", "weight", "bias"),
    "convNd": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "conv": ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups"),
}
_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def op_arguments(target: object, args: tuple, kwargs: dict) -> dict[str, object]:
    """The arguments of a linear/conv call by name, defaults filled in.

    ``target`` is a key of the functional/ATen ops :func:`find_weights` matches;
    ``args`` and ``kwargs`` may hold nodes or values. For a matrix product
    (``addmm(bias, x, W)``, ``mm(x, W)``...) the names are ``"input"``,
    ``"weight"`` and ``"bias"`` too, with the weight in its ``[in, out]`` layout.

    Example::

        >>> op_arguments(F.conv2d, ("x", "w"), {"stride": 2})["stride"]
        2
        >>> op_arguments(torch.addmm, ("b", "x", "w"), {})["weight"]
        'w'
    """
    if target in _MATMUL_SIGNATURES:
        bound = {"bias": None}
        bound.update(zip(_MATMUL_SIGNATURES[target], args))
        return bound
    kind = _FUNCTION_KINDS[target]
    names = _PARAMETERS[kind if kind in ("linear", "conv") else "convNd"]
    bound = dict(_DEFAULTS)
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


def _weight_arg(node: fx.Node) -> object:
    return op_arguments(node.target, node.args, node.kwargs).get("weight")


def weight_position(target: object, args: tuple) -> int | str:
    """Where the weight of a matched op called as ``target(*args, ...)`` sits: an index of
    ``args``, or ``"weight"`` when it is passed as a keyword.

    Example::

        >>> weight_position(torch.addmm, ("b", "x", "w")), weight_position(F.linear, ("x",))
        (2, 'weight')
    """
    if target in _MATMUL_SIGNATURES:
        return len(_MATMUL_SIGNATURES[target]) - 1
    return 1 if len(args) > 1 else "weight"


def _is_get_attr(arg: object) -> bool:
    return isinstance(arg, fx.Node) and arg.op == "get_attr"


def is_transposed_linear(node: fx.Node, gm: fx.GraphModule) -> bool:
    """True when ``node`` is a matrix product ``x @ W`` of an activation and a 2-D tensor
    attribute of ``gm``: a linear layer whose weight ``W`` is stored ``[in, out]``."""
    if node.op not in ("call_function", "call_method"):
        return False
    names = _MATMUL_SIGNATURES.get(node.target)
    if names is None:
        return False
    # The weight must be positional: keyword names differ between torch.mm, aten.mm and methods.
    if len(node.args) != len(names) or node.kwargs.keys() - {"beta", "alpha"}:
        return False
    bound = dict(zip(names, node.args))
    weight = bound["weight"]
    if not _is_get_attr(weight):
        return False
    # A product of two attributes (a low-rank factorisation, say) is no layer applied to an input.
    if _is_get_attr(bound["input"]):
        return False
    tensor = get_tensor(gm, weight.target)
    return isinstance(tensor, torch.Tensor) and tensor.dim() == 2


def op_kind(node: fx.Node, gm: fx.GraphModule) -> str | None:
    """``"linear"``/``"convNd"`` when ``node`` is a Linear or Conv op, else ``None``."""
    if node.op == "call_module":
        return _module_kind(gm.get_submodule(node.target))
    if is_transposed_linear(node, gm):
        return "linear"
    if node.op != "call_function":
        return None
    kind = _FUNCTION_KINDS.get(node.target)
    if kind != "conv":
        return kind
    # aten.convolution(input, weight, bias, stride, padding, dilation, transposed, ...)
    transposed = node.args[6] if len(node.args) > 6 else node.kwargs.get("transposed", False)
    if transposed:
        return None
    weight = _weight_arg(node)
    ndim = weight.meta["val"].dim() if isinstance(weight, fx.Node) and "val" in weight.meta else None
    return f"conv{ndim - 2}d" if ndim in (3, 4, 5) else None


def weight_parametrizations(module: nn.Module, name: str = "weight") -> tuple[str, ...]:
    """The class names of the parametrizations computing ``module.<name>`` (``torch.nn.utils.parametrize``:
    ``weight_norm``, ``spectral_norm``, ``orthogonal``...), ``()`` when it is a plain tensor.

    Example::

        >>> weight_parametrizations(nn.utils.parametrizations.weight_norm(nn.Linear(4, 4)))
        ('_WeightNorm',)
    """
    if not parametrize.is_parametrized(module, name):
        return ()
    return tuple(type(p).__name__ for p in module.parametrizations[name])


def weight_of(node: fx.Node, gm: fx.GraphModule) -> torch.Tensor | None:
    """The weight tensor a matched Linear/Conv op reads (``None`` when it is computed in the graph, or computed on
    each access by a parametrization: there is no stored tensor to mask)."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return None if weight_parametrizations(module) else module.weight
    weight = _weight_arg(node)
    if not isinstance(weight, fx.Node) or weight.op != "get_attr":
        return None
    tensor = get_tensor(gm, weight.target)
    return tensor if isinstance(tensor, torch.Tensor) else None


def find_weights(gm: fx.GraphModule) -> list[WeightMatch]:
    """Every Linear/Conv weight of ``gm``, one entry per tensor, in graph order.

    Ops whose weight is not a plain attribute (computed inside the graph) are
    not matched: there is no single tensor to mask.

    Example::

        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4)))
        >>> [(m.tensor_fqn, m.kind) for m in find_weights(gm)]
        [('0.weight', 'linear')]
    """
    aliases = tensor_aliases(gm)
    found: dict[int, dict] = {}
    for node in gm.graph.nodes:
        kind = op_kind(node, gm)
        if kind is None:
            continue
        weight = weight_of(node, gm)
        if weight is None:
            continue
        transposed = is_transposed_linear(node, gm)
        entry = found.setdefault(
            id(weight),
            {"kind": kind, "shape": tuple(weight.shape), "aliases": aliases[id(weight)], "nodes": [], "mods": [],
             "transposed": transposed},
        )
        if entry["transposed"] != transposed:
            # One mask for two layouts (W used as x @ W and as F.linear(x, W)) would sparsify one of them
            # along the wrong dimension: leave such a weight to unmatched_weights.
            entry["conflict"] = True
        entry["nodes"].append(node.name)
        if node.op == "call_module":
            entry["mods"].append(node.target)
    return [
        WeightMatch(
            tensor_fqn=e["aliases"][0],
            kind=e["kind"],
            weight_shape=e["shape"],
            aliases=tuple(e["aliases"]),
            nodes=tuple(e["nodes"]),
            call_module_fqns=tuple(dict.fromkeys(e["mods"])),
            transposed=e["transposed"],
        )
        for e in found.values()
        if not e.get("conflict")
    ]


def find_masked_weights(gm: fx.GraphModule, nodes: Mapping[str, fx.Node] | None = None) -> list[WeightMatch]:
    """Every weight masked by :func:`passes.masking.insert_masks`, as :class:`WeightMatch` entries.

    ``nodes`` are the linear/conv ops reading the masked weight, so rules of
    :func:`passes.matching.select_weights` can select among masked weights.

    Args:
        gm: a masked module.
        nodes: :func:`passes.meta.mask_nodes` of ``gm``, when the caller has them (no scan of the graph then).
    """
    aliases = tensor_aliases(gm)
    matches = []
    for node in (mask_nodes(gm) if nodes is None else nodes).values():
        target = get_sparse_target(node)
        ops = [u for u in node.users if (t := get_sparse_target(u)) is not None and t.role == "op"]
        weight = get_tensor(gm, target.tensor_fqn)
        matches.append(
            WeightMatch(
                tensor_fqn=target.tensor_fqn,
                kind=target.kind,
                weight_shape=target.weight_shape,
                aliases=tuple(aliases[id(weight)]),
                nodes=tuple(op.name for op in ops),
                call_module_fqns=tuple(dict.fromkeys(
                    t.call_module_fqn for op in ops if (t := get_sparse_target(op)).call_module_fqn
                )),
                transposed=target.transposed,
            )
        )
    return matches
