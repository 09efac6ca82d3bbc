"""fx_sparsity: weight sparsity for PyTorch as explicit mask nodes in torch.fx graphs.

Example::

    >>> import fx_sparsity
    >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    >>> gm = fx_sparsity.prepare(model)              # new GraphModule, model untouched
    >>> fx_sparsity.get_sparsifier(gm).step()        # compute masks
    >>> print(fx_sparsity.sparsity_table(gm).splitlines()[-1].split())
    ['total', '50.0%', '50.0%', '2,304', '/', '4,608']
    >>> lowered = fx_sparsity.lower(gm, "csr")       # no masks; sparse kernels; exportable
"""

from passes import CaptureError

from fx_sparsity.preparation import get_unmatched, prepare
from fx_sparsity.calibration.statistics import calibrate
from fx_sparsity.report.comparison import CompareReport, LayerError, compare, compare_table, print_compare
from fx_sparsity.levels.owl import outlier_ratio, owl_levels, set_owl_levels
from fx_sparsity.lowering.recipe import BACKENDS, LayerLowering, TimedShrinkReport, get_lowering, lower
from fx_sparsity.config import SparsityConfig, parse_config
from fx_sparsity.sparsifier.masks import nearly_diagonal_mask, weight_norm_mask
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
from fx_sparsity.levels.scheduler import BaseScheduler, CubicSL, LambdaSL
from fx_sparsity.calibration.sequential import SequentialReport, StageRecord, prune_sequential
from fx_sparsity.calibration.streaming import SafetensorsWeights, prepare_on_meta
from fx_sparsity.structured.shrinking import shrink, shrink_report
from fx_sparsity.deploy.user_model import to_model
from fx_sparsity.sparsifier import (
    BaseSparsifier,
    ChannelPruner,
    GlobalMagnitudeSparsifier,
    GroupView,
    MagnitudeSparsifier,
    NearlyDiagonalSparsifier,
    NMSparsifier,
    SparseGPTSparsifier,
    WandaSparsifier,
    WeightGroup,
    WeightNormSparsifier,
    get_sparsifier,
)
from fx_sparsity.structured.pruner import accumulate_gradients

__all__ = [
    "BACKENDS",
    "BaseScheduler",
    "BaseSparsifier",
    "CaptureError",
    "ChannelPruner",
    "CompareReport",
    "LayerError",
    "CubicSL",
    "GlobalMagnitudeSparsifier",
    "GroupView",
    "LambdaSL",
    "MagnitudeSparsifier",
    "NMSparsifier",
    "SparseGPTSparsifier",
    "LayerLowering",
    "TimedShrinkReport",
    "accumulate_gradients",
    "NearlyDiagonalSparsifier",
    "SparsityConfig",
    "WandaSparsifier",
    "WeightGroup",
    "WeightNormSparsifier",
    "calibrate",
    "compare",
    "prune_sequential",
    "prepare_on_meta",
    "SafetensorsWeights",
    "SequentialReport",
    "StageRecord",
    "compare_table",
    "draw_graph",
    "layer_sparsity",
    "LayerSparsity",
    "plot_compare",
    "plot_sparsity",
    "to_model",
    "outlier_ratio",
    "owl_levels",
    "print_compare",
    "set_owl_levels",
    "shrink",
    "shrink_report",
    "get_lowering",
    "get_sparsifier",
    "get_unmatched",
    "graph_table",
    "lower",
    "lowering_table",
    "nearly_diagonal_mask",
    "parse_config",
    "prepare",
    "print_graph_table",
    "print_lowering_table",
    "print_sparsity_table",
    "sparsity_table",
    "weight_norm_mask",
]

__version__ = "0.1.0"
