"""The Linear/Conv-like weights that no match covers, with why and the remedy.

:func:`unmatched_weights` compares the Linear/Conv-like weights the user's model
holds with the matches of :func:`passes.matching.find_weights` and says, for each one
left dense, why and what to do, so that no weight is skipped silently.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import fx, nn

from passes.matching.weights import WeightMatch, is_transposed_linear, op_kind, weight_of, weight_parametrizations
from passes.meta import get_capture
from passes.utils import get_tensor

__all__ = ["UnmatchedWeight", "unmatched_weights"]


@dataclass(frozen=True)
class UnmatchedWeight:
    """A Linear/Conv-like weight of the model that no match covers: it stays dense.

    Attributes:
        tensor_fqn: its FQN in the user's model.
        reason: why the graph gives no weight operand to mask.
        remedy: what the user can do about it.
        opaque: the capture kept the weight's use in one opaque call (a ``torch.fx.wrap``'ed
            function, a leaf module), which another capture (``torch.export``) may open up.
    """

    tensor_fqn: str
    reason: str
    remedy: str
    opaque: bool = False


_EXPORT_REMEDY = "capture with torch.export instead: capture(model, example_inputs=(...), method='export')"


def _candidate_weights(model: nn.Module) -> dict[int, str]:
    """``id(tensor) -> FQN`` of the weights a user would expect to be sparsified: those of
    ``nn.Linear``/``nn.ConvNd`` (transposed too), ``nn.MultiheadAttention``'s input projections,
    and Linear-like modules from outside torch.nn (a 2-D ``weight`` parameter beside a
    ``bias`` attribute, as transformers' ``Conv1D``)."""
    names = {id(t): fqn for fqn, t in model.named_parameters()}
    found: dict[int, str] = {}
    for fqn, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and weight_parametrizations(module):
            # No stored tensor: keyed by the module (the ids of live objects never collide).
            found.setdefault(id(module), f"{fqn}.weight" if fqn else "weight")
            continue
        if isinstance(module, nn.MultiheadAttention):
            tensors = [module.in_proj_weight, module.q_proj_weight, module.k_proj_weight, module.v_proj_weight]
        elif isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            tensors = [module.weight]
        elif (
            not type(module).__module__.startswith("torch.")
            and isinstance(module._parameters.get("weight"), nn.Parameter)
            and module._parameters["weight"].dim() == 2
            and hasattr(module, "bias")
        ):
            tensors = [module.weight]
        else:
            continue
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor) and id(tensor) in names:
                found.setdefault(id(tensor), names[id(tensor)])
    return found


def _target_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)


def _is_wrapped_function(target: object) -> bool:
    """A Python function symbolic tracing records as one opaque call (``torch.fx.wrap``, autowrap)."""
    if not isinstance(target, types.FunctionType):
        return False
    if (id(target.__globals__), target.__name__) in torch.fx._symbolic_trace._wrapped_fns_to_patch:
        return True
    return not (target.__module__ or "").startswith(("torch", "_operator", "operator"))


