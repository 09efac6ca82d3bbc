"""Pictures for people who would rather look than read: optional, never required.

* :func:`plot_sparsity`: per-layer target and achieved sparsity (bars), from
  :func:`fx_sparsity.report.layer_sparsity`;
* :func:`plot_compare`: per-layer relative output error from
  :func:`fx_sparsity.compare`, one bar per form when several reports are given;
* :func:`draw_graph`: the prepared graph drawn by torch.fx's ``FxGraphDrawer``,
  the mask nodes (``mul(weight, mask)`` and the mask buffers) in red, the ops
  reading a masked weight in orange.

The plots need matplotlib (``pip install matplotlib``) and draw on a
``matplotlib.figure.Figure`` without pyplot, so no GUI backend or global state is
involved. The graph needs pydot (``pip install pydot``); writing anything but
``.dot`` also needs Graphviz's ``dot`` program. Without them each function raises
an ``ImportError`` or ``RuntimeError`` saying what to install. Since these
packages are optional, the examples below are not run as doctests;
tests/test_plots.py checks every function.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from typing import Any

from torch import fx

from fx_sparsity.report.comparison import CompareReport
from fx_sparsity.report.tables import layer_sparsity
from fx_sparsity.sparsifier.base import BaseSparsifier
from passes import get_sparse_target

__all__ = ["plot_sparsity", "plot_compare", "draw_graph", "MASK_COLOR", "MASKED_OP_COLOR"]

MASK_COLOR = "#ff6961"  # mul(weight, mask) nodes and mask buffers
MASKED_OP_COLOR = "#ffb347"  # the ops reading a masked weight


def _figure_class() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            "fx_sparsity's plots need matplotlib, an optional dependency: pip install matplotlib"
        ) from e
    return Figure


def _check_path(path: str | os.PathLike | None, argument: str = "path") -> None:
    if path is None:
        return
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{argument} must be a file path (str or os.PathLike) or None, got {type(path).__name__}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{argument}={str(path)!r}: the folder {folder} does not exist; create it first")


def _bar_width(n: int) -> float:
    return 0.8 / n


def _finish(figure: Any, axes: Any, ylabel: str, title: str, path: str | os.PathLike | None) -> Any:
    """Label the bar chart, add its legend, save it to ``path`` (when given) and return the figure."""
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend()
    if path is not None:
        figure.savefig(path)
    return figure


def plot_sparsity(
    gm: fx.GraphModule, path: str | os.PathLike | None = None, *, sparsifier: BaseSparsifier | None = None
) -> Any:
    """Bar chart of each sparsified weight's target and achieved sparsity.

    Args:
        gm: a module returned by ``prepare`` (masked or squashed).
        path: where to save the picture (the extension picks the format: ``.png``,
            ``.svg``, ``.pdf``, ...); ``None`` saves nothing.
        sparsifier: defaults to ``get_sparsifier(gm)``.

    Returns:
        The ``matplotlib.figure.Figure`` (its one axes holds the "target" and
        "achieved" bar containers, in layer order; layers whose sparsifier gives
        no target have no target bar).

    Raises:
        ImportError: matplotlib is not installed.
        TypeError / ValueError: a bad ``path`` or ``sparsifier``, or ``gm`` was not prepared.

    Example::

        >>> gm = fx_sparsity.prepare(model, sparsifier=fx_sparsity.MagnitudeSparsifier(0.5))
        >>> fx_sparsity.get_sparsifier(gm).step()
        >>> figure = plot_sparsity(gm)  # doctest: +SKIP
        >>> [bar.get_height() for bar in figure.axes[0].containers[1]]  # achieved  # doctest: +SKIP
        [0.5, 0.5]
        >>> _ = plot_sparsity(gm, "sparsity.png")  # doctest: +SKIP
    """
    _check_path(path)
    if sparsifier is not None and not isinstance(sparsifier, BaseSparsifier):
        raise TypeError(
            f"sparsifier must be the BaseSparsifier that prepared gm, or None for get_sparsifier(gm); got "
            f"{type(sparsifier).__name__} {sparsifier!r}"[:300]
        )
    layers = layer_sparsity(gm, sparsifier)
    figure = _figure_class()(figsize=(max(6.0, 0.5 * len(layers) + 2), 4.5), layout="constrained")
    axes = figure.subplots()
    x = list(range(len(layers)))
    width = _bar_width(2)
    known = [i for i, layer in enumerate(layers) if layer.target is not None]
    axes.bar([i - width / 2 for i in known], [layers[i].target for i in known], width, label="target")
    axes.bar([i + width / 2 for i in x], [layer.achieved for layer in layers], width, label="achieved")
    axes.set_xticks(x, [layer.label for layer in layers], rotation=60, ha="right", fontsize="small")
    axes.set_ylim(0, 1)
    return _finish(figure, axes, "fraction of zeros", "sparsity per layer", path)


def plot_compare(
    reports: CompareReport | Mapping[str, CompareReport], path: str | os.PathLike | None = None
) -> Any:
    """Bar chart of each layer's relative output error (log scale), one bar per form, and the output's.

    Args:
        reports: one :func:`fx_sparsity.compare` report, or ``{form name: report}``
            for several forms compared on the same layers.
        path: where to save the picture; ``None`` saves nothing.

    Returns:
        The ``matplotlib.figure.Figure`` (one bar container per form, in order;
        layers a form did not compute have no bar).

    Raises:
        ImportError: matplotlib is not installed.
        TypeError / ValueError: bad ``reports`` or ``path``.

    Example::

        >>> gm = fx_sparsity.prepare(model)
        >>> fx_sparsity.get_sparsifier(gm).step()
        >>> reports = {"prepared": compare(model, gm, batches), "csr": compare(model, fx_sparsity.lower(gm, "csr"), batches)}
        >>> _ = plot_compare(reports, "errors.png")  # doctest: +SKIP
    """
    if isinstance(reports, CompareReport):
        reports = {"candidate": reports}
    if not isinstance(reports, Mapping) or not reports or not all(isinstance(r, CompareReport) for r in reports.values()):
        raise TypeError("reports must be a CompareReport or a non-empty dict of form name -> CompareReport")
    forms = list(reports)
    names = [e.name for e in reports[forms[0]].layers]
    for form in forms[1:]:
        if [e.name for e in reports[form].layers] != names:
            raise ValueError(f"reports[{form!r}] lists other layers than reports[{forms[0]!r}]: compare every form "
                             "on the same layers")
    _check_path(path)
    labels = [*names, "(output)"]
    figure = _figure_class()(figsize=(max(6.0, 0.5 * len(labels) + 2), 4.5), layout="constrained")
    axes = figure.subplots()
    width = _bar_width(len(forms))
    for k, form in enumerate(forms):
        errors = [e.relative_error for e in reports[form].layers] + [reports[form].output_error]
        shown = [i for i, e in enumerate(errors) if e is not None]
        offset = (k - (len(forms) - 1) / 2) * width
        axes.bar([i + offset for i in shown], [errors[i] for i in shown], width, label=form)
    axes.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize="small")
    if any(e.relative_error for r in reports.values() for e in r.layers) or any(r.output_error for r in reports.values()):
        axes.set_yscale("log")
    return _finish(figure, axes, "relative error ||y - y_ref|| / ||y_ref||", "output error per layer against the reference", path)


def _node_colors(gm: fx.GraphModule) -> dict[str, str]:
    """``{node name: fill colour}`` for the mask nodes and the ops reading a masked weight."""
    masks = set()
    colors = {}
    for node in gm.graph.nodes:
        target = get_sparse_target(node)
        if target is None:
            continue
        if target.role == "mask_mul":
            colors[node.name] = MASK_COLOR
            masks.add(target.mask_fqn)
        elif target.role == "op":
            colors[node.name] = MASKED_OP_COLOR
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in masks:
            colors[node.name] = MASK_COLOR
    return colors


def draw_graph(gm: fx.GraphModule, path: str | os.PathLike | None = None, *, name: str = "prepared") -> Any:
    """Draw ``gm``'s graph with torch.fx's ``FxGraphDrawer``, mask nodes highlighted.

    ``mul(weight, mask)`` nodes and the mask buffers' ``get_attr`` nodes are
    filled with :data:`MASK_COLOR`, the linear/conv ops reading a masked weight
    with :data:`MASKED_OP_COLOR`; other nodes keep the drawer's colours.

    Args:
        gm: any ``GraphModule``; a prepared one shows its masks.
        path: ``.dot`` writes the Graphviz source (needs pydot only); another
            extension (``.svg``, ``.png``, ``.pdf``) renders with Graphviz's
            ``dot`` program; ``None`` writes nothing.
        name: the graph's name in the drawing.

    Returns:
        The ``pydot.Dot`` graph.

    Raises:
        ImportError: pydot is not installed.
        RuntimeError: rendering needs Graphviz's ``dot`` program, which is not on ``PATH``.
        TypeError / ValueError: a bad ``gm`` or ``path``.

    Example::

        >>> gm = fx_sparsity.prepare(model)
        >>> _ = draw_graph(gm, "prepared.svg")  # or "prepared.dot" without Graphviz  # doctest: +SKIP
    """
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"gm must be a GraphModule (prepare's result), got {type(gm).__name__}")
    _check_path(path)
    extension = os.path.splitext(str(path))[1].lstrip(".").lower() if path is not None else "dot"
    if not extension:
        raise ValueError(f"path={str(path)!r} has no extension: end it with .dot, .svg, .png or .pdf")
    try:
        import pydot  # noqa: F401  (FxGraphDrawer needs it and says so less clearly)
        from torch.fx.passes.graph_drawer import FxGraphDrawer
    except ImportError as e:
        raise ImportError("draw_graph needs pydot, an optional dependency: pip install pydot") from e
    if extension != "dot" and shutil.which("dot") is None:
        raise RuntimeError(
            f"writing {str(path)!r} needs Graphviz's dot program, which is not on PATH: install Graphviz "
            "(apt-get install graphviz, brew install graphviz, conda install graphviz) or write a .dot file"
        )
    dot = FxGraphDrawer(gm, name).get_main_dot_graph()
    for node_name, color in _node_colors(gm).items():
        for dot_node in dot.get_node(node_name):
            dot_node.set("fillcolor", color)
    if path is not None:
        if extension == "dot":
            with open(path, "w") as f:
                f.write(dot.to_string())
        else:
            dot.write(str(path), format=extension)
    return dot
