"""The pruned model back in the user's hands: :func:`to_model` returns the user's own model class with the
pruned weights (:mod:`.user_model`)."""

from fx_sparsity.deploy.user_model import to_model

__all__ = [
    "to_model",
]
