"""Inspection: sparsity, graph and lowering tables, per-layer error reports, plots."""

from fx_sparsity.report.comparison import (
    LayerError,
    CompareReport,
    compare,
    print_compare,
    compare_table,
)
from fx_sparsity.report.plots import (
    plot_sparsity,
    plot_compare,
    draw_graph,
    MASK_COLOR,
    MASKED_OP_COLOR,
)
from fx_sparsity.report.tables import (
    LayerSparsity,
    layer_sparsity,
    sparsity_table,
    graph_table,
    lowering_table,
    print_sparsity_table,
    print_graph_table,
    print_lowering_table,
)

__all__ = [
    "LayerError",
    "CompareReport",
    "compare",
    "print_compare",
    "compare_table",
    "plot_sparsity",
    "plot_compare",
    "draw_graph",
    "MASK_COLOR",
    "MASKED_OP_COLOR",
    "LayerSparsity",
    "layer_sparsity",
    "sparsity_table",
    "graph_table",
    "lowering_table",
    "print_sparsity_table",
    "print_graph_table",
    "print_lowering_table",
]
