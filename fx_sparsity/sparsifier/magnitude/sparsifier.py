"""Magnitude pruning: per layer, or with one threshold across all selected layers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fx_sparsity.sparsifier.base import BaseSparsifier
from fx_sparsity.sparsifier.magnitude.masks import global_magnitude_keep, magnitude_keep
from fx_sparsity.sparsifier.mask_utils import validate_level

__all__ = ["MagnitudeSparsifier", "GlobalMagnitudeSparsifier"]


class MagnitudeSparsifier(BaseSparsifier):
    r"""Zero the ``round(sparsity_level * numel)`` entries of smallest ``|w|`` in each weight.

    Unstructured, per layer; the zeros are those of
    ``torch.nn.utils.prune.l1_unstructured`` (ties included). Scores are taken on
    ``weight * mask``, so pruned entries stay pruned. ``sparsity_level`` can be
    overridden per weight in the config.

    Example::

        >>> sparsifier = MagnitudeSparsifier(sparsity_level=0.75)
        >>> gm = sparsifier.prepare(nn.Sequential(nn.Linear(8, 8)), None)
        >>> sparsifier.step()
        >>> gm.get_buffer("0.weight_mask").float().mean().item()  # bool mask: True = kept
        0.25
    """

    def __init__(self, sparsity_level: float = 0.5) -> None:
        validate_level(sparsity_level)
        super().__init__(defaults={"sparsity_level": sparsity_level})

    def validate_group(self, group: dict[str, Any], weight_shape: tuple[int, ...]) -> None:
        validate_level(group["sparsity_level"], f"sparsity_level of {group['tensor_fqn']}")

    def target_sparsity(self, group: dict[str, Any]) -> float:
        return float(group["sparsity_level"])

    def update_mask(self, module: nn.Module, tensor_name: str, sparsity_level: float, **kwargs: Any) -> None:  # type: ignore[override]
        self.get_mask(module, tensor_name).copy_(magnitude_keep(self.masked_tensor(module, tensor_name), sparsity_level))


class GlobalMagnitudeSparsifier(BaseSparsifier):
    r"""One ``|w|`` threshold across every selected weight, like
    ``torch.nn.utils.prune.global_unstructured`` with ``L1Unstructured``.

    ``round(sparsity_level * total)`` entries are zeroed over all selected
    weights together, so each layer ends up with its own level:
    :meth:`layer_sparsity` reports them (as does ``sparsity_table``). One level
    serves all layers: config entries may select weights but not set
    ``sparsity_level``.

    Example::

        >>> model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        >>> with torch.no_grad():
        ...     _ = model[1].weight.mul_(10)            # layer 1 has the larger weights
        >>> sparsifier = GlobalMagnitudeSparsifier(sparsity_level=0.5)
        >>> gm = sparsifier.prepare(model, None)
        >>> sparsifier.step()
        >>> sparsifier.layer_sparsity()
        {'0.weight': 0.921875, '1.weight': 0.078125}
    """

    def __init__(self, sparsity_level: float = 0.5) -> None:
        validate_level(sparsity_level)
        super().__init__(defaults={"sparsity_level": sparsity_level})

    def validate_group(self, group: dict[str, Any], weight_shape: tuple[int, ...]) -> None:
        validate_level(group["sparsity_level"], f"sparsity_level of {group['tensor_fqn']}")

    def validate_groups(self, groups: list[dict[str, Any]]) -> None:
        levels = {g["tensor_fqn"]: g["sparsity_level"] for g in groups}
        if len(set(levels.values())) > 1:
            raise ValueError(
                f"GlobalMagnitudeSparsifier uses one sparsity_level for all weights, got {levels}; "
                "remove sparsity_level from the config entries"
            )

    def target_sparsity(self, group: dict[str, Any]) -> float:
        """The global level (each layer's own level follows from the threshold)."""
        return float(group["sparsity_level"])

    def update_masks(self) -> None:
        if not self.groups:
            return
        weights = [self.masked_tensor(g["module"], g["tensor_name"]) for g in self.groups]
        keeps = global_magnitude_keep(weights, self.groups[0]["sparsity_level"])
        for group, keep in zip(self.groups, keeps):
            self.get_mask(group["module"], group["tensor_name"]).copy_(keep)

    def update_mask(self, module: nn.Module, tensor_name: str, **kwargs: Any) -> None:
        raise TypeError("GlobalMagnitudeSparsifier's masks depend on every layer at once: call step()")

    def layer_sparsity(self) -> dict[str, float]:
        """Fraction of zeros in each weight's mask, by tensor FQN."""
        masks = {g["tensor_fqn"]: self.get_mask(g["module"], g["tensor_name"]) for g in self.groups}
        return {fqn: 1.0 - int(torch.count_nonzero(m)) / m.numel() for fqn, m in masks.items()}
