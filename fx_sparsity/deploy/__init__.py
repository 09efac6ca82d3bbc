"""The pruned model back in the user's hands (:mod:`.user_model`): :func:`to_model` returns the user's own model
class with the pruned weights dense, :func:`sparsify_model` with its pruned layers as sparse modules
(:mod:`.modules`: :class:`SparseLinear`, :class:`SparseConv2d`, ...) running the sparse kernels, and
:func:`densify_model` turns those back into plain layers; :func:`save_sparse` / :func:`load_sparse` write and
read compressed checkpoints of them (:mod:`.checkpoint`)."""

from fx_sparsity.deploy.checkpoint import load_sparse, save_sparse
from fx_sparsity.deploy.modules import SparseConv1d, SparseConv2d, SparseConv3d, SparseLinear
from fx_sparsity.deploy.user_model import densify_model, sparsify_model, to_model

__all__ = [
    "to_model",
    "sparsify_model",
    "densify_model",
    "save_sparse",
    "load_sparse",
    "SparseLinear",
    "SparseConv1d",
    "SparseConv2d",
    "SparseConv3d",
]
