"""fx_sparsity: weight sparsity for PyTorch as explicit mask nodes in torch.fx graphs.

Example::

    >>> import fx_sparsity
    >>> gm = fx_sparsity.prepare(model)              # new GraphModule, model untouched
    >>> fx_sparsity.get_sparsifier(gm).step()        # compute masks
    >>> fx_sparsity.print_sparsity_table(gm)
"""

from passes import CaptureError

from .api import prepare
from .config import SparsityConfig, parse_config
from .masks import nearly_diagonal_mask, weight_norm_mask
from .report import graph_table, print_graph_table, print_sparsity_table, sparsity_table
from .sparsifier import BaseSparsifier, NearlyDiagonalSparsifier, WeightNormSparsifier, get_sparsifier

__all__ = [
    "BaseSparsifier",
    "CaptureError",
    "NearlyDiagonalSparsifier",
    "SparsityConfig",
    "WeightNormSparsifier",
    "get_sparsifier",
    "graph_table",
    "nearly_diagonal_mask",
    "parse_config",
    "prepare",
    "print_graph_table",
    "print_sparsity_table",
    "sparsity_table",
    "weight_norm_mask",
]

__version__ = "0.1.0"
