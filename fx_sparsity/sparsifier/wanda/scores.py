"""Wanda's score, ``|W_ij| * ||X_j||_2``: pure tensor code, no FX."""

from __future__ import annotations

import torch

__all__ = ["wanda_scores"]


def wanda_scores(weight: torch.Tensor, norm: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """``|weight| * ||X_j||`` in the weight's ``[out, -1]`` view, ``norm`` holding one value per input channel.

    A conv entry uses the norm of the input channel it reads (grouped convs included).

    Example::

        >>> wanda_scores(torch.tensor([[1.0, -2.0]]), torch.tensor([3.0, 1.0])).tolist()
        [[3.0, 2.0]]
    """
    out, cin_per_group = weight.shape[0], weight.shape[1]
    if norm.numel() % cin_per_group:
        raise RuntimeError(f"{name}: {norm.numel()} input channels do not fit weight {tuple(weight.shape)}")
    groups = norm.numel() // cin_per_group
    # Output o of a grouped conv reads input channels of group o // (out // groups).
    per_out = norm.to(weight.device, weight.dtype).view(groups, cin_per_group).repeat_interleave(out // groups, 0)
    kernel = weight[0, 0].numel() if weight.dim() > 2 else 1
    return (weight.abs().reshape(out, cin_per_group, kernel) * per_out.unsqueeze(-1)).reshape(out, -1)
