"""fx_sparsity: weight sparsity for PyTorch as explicit mask nodes in torch.fx graphs.

The stages, each a subpackage (the names below are the ones a user calls most):

* prepare: :func:`prepare` (capture, match, insert masks; the recipe is :mod:`fx_sparsity.sparsifier.preparing`),
  configs in :mod:`fx_sparsity.config`, what the returned module records in :mod:`fx_sparsity.meta`;
* :mod:`fx_sparsity.sparsifier`: the sparsifiers, each beside its mask math;
* :mod:`fx_sparsity.levels`: schedulers over steps, OWL levels over layers;
* :mod:`fx_sparsity.calibration`: :func:`calibrate`, :func:`prune_sequential`, streaming from a checkpoint;
* :mod:`fx_sparsity.structured`: :class:`ChannelPruner` and :func:`shrink`;
* :mod:`fx_sparsity.lowering`: :func:`lower`;
* :mod:`fx_sparsity.deploy`: :func:`to_model` and :func:`sparsify_model`, back to the user's class (dense, or with
  sparse modules), and compressed checkpoints (``save_sparse``, ``load_sparse``);
* :func:`oneshot` (:mod:`fx_sparsity.recipes`): a model and calibration data to the pruned model in its own class;
* :mod:`fx_sparsity.report`: tables, error reports, plots; :mod:`fx_sparsity.cli`: the command line.

Example::

    >>> import fx_sparsity
    >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    >>> gm = fx_sparsity.prepare(model)              # new GraphModule, model untouched
    >>> fx_sparsity.get_sparsifier(gm).step()        # compute masks
    >>> print(fx_sparsity.report.sparsity_table(gm).splitlines()[-1].split())
    ['total', '50.0%', '50.0%', '2,304', '/', '4,608']
    >>> lowered = fx_sparsity.lower(gm, "csr")       # no masks; sparse kernels; exportable
"""

from passes.capturing import CaptureError
from passes.compat import install_moved_modules, keep_attributes, moved_names

from fx_sparsity.calibration.statistics import calibrate
from fx_sparsity.calibration.sequential import prune_sequential
from fx_sparsity.deploy.user_model import sparsify_model, to_model
from fx_sparsity.levels.scheduler import CubicSL, LambdaSL
from fx_sparsity.levels.owl import set_owl_levels
from fx_sparsity.lowering.recipe import lower
from fx_sparsity.meta import get_lowering, get_sparsifier, get_unmatched, shrink_report
from fx_sparsity.preparation import prepare
from fx_sparsity.recipes import oneshot
from fx_sparsity.report.comparison import compare, print_compare
from fx_sparsity.report.tables import print_graph_table, print_lowering_table, print_sparsity_table
from fx_sparsity.sparsifier.base import BaseSparsifier
from fx_sparsity.sparsifier.magnitude.sparsifier import GlobalMagnitudeSparsifier, MagnitudeSparsifier
from fx_sparsity.sparsifier.nearly_diagonal.sparsifier import NearlyDiagonalSparsifier
from fx_sparsity.sparsifier.nm.sparsifier import NMSparsifier
from fx_sparsity.sparsifier.sparsegpt.sparsifier import SparseGPTSparsifier
from fx_sparsity.sparsifier.wanda.sparsifier import WandaSparsifier
from fx_sparsity.sparsifier.weight_norm.sparsifier import WeightNormSparsifier
from fx_sparsity.structured.pruner import ChannelPruner
from fx_sparsity.structured.shrinking import shrink

__all__ = [
    # prepare
    "prepare",
    "get_sparsifier",
    "get_unmatched",
    "CaptureError",
    # sparsifiers
    "BaseSparsifier",
    "WeightNormSparsifier",
    "NearlyDiagonalSparsifier",
    "MagnitudeSparsifier",
    "GlobalMagnitudeSparsifier",
    "NMSparsifier",
    "WandaSparsifier",
    "SparseGPTSparsifier",
    "ChannelPruner",
    # levels
    "LambdaSL",
    "CubicSL",
    "set_owl_levels",
    # calibrate
    "calibrate",
    "prune_sequential",
    # lower, shrink, back to the user's class
    "lower",
    "get_lowering",
    "shrink",
    "shrink_report",
    "to_model",
    "sparsify_model",
    # one call for LLM users
    "oneshot",
    # report
    "print_sparsity_table",
    "print_graph_table",
    "print_lowering_table",
    "compare",
    "print_compare",
]

__version__ = "0.1.0"

