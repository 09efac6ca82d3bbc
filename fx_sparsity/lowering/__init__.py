"""``lower``: a prepared module without masks, its layers fused or run by sparse kernels.

The recipe (:mod:`.recipe`) parses the per-layer backends (:mod:`.backends`), chooses a format per layer
for ``"auto"`` (:mod:`.autotune`) by timing it (:mod:`.timing`), and runs the graph passes of
:mod:`passes.lowering`.
"""

from fx_sparsity.lowering.backends import BACKENDS, MODEL_BACKENDS, BackendConfig, LayerRequest
from fx_sparsity.lowering.recipe import LayerLowering, TimedShrinkReport, lower
from fx_sparsity.meta import get_lowering

__all__ = [
    "BACKENDS",
    "MODEL_BACKENDS",
    "BackendConfig",
    "LayerRequest",
    "LayerLowering",
    "TimedShrinkReport",
    "lower",
    "get_lowering",
]