def _why_unmatched(gm: fx.GraphModule, tensor: torch.Tensor, users: list[fx.Node], leaves: list[fx.Node]) -> UnmatchedWeight:
    """The reason and remedy (``tensor_fqn`` left empty for the caller to fill in)."""
    record = get_capture(gm)
    capture = record.method if record is not None else None
    if leaves:
        module = gm.get_submodule(leaves[0].target)
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            return UnmatchedWeight("", f"{type(module).__name__} is a transposed convolution, which fx_sparsity does "
                                   "not sparsify yet", "none yet: it stays dense")
        return UnmatchedWeight("", f"inside {leaves[0].target!r} ({type(module).__name__}), which the capture keeps "
                               "as one opaque call_module (a leaf module)",
                               f"take {leaves[0].target!r} out of leaf_modules, or {_EXPORT_REMEDY}", opaque=True)
    if not users:
        return UnmatchedWeight("", "the captured graph never reads it: its module is not called by forward (or only "
                               "on a branch the example inputs did not take)", "nothing to do if the layer is unused")
    kinds = {is_transposed_linear(u, gm) for u in users if op_kind(u, gm) is not None and weight_of(u, gm) is tensor}
    if len(kinds) == 2:
        return UnmatchedWeight("", "used both as an [out, in] weight (linear) and as an [in, out] one (x @ W): one "
                               "mask cannot sparsify both layouts", "use the weight in one layout only")
    for user in users:
        if _is_wrapped_function(user.target):
            return UnmatchedWeight(
                "", f"passed to {_target_name(user)}, a function symbolic tracing keeps as one opaque call "
                "(torch.fx.wrap)", _EXPORT_REMEDY if capture != "export" else "none: torch.export kept the call opaque too",
                opaque=capture != "export",
            )
    for user in users:
        if op_kind(user, gm) is None or weight_of(user, gm) is not tensor:
            return UnmatchedWeight("", f"used by {_target_name(user)} (node {user.name}), not as the weight operand "
                                   "of a Linear/Conv op or of x @ W: there is no plain weight operand to mask",
                                   "apply the layer to the weight as stored (F.linear(x, W), F.convNd(x, W) or x @ W)")
    return UnmatchedWeight("", "not selected", "select it in the config")


def unmatched_weights(model: nn.Module, gm: fx.GraphModule, matches: Iterable[WeightMatch]) -> list[UnmatchedWeight]:
    """The Linear/Conv-like weights of ``model`` that ``matches`` leave dense, with why and the remedy.

    Args:
        model: the user's model (the module ``gm`` was captured from; they share tensors).
        gm: its capture.
        matches: the matches of ``gm`` (:func:`find_weights`, or :func:`find_masked_weights`
            after masking).

    Returns:
        One :class:`UnmatchedWeight` per weight, in the order of ``model.named_modules()``.

    Example::

        >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        >>> gm = torch.fx.symbolic_trace(model[:1])
        >>> [(u.tensor_fqn, u.reason[:33]) for u in unmatched_weights(model, gm, find_weights(gm))]
        [('1.weight', 'the captured graph never reads it')]
    """
    matched = {id(get_tensor(gm, m.tensor_fqn)) for m in matches}
    reads: dict[int, list[fx.Node]] = {}
    leaves: dict[int, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = get_tensor(gm, node.target)
            if isinstance(value, torch.Tensor):
                reads.setdefault(id(value), []).extend(node.users)
        elif node.op == "call_module" and op_kind(node, gm) is not None:
            weight = weight_of(node, gm)
            if weight is not None:
                reads.setdefault(id(weight), []).append(node)
        elif node.op == "call_module":
            for tensor in gm.get_submodule(node.target).parameters():
                leaves.setdefault(id(tensor), []).append(node)
    tensors = {id(t): t for t in model.parameters()}
    modules = {id(m): m for m in model.modules()}
    unmatched = []
    for tid, fqn in _candidate_weights(model).items():
        if tid in matched:
            continue
        if tid in modules:
            found = UnmatchedWeight("", *_why_parametrized(modules[tid], fqn.rpartition(".")[0]))
        else:
            found = _why_unmatched(gm, tensors[tid], reads.get(tid, []), leaves.get(tid, []))
        unmatched.append(dataclasses.replace(found, tensor_fqn=fqn))
    return unmatched


def _why_parametrized(module: nn.Module, fqn: str) -> tuple[str, str]:
    originals = [f"{fqn + '.' if fqn else ''}parametrizations.weight.{n}" for n, _ in
                 module.parametrizations["weight"].named_parameters()]
    return (
        f"computed on each access by the parametrization {', '.join(weight_parametrizations(module))} "
        f"(torch.nn.utils.parametrize) from {', '.join(originals)}: there is no stored weight tensor to mask",
        f"remove the parametrization before prepare (torch.nn.utils.parametrize.remove_parametrizations("
        f"model.get_submodule({fqn!r}), 'weight') stores the weight it computes), or leave {fqn!r} out of the config",
    )
