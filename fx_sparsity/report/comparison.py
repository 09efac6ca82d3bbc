"""``compare``: what pruning cost, layer by layer, on the user's own batches.

Both models run on the same batches; the output of every Linear/Conv layer and
the final output of the candidate are compared with the reference's:
``||y_candidate - y_reference|| / ||y_reference||`` over all batches. Errors
accumulate through the network (each model feeds its layers its own
activations), as they would in use.

A layer is found by its module FQN: forward hooks on a plain module; in a
``GraphModule`` (prepared, squashed or lowered) the node that computes the
layer: a ``call_module`` on it, a masked op tagged with it, or a sparse-kernel
op reading its packed weight. A layer the candidate does not compute
recognisably is reported as such, never dropped.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tabulate import tabulate
from torch import Tensor, fx, nn
from torch.utils._pytree import tree_leaves

from fx_sparsity.utils.running import check_batches, eval_mode, fit_inputs, placeholder_values
from passes import get_sparse_target
from passes.lowering import COMPONENT_NAMES, SPARSE_OPS
from passes.utils import split_fqn

__all__ = ["LayerError", "CompareReport", "compare", "print_compare", "compare_table"]

_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_SPARSE_TARGETS = frozenset(SPARSE_OPS.values())


@dataclass(frozen=True)
class LayerError:
    """One layer's output error: ``relative_error`` is ``None`` when a model did not compute the layer."""

    name: str
    relative_error: float | None
    calls: int
    note: str = ""


@dataclass(frozen=True)
class CompareReport:
    """Per-layer errors in the reference's module order, and the final output's relative error."""

    layers: tuple[LayerError, ...]
    output_error: float

    def table(self, tablefmt: str = "simple") -> str:
        rows = [
            [e.name, "-" if e.relative_error is None else f"{e.relative_error:.3e}", e.calls, e.note]
            for e in self.layers
        ]
        rows.append(["(output)", f"{self.output_error:.3e}", "", ""])
        return tabulate(rows, headers=["layer", "relative error", "calls", "note"], tablefmt=tablefmt)

    def __str__(self) -> str:
        return self.table()


class _Recorder:
    """Accumulated sums over batches of ``||y_c - y_r||^2`` and ``||y_r||^2`` per name."""

    def __init__(self) -> None:
        self.diff: dict[str, float] = {}
        self.ref: dict[str, float] = {}

    def add(self, name: str, candidate: Sequence[Tensor], reference: Sequence[Tensor]) -> None:
        for c, r in zip(candidate, reference, strict=True):
            if c.shape != r.shape:
                raise ValueError(f"{name}: the candidate's output has shape {tuple(c.shape)}, the reference's {tuple(r.shape)}")
            self.diff[name] = self.diff.get(name, 0.0) + (c.double() - r.double()).square().sum().item()
            self.ref[name] = self.ref.get(name, 0.0) + r.double().square().sum().item()

    def error(self, name: str) -> float:
        ref = self.ref[name]
        return (self.diff[name] / ref) ** 0.5 if ref > 0 else (0.0 if self.diff[name] == 0 else float("inf"))


def _layer_of_node(gm: fx.GraphModule, node: fx.Node, layers: set[str]) -> tuple[str, fx.Node] | None:
    """The layer ``node`` computes and the node holding its output in the layer's layout, or ``None``."""
    if node.op == "call_module" and node.target in layers:
        return node.target, node
    target = get_sparse_target(node)
    if target is not None and target.role in ("op", "lowered"):
        name = target.call_module_fqn or target.module_fqn
        return (name, node) if name in layers else None
    if node.op == "call_function" and node.target in _SPARSE_TARGETS:
        packed = node.args[1]
        if not (isinstance(packed, fx.Node) and packed.op == "get_attr"):
            return None
        suffixes = [f"_{part}" for parts in COMPONENT_NAMES.values() for part in parts]
        suffix = next((s for s in suffixes if packed.target.endswith(s)), None)
        if suffix is None:
            return None
        name = split_fqn(packed.target[: -len(suffix)])[0]
        out = node
        # A lowered conv moves channels last around the kernel and back: the layer's output is after that.
        while len(out.users) == 1:
            user = next(iter(out.users))
            if user.target is torch.movedim or (user.op == "call_method" and user.target == "contiguous"):
                out = user
            else:
                break
        return (name, out) if name in layers else None
    return None


