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

from .api import get_unmatched, prepare
from .calibrate import calibrate
from .compare import CompareReport, LayerError, compare, compare_table, print_compare
from .owl import outlier_ratio, owl_levels, set_owl_levels
from .lower import BACKENDS, LayerLowering, TimedShrinkReport, get_lowering, lower
from .config import SparsityConfig, parse_config
from .masks import nearly_diagonal_mask, weight_norm_mask
from .plots import draw_graph, plot_compare, plot_sparsity
from .report import (
    LayerSparsity,
    graph_table,
    layer_sparsity,
    lowering_table,
    print_graph_table,
    print_lowering_table,
    print_sparsity_table,
    sparsity_table,
)
from .scheduler import BaseScheduler, CubicSL, LambdaSL
from .sequential import SequentialReport, StageRecord, prune_sequential
from .streaming import SafetensorsWeights, prepare_on_meta
from .structured import shrink, shrink_report
from .user_model import to_model
from .sparsifier import (
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
from .sparsifier.structured import accumulate_gradients

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
