"""Small helpers shared by the passes: FQN handling and tensor-sharing clones."""

from __future__ import annotations

import copy
import itertools
import os
import sys
from collections.abc import Collection, Iterable

import torch
from torch import fx, nn

__all__ = [
    "split_fqn",
    "clone_sharing_tensors",
    "tensor_aliases",
    "get_tensor",
    "set_tensor",
    "fqns_read",
    "ReadIndex",
    "erase_unused_get_attrs",
    "user_stacklevel",
]


def split_fqn(fqn: str) -> tuple[str, str]:
    """Split ``"a.b.weight"`` into ``("a.b", "weight")``; ``"weight"`` into ``("", "weight")``."""
    owner, _, name = fqn.rpartition(".")
    return owner, name


def set_tensor(module: nn.Module, fqns: Iterable[str], tensor: torch.Tensor) -> None:
    """Register ``tensor`` under every FQN of ``fqns`` below ``module``: as a parameter when it is an
    ``nn.Parameter``, else as a buffer (replacing what was there; tied names stay tied)."""
    for fqn in fqns:
        owner_fqn, name = split_fqn(fqn)
        owner = module.get_submodule(owner_fqn)
        if isinstance(tensor, nn.Parameter):
            owner._parameters[name] = tensor
        else:
            owner._buffers[name] = tensor


def get_tensor(module: nn.Module, fqn: str) -> torch.Tensor:
    """The parameter or buffer at ``fqn`` below ``module``."""
    owner, name = split_fqn(fqn)
    return getattr(module.get_submodule(owner), name)


def tensor_aliases(module: nn.Module) -> dict[int, list[str]]:
    """Map ``id(tensor)`` to every FQN under which a parameter or buffer is reachable.

    The first FQN of each list is the canonical one: the name ``named_parameters()``
    (with duplicates removed) gives it, which is also the name ``symbolic_trace``
    uses in ``get_attr`` nodes.
    """
    aliases: dict[int, list[str]] = {}
    named = itertools.chain(
        module.named_parameters(remove_duplicate=False),
        module.named_buffers(remove_duplicate=False),
    )
    for fqn, tensor in named:
        aliases.setdefault(id(tensor), []).append(fqn)
    return aliases


def clone_sharing_tensors(module: nn.Module) -> nn.Module:
    """Deep-copy ``module`` (submodules, graph, hooks) but share its parameters, buffers and
    the tensors its attributes hold (directly or in lists, tuples and dicts).

    This is how the passes return a new module without copying weights, in the
    way ``torch.compile`` shares parameters with the model it compiles: writing
    to the clone's module attributes never touches the original, while the
    tensors themselves are the same objects.
    """
    memo: dict[int, object] = {}
    tensors = itertools.chain(
        module.named_parameters(remove_duplicate=False), module.named_buffers(remove_duplicate=False)
    )
    for _, tensor in tensors:
        memo[id(tensor)] = tensor
    for sub in module.modules():
        for tensor in _tensors_in(list(vars(sub).values())):
            memo[id(tensor)] = tensor
    clone = copy.deepcopy(module, memo)
    if isinstance(clone, fx.GraphModule):
        clone.recompile()
    return clone


def _tensors_in(value: object) -> Iterable[torch.Tensor]:
    """Tensors in ``value`` and in the lists, tuples and dicts it nests (caches of computed tensors,
    which ``copy.deepcopy`` refuses to copy)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item)


class ReadIndex:
    """Which FQNs the graph reads, indexed once so that fusing n masks takes time linear in n.

    A ``get_attr`` node reads its target; a ``call_module`` node reads every tensor
    below its module. The index reflects the graph when it was built: fusing one mask
    changes reads of that mask's own weight only, so one index serves a whole
    :func:`passes.masking.fuse.fuse_masks`.
    """

    def __init__(self, graph: fx.Graph) -> None:
        self.get_attrs: dict[str, list[fx.Node]] = {}
        self.called: set[str] = set()
        for node in graph.nodes:
            if node.op == "get_attr":
                self.get_attrs.setdefault(node.target, []).append(node)
            elif node.op == "call_module":
                self.called.add(node.target)

    def is_read(self, fqn: str, skip: Collection[fx.Node] = ()) -> bool:
        """Whether a node of the graph (but ``skip``) reads ``fqn``."""
        if any(n not in skip for n in self.get_attrs.get(fqn, ())):
            return True
        parts = fqn.split(".")
        return any(".".join(parts[:i]) in self.called for i in range(len(parts)))


def fqns_read(gm: fx.GraphModule, fqns: Collection[str], skip: Collection[fx.Node] = ()) -> set[str]:
    """Which of ``fqns`` the nodes of ``gm`` (but ``skip``) read (see :class:`ReadIndex`)."""
    reads = ReadIndex(gm.graph)
    return {f for f in fqns if reads.is_read(f, skip)}


def erase_unused_get_attrs(graph: fx.Graph, nodes: Iterable[object]) -> None:
    """Erase the ``get_attr`` nodes among ``nodes`` that nothing uses any more."""
    for node in nodes:
        if isinstance(node, fx.Node) and node.op == "get_attr" and not node.users:
            graph.erase_node(node)


# The folder holding this package and its user-side sibling: frames inside either are the library's own.
_LIBRARY_DIRS = tuple(
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), name) + os.sep
    for name in ("passes", "fx_sparsity")
)


def user_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` made by the caller of this function that names the first frame
    outside passes and fx_sparsity: the user's line, however deep inside the library the warning is raised."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    return level
