"""The masks of the magnitude sparsifiers, per layer and global: pure tensor code, no FX."""

from __future__ import annotations

import torch

from fx_sparsity.sparsifier.mask_utils import smallest_k_mask, validate_level

__all__ = ["magnitude_keep", "global_magnitude_keep"]


def _keep_all_but_smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    return ~smallest_k_mask(scores, k)


def magnitude_keep(weight: torch.Tensor, sparsity_level: float) -> torch.Tensor:
    """Keep all but the ``round(level * numel)`` entries of smallest ``|w|`` (``True`` = kept).

    The zeros are exactly those ``torch.nn.utils.prune.l1_unstructured`` picks,
    ties included (see :func:`smallest_k_mask`).
    """
    scores = weight.detach().abs().reshape(-1)
    k = round(validate_level(sparsity_level) * scores.numel())
    return _keep_all_but_smallest(scores, k).reshape(weight.shape)


def global_magnitude_keep(weights: list[torch.Tensor], sparsity_level: float) -> list[torch.Tensor]:
    """One threshold over several weights: keep all but the ``round(level * total)`` smallest ``|w|``.

    The zeros are those of ``torch.nn.utils.prune.global_unstructured`` with
    ``L1Unstructured`` on unpruned weights given in the same order.

    Example::

        >>> [k.tolist() for k in global_magnitude_keep([torch.tensor([1.0, 5.0]), torch.tensor([2.0, 3.0])], 0.5)]
        [[False, True], [False, True]]
    """
    scores = torch.cat([w.detach().abs().reshape(-1) for w in weights])
    k = round(validate_level(sparsity_level) * scores.numel())
    keep = _keep_all_but_smallest(scores, k)
    return [part.reshape(w.shape) for part, w in zip(keep.split([w.numel() for w in weights]), weights)]
