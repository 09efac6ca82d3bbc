"""The pruned model back in the user's hands."""

from fx_sparsity.deploy.user_model import (
    SOURCE_MODEL_META_KEY,
    SourceModel,
    to_model,
)

__all__ = [
    "SOURCE_MODEL_META_KEY",
    "SourceModel",
    "to_model",
]
