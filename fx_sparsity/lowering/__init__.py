"""``lower``: a prepared module without masks, its layers fused or run by sparse kernels."""

from fx_sparsity.lowering.autotune import (
    AUTO_MIN_SPEEDUP,
    LayerChoice,
    choose_backend,
    resolve_layer,
)
from fx_sparsity.lowering.backends import (
    BACKENDS,
    MODEL_BACKENDS,
    BackendConfig,
    LayerRequest,
    parse_backends,
)
from fx_sparsity.lowering.convert import (
    convert_modules,
)
from fx_sparsity.lowering.recipe import (
    lower,
    LayerLowering,
    TimedShrinkReport,
    get_lowering,
    BACKENDS,
    MODEL_BACKENDS,
    LOWERING_META_KEY,
)
from fx_sparsity.lowering.timing import (
    OpCall,
    record_op_calls,
    last_level_cache_bytes,
    time_variants,
    LayerTimer,
)

__all__ = [
    "AUTO_MIN_SPEEDUP",
    "LayerChoice",
    "choose_backend",
    "resolve_layer",
    "BACKENDS",
    "MODEL_BACKENDS",
    "BackendConfig",
    "LayerRequest",
    "parse_backends",
    "convert_modules",
    "lower",
    "LayerLowering",
    "TimedShrinkReport",
    "get_lowering",
    "BACKENDS",
    "MODEL_BACKENDS",
    "LOWERING_META_KEY",
    "OpCall",
    "record_op_calls",
    "last_level_cache_bytes",
    "time_variants",
    "LayerTimer",
]