# Names of fx_sparsity 0.1.0's fx_sparsity.__all__ that now live in a namespace.
__getattr__ = moved_names(
    __name__,
    {
        "BACKENDS": "fx_sparsity.lowering",
        "LayerLowering": "fx_sparsity.lowering",
        "TimedShrinkReport": "fx_sparsity.lowering",
        "BaseScheduler": "fx_sparsity.levels",
        "outlier_ratio": "fx_sparsity.levels",
        "owl_levels": "fx_sparsity.levels",
        "CompareReport": "fx_sparsity.report",
        "LayerError": "fx_sparsity.report",
        "compare_table": "fx_sparsity.report",
        "LayerSparsity": "fx_sparsity.report",
        "layer_sparsity": "fx_sparsity.report",
        "sparsity_table": "fx_sparsity.report",
        "graph_table": "fx_sparsity.report",
        "lowering_table": "fx_sparsity.report",
        "draw_graph": "fx_sparsity.report",
        "plot_compare": "fx_sparsity.report",
        "plot_sparsity": "fx_sparsity.report",
        "GroupView": "fx_sparsity.sparsifier",
        "WeightGroup": "fx_sparsity.sparsifier",
        "nearly_diagonal_mask": "fx_sparsity.sparsifier.nearly_diagonal",
        "weight_norm_mask": "fx_sparsity.sparsifier.weight_norm",
        "SparsityConfig": "fx_sparsity.config",
        "parse_config": "fx_sparsity.config",
        "SequentialReport": "fx_sparsity.calibration",
        "StageRecord": "fx_sparsity.calibration",
        "SafetensorsWeights": "fx_sparsity.calibration",
        "prepare_on_meta": "fx_sparsity.calibration",
        "accumulate_gradients": "fx_sparsity.structured",
    },
)

# Module paths of fx_sparsity 0.1.0 (imports, pickles and state dicts name them) and their new homes.
install_moved_modules(
    {
        "fx_sparsity.api": ("fx_sparsity.preparation", "fx_sparsity.meta", "fx_sparsity.sparsifier.preparing"),
        "fx_sparsity.autotune": ("fx_sparsity.lowering.autotune",),
        "fx_sparsity.calibrate": ("fx_sparsity.calibration.statistics",),
        "fx_sparsity.compare": ("fx_sparsity.report.comparison",),
        "fx_sparsity.convert": ("fx_sparsity.compat",),
        "fx_sparsity.layer_timing": ("fx_sparsity.lowering.timing",),
        "fx_sparsity.lower": ("fx_sparsity.lowering.recipe", "fx_sparsity.meta"),
        "fx_sparsity.lower_config": ("fx_sparsity.lowering.backends",),
        "fx_sparsity.masks": (
            "fx_sparsity.sparsifier.mask_utils",
            "fx_sparsity.sparsifier.weight_norm.masks",
            "fx_sparsity.sparsifier.nearly_diagonal.masks",
            "fx_sparsity.sparsifier.magnitude.masks",
            "fx_sparsity.sparsifier.nm.masks",
        ),
        "fx_sparsity.models": ("fx_sparsity.cli.demo_models",),
        "fx_sparsity.owl": ("fx_sparsity.levels.owl",),
        "fx_sparsity.plots": ("fx_sparsity.report.plots",),
        "fx_sparsity.progress": ("fx_sparsity.utils.progress",),
        "fx_sparsity.running": ("fx_sparsity.utils.running",),
        "fx_sparsity.scheduler": ("fx_sparsity.levels.scheduler",),
        "fx_sparsity.sequential": ("fx_sparsity.calibration.sequential",),
        "fx_sparsity.sparsegpt": ("fx_sparsity.sparsifier.sparsegpt.obs", "passes.calibration.observers"),
        "fx_sparsity.streaming": ("fx_sparsity.calibration.streaming",),
        "fx_sparsity.user_frames": ("fx_sparsity.utils.frames",),
        "fx_sparsity.user_model": ("fx_sparsity.deploy.user_model", "fx_sparsity.meta"),
        "fx_sparsity.sparsifier.importance": ("fx_sparsity.structured.importance",),
        "fx_sparsity.sparsifier.structured": (
            "fx_sparsity.structured.pruner",
            "fx_sparsity.structured.gradients",
            "fx_sparsity.structured.importance",
        ),
    },
    renamed={
        "fx_sparsity.api": {"UNMATCHED_META_KEY": "fx_sparsity.meta:UNMATCHED_KEY"},
        "fx_sparsity.lower": {"LOWERING_META_KEY": "fx_sparsity.meta:LOWERING_KEY"},
        "fx_sparsity.user_model": {"SOURCE_MODEL_META_KEY": "fx_sparsity.meta:SOURCE_MODEL_KEY"},
    },
)
keep_attributes(__name__)
