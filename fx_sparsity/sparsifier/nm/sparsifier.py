"""N:M sparsity: at most N nonzeros in every M consecutive weights along the input dimension."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn

from fx_sparsity.sparsifier.base import BaseSparsifier
from fx_sparsity.sparsifier.group import WeightGroup
from fx_sparsity.sparsifier.nm.masks import nm_keep, validate_nm
from fx_sparsity.utils.frames import caller_stacklevel
from passes.lowering import native_ops

__all__ = ["NMSparsifier"]


class NMSparsifier(BaseSparsifier):
    r"""Keep the ``n`` largest ``|w|`` of every ``m`` consecutive entries along the input dimension.

    A Conv weight is viewed as ``[out_channels, in_channels * kernel]``, so for a
    1x1 conv the groups run over input channels. A shorter group at the end of a
    row keeps its ``n`` largest. 2:4 (the default) is what the ``semi_structured``
    lowering runs on CUDA; on full groups the masks equal torch.ao.pruning's
    ``WeightNormSparsifier(sparsity_level=1, sparse_block_shape=(1, m),
    zeros_per_block=m - n, norm=1)``. ``n`` and ``m`` can be overridden per weight.

    A warning says when 2:4 masks cannot run fast where the model is (no CUDA
    GPU of compute capability 8.0+): ``lower`` will fuse them there.

    Example::

        >>> sparsifier = NMSparsifier(2, 4)
        >>> gm = sparsifier.prepare(nn.Sequential(nn.Linear(8, 8)), None)
        >>> sparsifier.step()
        >>> gm.get_buffer("0.weight_mask").view(8, 2, 4).sum(-1).unique().tolist()
        [2.0]
    """

    def __init__(self, n: int = 2, m: int = 4) -> None:
        validate_nm(n, m)
        super().__init__(defaults={"n": n, "m": m})

    def validate_group(self, group: dict[str, Any], weight_shape: tuple[int, ...]) -> None:
        validate_nm(group["n"], group["m"])

    def target_sparsity(self, group: dict[str, Any]) -> float:
        return 1.0 - group["n"] / group["m"]

    def attach(self, gm: fx.GraphModule, groups: Sequence[WeightGroup], initial_masks: Mapping[str, torch.Tensor]) -> None:
        super().attach(gm, groups, initial_masks)
        two_four = [g for g in groups if (g.args["n"], g.args["m"]) == (2, 4)]
        if two_four and not _fast_two_four(getattr(gm.get_submodule(two_four[0].module_fqn), two_four[0].tensor_name)):
            warnings.warn(
                "2:4 masks run fast only through lower(gm, 'nm') with fx_sparsity's C++ CPU kernels (not built "
                "here: see the warning about them, or FX_SPARSITY_NO_NATIVE) or lower(gm, 'semi_structured') on "
                "a CUDA GPU of compute capability 8.0+ with fp16/bf16 weights; here lower() will fuse them into "
                "dense weights",
                UserWarning,
                stacklevel=caller_stacklevel(),
            )

    def update_mask(self, module: nn.Module, tensor_name: str, n: int, m: int, **kwargs: Any) -> None:  # type: ignore[override]
        self.get_mask(module, tensor_name).copy_(nm_keep(self.masked_tensor(module, tensor_name), n, m))


def _fast_two_four(weight: torch.Tensor) -> bool:
    if weight.is_cuda:
        return torch.cuda.get_device_capability(weight.device) >= (8, 0)
    if native_ops() is not None:  # the nm kernel; lower_sparse refuses the layouts it cannot run
        return True
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)
