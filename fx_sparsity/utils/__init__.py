"""Helpers the recipes share: model inputs, eval mode and token masks (:mod:`.running`), progress bars
(:mod:`.progress`), warnings that point at the user's line (:mod:`.frames`), safetensors files read with every header
checked and written atomically (:mod:`.safetensors_files`)."""

from fx_sparsity.utils.frames import caller_stacklevel
from fx_sparsity.utils.progress import progress
from fx_sparsity.utils.running import as_model_inputs, eval_mode

__all__ = [
    "caller_stacklevel",
    "progress",
    "as_model_inputs",
    "eval_mode",
]
