"""Wanda: prune by ``|W|`` times the L2 norm of the input channel each weight reads."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fx_sparsity.sparsifier.base import INPUT_NORM_KEY, BaseSparsifier
from fx_sparsity.sparsifier.mask_utils import validate_level
from fx_sparsity.sparsifier.nm.masks import nm_keep, validate_nm
from fx_sparsity.sparsifier.wanda.scores import wanda_scores
from passes import SparseTarget
from passes.calibration import InputNormObserver

__all__ = ["WandaSparsifier"]


class WandaSparsifier(BaseSparsifier):
    r"""Activation-aware pruning (Wanda, Sun et al. 2023): score ``|W_ij| * ||X_j||_2``.

    ``||X_j||_2`` is the norm of input channel ``j`` over every calibration token
    (every position, for a conv), recorded by :func:`fx_sparsity.calibrate`. As in
    the paper, weights compete within their output row: each row loses the
    ``round(sparsity_level * row_size)`` lowest scores. With ``nm=(n, m)`` the
    scores pick ``n`` of every ``m`` consecutive weights instead (2:4 Wanda).
    Conv weights are viewed as ``[out, in * kernel]``; each entry uses the norm
    of the input channel it reads (grouped and depthwise convs included).

    Args:
        sparsity_level: fraction of each row to prune (unstructured).
        nm: ``(n, m)`` for N:M; then ``sparsity_level`` is not used.

    Example::

        >>> sparsifier = WandaSparsifier(sparsity_level=0.5)
        >>> gm = fx_sparsity.prepare(model, sparsifier=sparsifier)
        >>> _ = fx_sparsity.calibrate(gm, batches, progress_bar=False)  # observers in, batches run, observers out
        >>> sparsifier.step()
    """

    def __init__(self, sparsity_level: float = 0.5, nm: tuple[int, int] | None = None) -> None:
        validate_level(sparsity_level)
        if nm is not None:
            validate_nm(*_pair(nm))
        super().__init__(defaults={"sparsity_level": sparsity_level, "nm": nm})

    def validate_group(self, group: dict[str, Any], weight_shape: tuple[int, ...]) -> None:
        validate_level(group["sparsity_level"], f"sparsity_level of {group['tensor_fqn']}")
        if group["nm"] is not None:
            validate_nm(*_pair(group["nm"]))

    # The calibration protocol of fx_sparsity.calibrate: input-channel norms.
    calibration_key = INPUT_NORM_KEY

    def calibration_observer(self, group: dict[str, Any], target: SparseTarget, ops: list[dict[str, Any]]) -> nn.Module:
        """An :class:`passes.calibration.InputNormObserver` in front of the group's ops."""
        return InputNormObserver(len(target.weight_shape) - 2)

    def calibration_statistic(self, group: dict[str, Any], observer: nn.Module) -> torch.Tensor:
        """The L2 norm of each input channel (float32)."""
        return observer.norm()

    def target_sparsity(self, group: dict[str, Any]) -> float:
        if group["nm"] is not None:
            n, m = _pair(group["nm"])
            return 1.0 - n / m
        return float(group["sparsity_level"])

    def scores(self, module: nn.Module, tensor_name: str, tensor_fqn: str) -> torch.Tensor:
        """``|weight * mask| * input_norm`` in the weight's ``[out, -1]`` view."""
        norm = self.state[tensor_fqn].get(INPUT_NORM_KEY)
        if norm is None:
            raise RuntimeError(
                f"no input norms for {tensor_fqn}: run fx_sparsity.calibrate(gm, batches) before step()"
            )
        return wanda_scores(self.masked_tensor(module, tensor_name), norm, tensor_fqn)

    def update_mask(  # type: ignore[override]
        self, module: nn.Module, tensor_name: str, tensor_fqn: str, sparsity_level: float, nm: Any, **kwargs: Any
    ) -> None:
        weight = self.get_mask(module, tensor_name)  # shape of the [out, in] view the scores have
        scores = self.scores(module, tensor_name, tensor_fqn)
        if nm is not None:
            keep = nm_keep(weight, *_pair(nm), scores=scores)
        else:
            k = round(sparsity_level * scores.shape[1])
            keep = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
            if k:
                keep.scatter_(1, torch.topk(scores, k, dim=1, largest=False, sorted=False).indices, False)
        self.get_mask(module, tensor_name).copy_(keep.reshape(weight.shape))


def _pair(nm: Any) -> tuple[Any, Any]:
    if not isinstance(nm, (tuple, list)) or len(nm) != 2:
        raise TypeError(f"nm must be a pair (n, m) like (2, 4), got {nm!r}")
    return nm[0], nm[1]
