"""Inspection: sparsity, graph and lowering tables (:mod:`.tables`), per-layer error against the dense model
(:mod:`.comparison`), and pictures (:mod:`.plots`, with the ``plot`` extra)."""

from fx_sparsity.meta import get_unmatched
from fx_sparsity.report.comparison import CompareReport, LayerError, compare, compare_table, print_compare
from fx_sparsity.report.plots import draw_graph, plot_compare, plot_sparsity
from fx_sparsity.report.tables import (
    LayerSparsity,
    graph_table,
    layer_sparsity,
    lowering_table,
    print_graph_table,
    print_lowering_table,
    print_sparsity_table,
    sparsity_table,
)

__all__ = [
    "get_unmatched",
    "CompareReport",
    "LayerError",
    "compare",
    "compare_table",
    "print_compare",
    "draw_graph",
    "plot_compare",
    "plot_sparsity",
    "LayerSparsity",
    "graph_table",
    "layer_sparsity",
    "lowering_table",
    "print_graph_table",
    "print_lowering_table",
    "print_sparsity_table",
    "sparsity_table",
]
