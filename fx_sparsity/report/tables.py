"""Inspection printouts: a per-layer sparsity table and a graph table (tabulate).

Functions return strings; ``print_*`` wrappers print them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from tabulate import tabulate
from torch import fx

from fx_sparsity.meta import get_lowering, get_sparsifier, get_unmatched
from fx_sparsity.sparsifier.base import BaseSparsifier
from passes import get_sparse_target

__all__ = [
    "LayerSparsity",
    "layer_sparsity",
    "sparsity_table",
    "graph_table",
    "lowering_table",
    "print_sparsity_table",
    "print_graph_table",
    "print_lowering_table",
]


def _format_group_args(args: Mapping[str, Any]) -> str:
    # Levels OWL or a scheduler computed are floats with many digits: four significant ones say enough.
    return " ".join(f"{k}={args[k]:.4g}" if isinstance(args[k], float) else f"{k}={args[k]}" for k in sorted(args))


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


@dataclass(frozen=True)
class LayerSparsity:
    """One sparsified weight: its ``target`` fraction of zeros (``None`` when the sparsifier does not say), and
    the zeros it has (from the mask while there is one, else from the squashed weight)."""

    tensor_fqn: str
    label: str
    kind: str
    weight_shape: tuple[int, ...]
    args: Mapping[str, Any]
    target: float | None
    nonzeros: int
    total: int

    @property
    def achieved(self) -> float:
        """The fraction of zeros."""
        return 1 - self.nonzeros / self.total


def layer_sparsity(gm: fx.GraphModule, sparsifier: BaseSparsifier | None = None) -> tuple[LayerSparsity, ...]:
    """Target and achieved sparsity of every weight of ``sparsifier`` (default ``get_sparsifier(gm)``), in group order.

    Args:
        gm: a module returned by ``prepare`` (masked or squashed).
        sparsifier: defaults to ``get_sparsifier(gm)``.

    Returns:
        One :class:`LayerSparsity` per sparsified weight; :func:`sparsity_table` prints them.

    Example::

        >>> gm = fx_sparsity.prepare(nn.Sequential(nn.Linear(8, 8)), sparsifier=MagnitudeSparsifier(0.75))
        >>> fx_sparsity.get_sparsifier(gm).step()
        >>> [(r.label, r.target, r.achieved) for r in layer_sparsity(gm)]
        [('0', 0.75, 0.75)]
    """
    if sparsifier is not None and not isinstance(sparsifier, BaseSparsifier):
        raise TypeError(
            f"sparsifier must be the BaseSparsifier that prepared gm (or None for get_sparsifier(gm)), got "
            f"{type(sparsifier).__name__} {sparsifier!r:.40}"
        )
    sparsifier = sparsifier or get_sparsifier(gm)
    layers = []
    for view in sparsifier.groups:
        record = view.record
        owner = view.module
        mask = getattr(owner, f"{record.tensor_name}_mask", None)
        values = mask if mask is not None else getattr(owner, record.tensor_name)
        label = record.module_fqn or "(root)"
        if record.tensor_name != "weight":
            label += f" [{record.tensor_name}]"
        layers.append(LayerSparsity(
            record.tensor_fqn, label, record.kind, tuple(record.weight_shape), record.args,
            sparsifier.target_sparsity(view), int(torch.count_nonzero(values)), values.numel(),
        ))
    return tuple(layers)


def sparsity_table(gm: fx.GraphModule, sparsifier: BaseSparsifier | None = None, tablefmt: str = "simple") -> str:
    """Per-layer table: module (and tensor name when not ``weight``), op kind, weight shape,
    sparsifier and its arguments,
    target and achieved sparsity, nonzeros / total; plus a total row.

    Achieved sparsity is read from the mask while there is one, else from the
    (squashed) weight itself. Weights of Linear/Conv-like modules that the graph
    gave no op to mask are listed below the table with the reason and the remedy.

    Args:
        gm: a module returned by ``prepare`` (masked or squashed).
        sparsifier: defaults to ``get_sparsifier(gm)``.
        tablefmt: any tabulate format (``"github"`` for Markdown).
    """
    sparsifier = sparsifier or get_sparsifier(gm)
    name = type(sparsifier).__name__
    rows, nnz_sum, total_sum, target_sum = [], 0, 0, 0.0
    targets_known = True
    for layer in layer_sparsity(gm, sparsifier):
        nnz, total, target = layer.nonzeros, layer.total, layer.target
        rows.append([
            layer.label,
            layer.kind,
            "x".join(map(str, layer.weight_shape)),
            name,
            _format_group_args(layer.args),
            _percent(target),
            _percent(layer.achieved),
            f"{nnz:,} / {total:,}",
        ])
        nnz_sum, total_sum = nnz_sum + nnz, total_sum + total
        if target is None:
            targets_known = False
        else:
            target_sum += target * total
    rows.append([
        "total", "", "", "", "",
        _percent(target_sum / total_sum if targets_known and total_sum else None),
        _percent(1 - nnz_sum / total_sum if total_sum else None),
        f"{nnz_sum:,} / {total_sum:,}",
    ])
    headers = ["module", "op", "weight shape", "sparsifier", "arguments", "target", "achieved", "nonzeros / total"]
    table = tabulate(rows, headers=headers, tablefmt=tablefmt)
    unmatched = get_unmatched(gm)
    if unmatched:
        table += "\n\nLeft dense, no op in the graph to mask (fx_sparsity.get_unmatched(gm)):\n" + "\n".join(
            f"  {u.tensor_fqn}: {u.reason}; remedy: {u.remedy}" for u in unmatched
        )
    return table


def _format_target(node: fx.Node) -> str:
    if node.op in ("call_module", "get_attr", "placeholder", "output"):
        return str(node.target)
    if isinstance(node.target, torch._ops.OpOverload):
        return str(node.target)
    return getattr(node.target, "__name__", str(node.target))


def _format_args(node: fx.Node, width: int = 60) -> str:
    text = ", ".join(
        [str(a) for a in node.args] + [f"{k}={v}" for k, v in node.kwargs.items()]
    )
    return text if len(text) <= width else text[: width - 3] + "..."


def graph_table(gm: fx.GraphModule, tablefmt: str = "simple") -> str:
    """Table of the graph's nodes (node, op, target, args) with a ``sparsity`` column
    that marks ``mul(weight, mask)`` nodes (``>> MASK``) and the ops reading them."""
    rows = []
    for node in gm.graph.nodes:
        target = get_sparse_target(node)
        mark = ""
        if target is not None and target.role == "mask_mul":
            mark = f">> MASK {target.mask_fqn}"
        elif target is not None and target.role == "op":
            mark = f"masked {target.kind}"
        elif node.op == "call_function" and getattr(node.target, "namespace", None) == "fx_sparsity":
            mark = f"SPARSE {node.target.__name__.split('.')[0]}"
        rows.append([node.name, node.op, _format_target(node), _format_args(node), mark])
    return tabulate(rows, headers=["node", "op", "target", "args", "sparsity"], tablefmt=tablefmt)


def print_sparsity_table(gm: fx.GraphModule, sparsifier: BaseSparsifier | None = None, tablefmt: str = "simple") -> None:
    """Print :func:`sparsity_table`."""
    print(sparsity_table(gm, sparsifier, tablefmt))


def print_graph_table(gm: fx.GraphModule, tablefmt: str = "simple") -> None:
    """Print :func:`graph_table`."""
    print(graph_table(gm, tablefmt))


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1e3 * seconds:.3f}"


def lowering_table(lowered: fx.GraphModule, tablefmt: str = "simple") -> str:
    """Per-layer table of what :func:`fx_sparsity.lower` did: backend (and block size),
    sparsity, weight bytes dense and lowered, and, when ``example_inputs`` were given,
    milliseconds per call of the masked layer (before) and the lowered one (after);
    plus a total row.

    Args:
        lowered: a module returned by ``lower``.
        tablefmt: any tabulate format (``"github"`` for Markdown).
    """
    records = get_lowering(lowered)
    rows = []
    for r in records:
        backend = r.backend + (f" {r.blocksize[0]}x{r.blocksize[1]}" if r.blocksize else "")
        if r.requested != r.backend:
            backend += f" (asked {r.requested})"
        speedup = "-" if r.time_before is None else f"{r.time_before / r.time_after:.2f}x"
        rows.append([
            r.tensor_fqn, r.kind, "x".join(map(str, r.weight_shape)), backend, _percent(r.sparsity),
            _bytes(r.dense_bytes), _bytes(r.lowered_bytes), f"{r.lowered_bytes / r.dense_bytes:.2f}",
            _ms(r.time_before), _ms(r.time_after), speedup, r.note,
        ])
    dense, low = sum(r.dense_bytes for r in records), sum(r.lowered_bytes for r in records)
    timed = all(r.time_before is not None for r in records)
    before = sum(r.time_before for r in records) if timed else None
    after = sum(r.time_after for r in records) if timed else None
    rows.append([
        "total", "", "", "", "", _bytes(dense), _bytes(low), f"{low / dense:.2f}" if dense else "-",
        _ms(before), _ms(after), f"{before / after:.2f}x" if timed else "-", "",
    ])
    headers = ["weight", "op", "shape", "backend", "sparsity", "bytes dense", "bytes lowered", "ratio",
               "ms before", "ms after", "speedup", "note"]
    return tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True)


def print_lowering_table(lowered: fx.GraphModule, tablefmt: str = "simple") -> None:
    """Print :func:`lowering_table`."""
    print(lowering_table(lowered, tablefmt))