class _GraphRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, layers: set[str]) -> None:
        super().__init__(gm)
        self.watch: dict[fx.Node, str] = {}
        for node in gm.graph.nodes:
            found = _layer_of_node(gm, node, layers)
            if found is not None:
                self.watch[found[1]] = found[0]
        self.outputs: dict[str, list[Tensor]] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if n in self.watch:
            self.outputs.setdefault(self.watch[n], []).append(result.detach())
        return result


def _run(model: nn.Module, batch: Any, layers: set[str], name: str) -> tuple[Any, dict[str, list[Tensor]]]:
    args, kwargs = fit_inputs(model, batch, name)
    if isinstance(model, fx.GraphModule):
        recorder = _GraphRecorder(model, layers)
        return recorder.run(*placeholder_values(model, args, kwargs)), recorder.outputs
    outputs: dict[str, list[Tensor]] = {}
    handles = [
        module.register_forward_hook(lambda m, i, o, name=name: outputs.setdefault(name, []).append(o.detach()))
        for name, module in model.named_modules()
        if name in layers
    ]
    try:
        return model(*args, **kwargs), outputs
    finally:
        for handle in handles:
            handle.remove()


def _layer_names(reference: nn.Module, layers: Iterable[str] | str | None) -> list[str]:
    """The module FQNs to compare: ``layers`` checked against ``reference`` (one FQN may be given as a string)."""
    if layers is None:
        return [n for n, m in reference.named_modules() if isinstance(m, _LAYER_TYPES)]
    if isinstance(layers, str):
        layers = [layers]
    elif not isinstance(layers, Iterable):
        raise TypeError(f"layers must be a list of module FQNs (or one FQN) or None, got {type(layers).__name__}")
    names = list(dict.fromkeys(layers))
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise TypeError(f"layers must hold module FQNs (strings), got {bad[0]!r}")
    known = [n for n, _ in reference.named_modules()]
    unknown = [n for n in names if n not in set(known)]
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=5, cutoff=0.5)
        hint = f"; closest FQNs: {', '.join(close)}" if close else ""
        raise ValueError(f"layers {unknown} are not modules of the reference {type(reference).__name__}{hint}")
    return names


def compare(
    reference: nn.Module,
    candidate: nn.Module,
    batches: Iterable[Any],
    layers: Iterable[str] | None = None,
) -> CompareReport:
    """Relative output error of each layer and of the whole candidate against the reference.

    Both models run under ``no_grad`` in eval mode (dropout off, BatchNorm on its running
    statistics, which therefore never move), their training flags restored afterwards.

    Args:
        reference: the dense model (or any module to compare against).
        candidate: the pruned model: prepared, squashed, lowered, or a plain module.
        batches: an iterable of inputs (a tensor, a tuple of positional inputs or a dict of keyword inputs
            per batch, as a tokenizer returns them; e.g. a list or a DataLoader), run under ``no_grad``. Each model
            takes each batch in its own form: a module ``torch.export`` captured from a dict takes the same keys.
        layers: module FQNs to compare (a string for one); default: every Linear and Conv module of ``reference``.

    Returns:
        A :class:`CompareReport` (``print(report)`` shows the table).

    Raises:
        TypeError: ``reference`` or ``candidate`` is not a module; ``batches`` is not an iterable of inputs
            (one tensor, ``None``, a number); a batch holds inputs the models do not take.
        ValueError: ``batches`` is empty, ``layers`` names a module the reference lacks, or the outputs'
            structures or shapes differ.

    Example::

        >>> gm = fx_sparsity.prepare(model)
        >>> fx_sparsity.get_sparsifier(gm).step()
        >>> report = fx_sparsity.compare(model, gm, [torch.randn(8, 64)])
        >>> round(report.output_error, 2)       # half the weights of a random, untrained model gone
        0.71
    """
    for argument, value in (("reference", reference), ("candidate", candidate)):
        if not isinstance(value, nn.Module):
            raise TypeError(
                f"{argument} must be an nn.Module (the dense model, or the prepared, squashed or lowered one), "
                f"got {type(value).__name__} {value!r}"[:300]
            )
    check_batches(batches)
    names = _layer_names(reference, layers)
    wanted = set(names)
    per_layer, output = _Recorder(), _Recorder()
    calls: dict[str, int] = {}
    missing: dict[str, str] = {}
    seen = 0
    with torch.no_grad(), eval_mode(reference), eval_mode(candidate):
        for batch in batches:
            name = f"batch {seen} of batches"
            ref_out, ref_layers = _run(reference, batch, wanted, name)
            cand_out, cand_layers = _run(candidate, batch, wanted, name)
            ref_leaves = [t for t in tree_leaves(ref_out) if isinstance(t, Tensor)]
            cand_leaves = [t for t in tree_leaves(cand_out) if isinstance(t, Tensor)]
            if len(ref_leaves) != len(cand_leaves):
                raise ValueError(f"the models return {len(ref_leaves)} and {len(cand_leaves)} tensors")
            output.add("output", cand_leaves, ref_leaves)
            for name in names:
                r, c = ref_layers.get(name), cand_layers.get(name)
                if r is None or c is None:
                    missing[name] = "not run by the reference" if r is None else "not found in the candidate"
                    continue
                if len(r) != len(c):
                    missing[name] = f"called {len(r)} times by the reference, {len(c)} by the candidate"
                    continue
                per_layer.add(name, c, r)
                calls[name] = calls.get(name, 0) + len(r)
            seen += 1
    if not seen:
        raise ValueError("compare needs at least one batch; batches was empty")
    errors = tuple(
        LayerError(n, None, 0, missing[n]) if n in missing else LayerError(n, per_layer.error(n), calls[n])
        for n in names
    )
    return CompareReport(errors, output.error("output"))


