"""``shrink``: step 2 of structured pruning, removing the channels a ``ChannelPruner`` masked.

The recipe: clone the prepared module (sharing tensors), fuse its masks (the
removed channels' producer rows become zero), and hand it with the pruner's
channel groups and the channels its masks remove to :func:`passes.shrink.plan_shrink` and
:func:`passes.shrink.remove_channels`, which make a new, smaller, dense module. The prepared module and the user's
model are not modified.

Attention heads are units of their groups (see :mod:`passes.dependency.rules.attention`):
hand-written q/k/v/o attention, transformers' BERT and Llama captured by
``torch.export`` (a KV head goes with its query group under grouped-query attention),
and ``nn.MultiheadAttention`` captured by ``torch.export`` with ``need_weights=False``
(whole heads cut from each q/k/v third of the fused ``in_proj``; other forms are
refused with the reason). Counting is per group in units, exactly as
:func:`fx_sparsity.structured.importance.count_to_remove` says: ``floor(ratio * units)`` go, so 0.3 of 4 heads removes 1
(Torch-Pruning rounds up and removes 2) and 0.3 of 2 KV heads removes none. The
literal sizes the captured graph holds (the head count of ``view(b, s, 8, 64)``,
repeat_kv's ``expand``/``reshape``, ``nn.MultiheadAttention``'s ``E``, ``H`` and ``B*H``)
are rewritten in the shrunk graph, so no attribute or config needs patching (the
captured module keeps no attention classes or configs to patch). The residual width of
BERT and Llama (their hidden size) reaches the model output and is never pruned, so
output shapes are kept; a torchvision ViT's (``hidden_dim``) does not, and is pruned,
its LayerNorms then reported inexact.
"""

from __future__ import annotations

import copy

from torch import fx

from fx_sparsity.meta import ShrinkRecord, clone_without_sparsifier, get_sparsifier, set_shrink
from fx_sparsity.structured.pruner import ChannelPruner
from passes import masked_targets
from passes.masking import fuse_masks
from passes.shrink import ShrinkReport, compare_shrunk, plan_shrink, remove_channels

__all__ = ["shrink", "shrink_with_dense"]


def shrink_with_dense(gm: fx.GraphModule) -> tuple[fx.GraphModule, fx.GraphModule, ShrinkReport]:
    """``(dense, small, report)``: ``gm`` with its masks fused (a clone sharing its tensors), the shrunk module
    (sharing none), and the :class:`passes.shrink.ShrinkReport` comparing them. :func:`shrink` keeps ``small``;
    ``lower(gm, "shrink")`` times it against ``dense``.

    Raises:
        ValueError: ``gm`` was not prepared, or not by a ``ChannelPruner``, or its masks were squashed.
    """
    pruner = get_sparsifier(gm)
    if not isinstance(pruner, ChannelPruner):
        raise ValueError(
            f"shrink needs a module prepared by ChannelPruner, got one prepared by {type(pruner).__name__}; "
            "use fx_sparsity.ChannelPruner().prepare(model, example_inputs=...)"
        )
    if not masked_targets(gm):
        raise ValueError(
            "shrink(gm) after squash_mask(): gm's masks are gone, and with them the channels the ChannelPruner "
            "removed; call shrink(gm) before squash_mask() (shrink fuses the masks itself), or prepare and step again"
        )
    removed = pruner.removed_channels()
    dense = fuse_masks(clone_without_sparsifier(gm))
    plan = plan_shrink(dense, pruner.channel_groups, removed, pruner.graph_inputs)
    small = remove_channels(copy.deepcopy(dense), plan)
    return dense, small, compare_shrunk(dense, small, plan)


def shrink(gm: fx.GraphModule) -> fx.GraphModule:
    """A new ``GraphModule`` without the channels ``gm``'s ``ChannelPruner`` masked.

    Args:
        gm: a module returned by ``ChannelPruner.prepare`` (after ``step()``).

    Returns:
        The shrunk module: Linear/Conv weights and biases, norms and embeddings
        physically smaller, module attributes updated, output shapes kept; it
        exports with ``torch.export`` and saves like any module, and shares no tensor
        with ``gm``. :func:`fx_sparsity.shrink_report` gives its parameters and
        MACs before and after, and where the result is not exactly the masked module.

    Raises:
        ValueError: ``gm`` was not prepared, or not by a ``ChannelPruner``, or ``squash_mask()`` removed its masks.

    Example::

        >>> pruner = ChannelPruner(sparsity_level=0.5)
        >>> gm = pruner.prepare(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)),
        ...                     example_inputs=torch.randn(2, 8))
        >>> pruner.step()
        >>> shrink(gm).get_submodule("0").out_features
        8
    """
    _, small, report = shrink_with_dense(gm)
    set_shrink(small, ShrinkRecord(report, get_sparsifier(gm).example_inputs))
    return small
