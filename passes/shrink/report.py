"""What shrinking changed: parameters and multiply-accumulates before and after, and what is inexact."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from passes.dependency.analysis import run_recording
from passes.dependency.op_categories import WINDOW_ATTENTION, op_category
from passes.dependency.rules.wrapped import attention_arguments
from passes.matching.weights import is_transposed_linear, op_arguments, op_kind
from passes.shrink.plan import ShrinkPlan

__all__ = ["ShrinkReport", "count_macs", "count_params", "compare_shrunk"]


@dataclass(frozen=True)
class ShrinkReport:
    """What shrinking did: sizes before and after, and where the result is not the masked module.

    Attributes:
        params_before, params_after: parameter counts (each tensor once).
        macs_before, macs_after: multiply-accumulates of the Linear/Conv layers
            and LSTM weight products on the example inputs (all of the batch).
        channels: ``{group index: (size before, size after)}`` of shrunk groups.
        folded: consumers whose bias received removed channels' constants.
        inexact: where the shrunk module's output differs from the input module's.
    """

    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    channels: Mapping[int, tuple[int, int]] = field(default_factory=dict)
    folded: tuple[str, ...] = ()
    inexact: tuple[str, ...] = ()

    @property
    def exact(self) -> bool:
        return not self.inexact


def count_macs(gm: fx.GraphModule, example_inputs: Any) -> int:
    """Multiply-accumulates of the Linear/Conv ops and ``nn.LSTM`` weight products of ``gm`` on ``example_inputs``
    (and of the q/k/v and output projections inside torchvision Swin's wrapped window attention, per token of its
    output: windows padded to the window size are not counted).

    Example::

        >>> count_macs(torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 2))), torch.ones(3, 4))
        24
    """
    total = [0]

    def record(node: fx.Node, result: Any, args: tuple, kwargs: dict) -> None:
        if node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.LSTM:
            total[0] += _lstm_macs(gm.get_submodule(node.target), result[0])
            return
        if op_category(node, gm) == WINDOW_ATTENTION:  # Swin's q/k/v and output projections, inside the call
            named = attention_arguments(args, kwargs)
            tokens = result.numel() // result.shape[-1]
            total[0] += tokens * (named["qkv_weight"].numel() + named["proj_weight"].numel())
            return
        if op_kind(node, gm) is None:
            return
        if node.op == "call_module":
            weight = gm.get_submodule(node.target).weight
        else:
            weight = op_arguments(node.target, args, kwargs)["weight"]
        # Each output entry reads one row of the weight (a grouped conv's rows hold in_channels / groups columns);
        # x @ W reads a column of its [in, out] weight.
        total[0] += result.numel() * (weight.shape[0] if is_transposed_linear(node, gm) else weight[0].numel())

    run_recording(gm, example_inputs, record)
    return total[0]


def _lstm_macs(lstm: nn.LSTM, output: torch.Tensor) -> int:
    """Each time step of each sequence multiplies every weight matrix (gates, recurrence, projection) once."""
    steps = output.numel() // output.shape[-1]
    return steps * sum(w.numel() for name, w in lstm.named_parameters() if name.startswith("weight_"))


def count_params(module: nn.Module) -> int:
    """Parameters of ``module``, each tensor once."""
    return sum(p.numel() for p in module.parameters())


def compare_shrunk(before: fx.GraphModule, after: fx.GraphModule, plan: ShrinkPlan) -> ShrinkReport:
    """The :class:`ShrinkReport` of ``after = remove_channels(copy of before, plan)``: parameters and MACs of both
    on the plan's example inputs, the channels of each group before and after, and the plan's notes.

    Example::

        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        >>> x = torch.randn(2, 4)
        >>> plan = plan_shrink(gm, find_channel_groups(gm, x), {0: [1, 5]}, x)
        >>> report = compare_shrunk(gm, remove_channels(clone_sharing_tensors(gm), plan), plan)
        >>> report.params_before, report.params_after, report.channels
        (58, 44, {0: (8, 6)})
    """
    return ShrinkReport(
        params_before=count_params(before),
        params_after=count_params(after),
        macs_before=count_macs(before, plan.example_inputs),
        macs_after=count_macs(after, plan.example_inputs),
        channels={i: (plan.groups[i].size, plan.groups[i].size - len(c)) for i, c in plan.channels.items()},
        folded=plan.folded,
        inexact=plan.inexact,
    )
