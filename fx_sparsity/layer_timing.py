"""Timing one masked layer of a prepared module in its masked, fused and sparse forms.

:func:`record_op_calls` runs the prepared module once on example inputs and keeps
the arguments every masked op was called with; :class:`LayerTimer` replays them
with a given weight form. ``fx_sparsity.lower`` uses both for ``"auto"`` and for
the before/after times of its report.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, fx

from passes import SparseTarget, get_sparse_target, op_arguments
from passes.lower_sparse import SparseFormat, conv_strides, sparse_layer_forward

__all__ = ["OpCall", "record_op_calls", "median_seconds", "LayerTimer"]

OpCall = tuple[Any, tuple, dict]  # (op target, args, kwargs) as the op was called


class _Recorder(fx.Interpreter):
    """Runs the prepared module and keeps the arguments of the given op nodes."""

    def __init__(self, gm: fx.GraphModule, names: set[str]):
        super().__init__(gm)
        self.names = names
        self.calls: dict[str, tuple[Any, tuple, dict]] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.name in self.names:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            self.calls[n.name] = (n.target, args, kwargs)
        return super().run_node(n)


def _with_weight(args: tuple, kwargs: dict, weight: Tensor) -> tuple[tuple, dict]:
    if len(args) > 1:
        return (args[0], weight, *args[2:]), kwargs
    return args, {**kwargs, "weight": weight}


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median seconds per call over ``repeats`` samples; each sample runs ``fn`` enough
    times to last about a millisecond, so that timer resolution and call jitter of tiny
    layers do not decide."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    start = time.perf_counter()
    fn()
    sync()
    calls = max(1, min(1000, int(1e-3 / max(time.perf_counter() - start, 1e-9))))
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def record_op_calls(gm: fx.GraphModule, example_inputs: Any) -> dict[str, list[OpCall]]:
    """Run ``gm`` once (``no_grad``) and return, per masked weight, the calls of the ops reading it."""
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    ops = {n.name: t.tensor_fqn for n in gm.graph.nodes if (t := get_sparse_target(n)) is not None and t.role == "op"}
    recorder = _Recorder(gm, set(ops))
    with torch.no_grad():
        recorder.run(*inputs)
    calls: dict[str, list[OpCall]] = {}
    for name, call in recorder.calls.items():
        calls.setdefault(ops[name], []).append(call)
    return calls


class LayerTimer:
    """One masked weight of the prepared module, with timers for its forms.

    Every timer returns the summed median seconds of the layer's recorded calls,
    or ``None`` when it has none.
    """

    def __init__(self, gm: fx.GraphModule, target: SparseTarget, calls: list[OpCall], repeats: int):
        owner = gm.get_submodule(target.module_fqn)
        self.target = target
        self.weight = getattr(owner, target.tensor_name)
        self.mask = getattr(owner, target.mask_name)
        self.calls, self.repeats = calls, repeats

    def fused(self) -> Tensor:
        """``weight * mask``, detached."""
        return (self.weight * self.mask).detach()

    def _time(self, forward: Callable[[Any, tuple, dict], object]) -> float | None:
        if not self.calls:
            return None
        device = self.weight.device
        with torch.no_grad():
            return sum(median_seconds(lambda c=c: forward(*c), self.repeats, device) for c in self.calls)

    def _time_op(self, weight: Callable[[], Tensor]) -> float | None:
        def forward(op, args, kwargs):
            args, kwargs = _with_weight(args, kwargs, weight())
            return op(*args, **kwargs)
        return self._time(forward)

    def time_masked(self) -> float | None:
        """The prepared layer: mask multiply, then the op."""
        return self._time_op(lambda: self.weight * self.mask)

    def time_dense(self, weight: Tensor) -> float | None:
        """The op on a given (fused) weight."""
        return self._time_op(lambda: weight)

    def time_sparse(self, fmt: SparseFormat, components: tuple[Tensor, ...]) -> float | None:
        """The sparse operator of ``fmt`` on the given components."""

        def forward(op, args, kwargs):
            bound = op_arguments(op, args, kwargs)
            strides = conv_strides(self.target, op, args, kwargs)
            return sparse_layer_forward(fmt.layout, bound["input"], components, bound["bias"], strides)
        return self._time(forward)


