"""Helpers shared by the recipes: model inputs, eval mode, progress bars, warning frames."""

from fx_sparsity.utils.frames import (
    caller_stacklevel,
)
from fx_sparsity.utils.progress import (
    progress,
)
from fx_sparsity.utils.running import (
    ModelInputs,
    TokenMask,
    as_model_inputs,
    batch_token_mask,
    check_token_mask_source,
    eval_mode,
)

__all__ = [
    "caller_stacklevel",
    "progress",
    "ModelInputs",
    "TokenMask",
    "as_model_inputs",
    "batch_token_mask",
    "check_token_mask_source",
    "eval_mode",
]
