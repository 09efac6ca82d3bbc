"""Find the blocks of a captured graph: the repeated submodules a transformer or ResNet is made of.

:func:`find_blocks` finds them from the ``nn_module_stack`` meta that both
``torch.fx.symbolic_trace`` and ``torch.export`` leave on the nodes; :func:`match_blocks`
resolves the module FQNs or globs a user names instead. The graph is never modified here;
:mod:`passes.calibration.stages` plans and runs the stages between the blocks.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Sequence

from torch import fx

__all__ = ["find_blocks", "match_blocks", "module_paths", "module_stack", "is_inside"]


def module_paths(gm: fx.GraphModule) -> dict[str, str]:
    """Module FQN -> its class name, for every module a node of ``gm``'s graph was recorded inside.

    Read from the ``nn_module_stack`` node meta (symbolic tracing and ``torch.export``
    both record it), in the order the modules first appear in the graph.

    Example::

        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
        >>> module_paths(gm)
        {'0': 'torch.nn.modules.linear.Linear', '1': 'torch.nn.modules.activation.ReLU'}
    """
    paths: dict[str, str] = {}
    for node in gm.graph.nodes:
        for path, kind in module_stack(node):
            paths.setdefault(path, kind)
    return paths


def module_stack(node: fx.Node) -> list[tuple[str, str]]:
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for value in stack.values():
        path, kind = value[0], value[1]
        name = kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}"
        out.append((path, name))
    return out


def is_inside(fqn: str, path: str) -> bool:
    return fqn.startswith(path + ".")


def find_blocks(gm: fx.GraphModule, tensor_fqns: Iterable[str]) -> tuple[str, ...]:
    """The repeated submodules of ``gm`` that hold the weights ``tensor_fqns``, in graph order.

    Candidates are modules recorded in the graph whose FQN ends in an index
    (``layers.3``, ``layer2.0``: the items of a ``ModuleList``/``Sequential``),
    grouped by class. The class whose instances hold the most of ``tensor_fqns``
    wins (ties: the class with fewer, larger instances); it needs two instances
    or more. Instances nested in another instance of the same class are dropped.

    Args:
        gm: a captured module.
        tensor_fqns: the weights to be pruned (what a block should hold).

    Returns:
        The block FQNs, e.g. ``("model.layers.0", "model.layers.1")``; empty when
        the graph has no repeated indexed modules holding any of the weights.

    Example::

        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)))
        >>> find_blocks(gm, ["0.weight", "2.weight"])
        ('0', '2')
    """
    fqns = list(tensor_fqns)
    by_class: dict[str, list[str]] = {}
    for path, kind in module_paths(gm).items():
        if path.rpartition(".")[2].isdigit():
            by_class.setdefault(kind, []).append(path)
    best: tuple[int, int, tuple[str, ...]] | None = None
    for paths in by_class.values():
        outer = [p for p in paths if not any(is_inside(p, q) for q in paths)]
        if len(outer) < 2:
            continue
        covered = sum(any(is_inside(f, p) for p in outer) for f in fqns)
        if not covered:
            continue
        key = (covered, -len(outer), tuple(outer))
        if best is None or key[:2] > best[:2]:
            best = key
    return best[2] if best is not None else ()


def _matches(pattern: str, path: str) -> bool:
    """``fnmatch`` per dotted component: ``layers.*`` matches ``layers.0``, not ``layers.0.mlp``."""
    parts, names = pattern.split("."), path.split(".")
    return len(parts) == len(names) and all(fnmatch.fnmatchcase(n, p) for p, n in zip(parts, names))


def match_blocks(gm: fx.GraphModule, names: Sequence[str]) -> tuple[str, ...]:
    """The module FQNs of ``gm`` that ``names`` (exact FQNs or per-component globs) select, in graph order.

    A glob's ``*`` does not cross dots: ``"model.layers.*"`` selects each layer,
    not the modules inside them.

    Raises:
        TypeError: ``names`` is not a list of strings.
        ValueError: an entry selects no module recorded in the graph (close
            matches are listed), or two selected modules overlap (one inside the other).

    Example::

        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)))
        >>> match_blocks(gm, ["*"])
        ('0', '1', '2')
    """
    if isinstance(names, str) or not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"blocks must be a list of module FQNs or globs such as ['model.layers.*'], got {names!r}")
    if not names:
        raise ValueError("blocks is empty: name the block modules, e.g. ['model.layers.*'], or pass None to find them")
    paths = list(module_paths(gm))
    chosen: list[str] = []
    for name in names:
        hits = [p for p in paths if p == name] or [p for p in paths if _matches(name, p)]
        if not hits:
            close = difflib.get_close_matches(name, paths, n=3)
            hint = f"; close matches: {close}" if close else f"; modules look like {paths[:5]}"
            raise ValueError(f"blocks entry {name!r} names no module that runs in the graph{hint}")
        chosen += [p for p in hits if p not in chosen]
    for a in chosen:
        for b in chosen:
            if is_inside(b, a):
                raise ValueError(f"blocks {a!r} and {b!r} overlap ({b!r} is inside {a!r}): name one of them")
    order = {p: i for i, p in enumerate(paths)}
    return tuple(sorted(chosen, key=order.__getitem__))