def print_compare(
    reference: nn.Module, candidate: nn.Module, batches: Iterable[Any], layers: Iterable[str] | None = None
) -> CompareReport:
    """Print :func:`compare`'s table and return the report.

    Args:
        reference, candidate, batches, layers: as for :func:`compare`.

    Returns:
        The :class:`CompareReport`.

    Raises:
        TypeError / ValueError: as :func:`compare`, before anything is printed.

    Example::

        >>> gm = fx_sparsity.prepare(model)  # all-ones masks until step(): no error yet
        >>> report = print_compare(model, gm, batches)  # doctest: +NORMALIZE_WHITESPACE
        layer       relative error    calls  note
        --------  ----------------  -------  ------
        0                        0        4
        2                        0        4
        (output)                 0
    """
    report = compare(reference, candidate, batches, layers)
    print(report.table())
    return report


def compare_table(reports: Mapping[str, CompareReport], tablefmt: str = "simple") -> str:
    """One table of several candidates' :func:`compare` reports against the same reference and batches.

    Args:
        reports: ``{form name: report}``, e.g. ``{"prepared": compare(model, gm, b), "lowered": compare(model, low, b)}``;
            every report must list the same layers in the same order.
        tablefmt: a ``tabulate`` format.

    Returns:
        The table: one row per layer and one for the output, one relative-error column per form, then the
        notes (a layer a form did not compute shows ``-``).

    Raises:
        ValueError: ``reports`` is empty or its reports list different layers.
        TypeError: a value of ``reports`` is not a :class:`CompareReport`.

    Example::

        >>> gm = fx_sparsity.prepare(model)
        >>> fx_sparsity.get_sparsifier(gm).step()
        >>> reports = {"prepared": compare(model, gm, batches), "fused": compare(model, fx_sparsity.lower(gm), batches)}
        >>> compare_table(reports).splitlines()[0].split()
        ['layer', 'prepared', 'fused', 'note']
    """
    if not isinstance(reports, Mapping) or not reports:
        raise ValueError("reports must be a non-empty dict of form name -> CompareReport")
    for form, report in reports.items():
        if not isinstance(report, CompareReport):
            raise TypeError(
                f"reports[{form!r}] must be a CompareReport (what compare() returns), got {type(report).__name__}"
            )
    forms = list(reports)
    names = [e.name for e in reports[forms[0]].layers]
    for form in forms[1:]:
        other = [e.name for e in reports[form].layers]
        if other != names:
            raise ValueError(f"reports[{form!r}] lists the layers {other}, reports[{forms[0]!r}] lists {names}: "
                             "compare every form on the same layers")
    rows = []
    for i, name in enumerate(names):
        errors = [reports[f].layers[i] for f in forms]
        notes = "; ".join(f"{f}: {e.note}" for f, e in zip(forms, errors) if e.note)
        rows.append([name, *("-" if e.relative_error is None else f"{e.relative_error:.3e}" for e in errors), notes])
    rows.append(["(output)", *(f"{reports[f].output_error:.3e}" for f in forms), ""])
    return tabulate(rows, headers=["layer", *forms, "note"], tablefmt=tablefmt, disable_numparse=True)
