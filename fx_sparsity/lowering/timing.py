"""Timing one masked layer of a prepared module in its masked, fused and sparse forms.

:func:`record_op_calls` runs the prepared module once (eval mode, ``no_grad``) on
example inputs and keeps the arguments every masked op was called with;
:class:`LayerTimer` replays them with a given weight form. ``fx_sparsity.lower``
uses both for ``"auto"`` and for the before/after times of its report.

Two regimes, chosen by the caller from the model's weight bytes:

* warm: a model whose weights fit in the last-level cache reads them from the
  cache; each sample runs a variant enough times to last about a millisecond;
* streaming (``cold=True``): a model whose weights exceed the last-level cache
  reads each layer's weights from memory. Each variant rotates through copies of
  its tensors that together exceed twice the last-level cache (at most
  :data:`MAX_COPIES`), called back to back as the model runs its layers, so every
  call reads from memory. (A cache flush before a lone call, tried first, also
  charged every variant a single call's fixed costs, which hid most of the byte
  savings of layers of a few MB.)

Variants of one layer are timed in interleaved rounds, each in a new random
order, so that a burst of load on a shared machine slows every variant alike
instead of deciding the comparison. Reports give each variant's median round;
``auto`` compares the fastest rounds (see :func:`fx_sparsity.lowering.autotune.resolve_layer`).
"""

from __future__ import annotations

import functools
import glob
import itertools
import math
import random
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, fx

from fx_sparsity.utils.running import eval_mode, placeholder_values
from passes import SparseTarget, get_sparse_target
from passes.lowering import SparseFormat, conv_strides, sparse_layer_forward
from passes.matching import op_arguments, weight_position

__all__ = ["OpCall", "record_op_calls", "last_level_cache_bytes", "time_samples", "time_variants", "LayerTimer"]

OpCall = tuple[Any, tuple, dict]  # (op target, args, kwargs) as the op was called

_DEFAULT_LLC_BYTES = 32 << 20
# Most copies of a layer's tensors the streaming regime rotates through (a tiny layer would need thousands).
MAX_COPIES = 64


class _Recorder(fx.Interpreter):
    """Runs the prepared module and keeps the arguments of the given op nodes."""

    def __init__(self, gm: fx.GraphModule, names: set[str]):
        super().__init__(gm)
        self.names = names
        self.calls: dict[str, list[OpCall]] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.name in self.names:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            # A method call (x.matmul(W)) is recorded as the function it calls, so that it can be replayed.
            op = getattr(torch.Tensor, n.target) if n.op == "call_method" else n.target
            self.calls.setdefault(n.name, []).append((op, args, kwargs))
        return super().run_node(n)


@functools.cache
def last_level_cache_bytes() -> int:
    """Size of this CPU's last-level cache (from sysfs); 32 MiB where it cannot be read."""
    best_level, best_size = 0, 0
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(f"{index}/level") as f:
                level = int(f.read())
            with open(f"{index}/size") as f:
                text = f.read().strip()
        except (OSError, ValueError):
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        size = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
        if level >= best_level:
            best_level, best_size = level, size
    return best_size or _DEFAULT_LLC_BYTES


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variants(
    variants: Mapping[str, Callable[[], object]], repeats: int, device: torch.device, *, calls: int | None = None
) -> dict[str, float]:
    """Median seconds per call of each variant, timed in ``repeats`` interleaved rounds of random order
    (:func:`time_samples`)."""
    return {name: statistics.median(s) for name, s in time_samples(variants, repeats, device, calls=calls).items()}


def time_samples(
    variants: Mapping[str, Callable[[], object]], repeats: int, device: torch.device, *, calls: int | None = None
) -> dict[str, list[float]]:
    """Seconds per call of each variant in each of ``repeats`` interleaved rounds, each round in a new random order.

    Args:
        variants: name -> a call to time.
        repeats: rounds; each round takes one sample of every variant.
        device: where the calls run (CUDA calls are synchronised).
        calls: calls per sample (a variant rotating through that many copies of its tensors
            reads each from memory); ``None``: enough calls to last about a millisecond.
    """
    per_sample = {}
    for name, fn in variants.items():  # warm-up, and the calls per sample
        fn()
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        per_sample[name] = calls or max(1, min(1000, int(1e-3 / max(time.perf_counter() - start, 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    rng = random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            fn, n = variants[name], per_sample[name]
            _sync(device)
            start = time.perf_counter()
            for _ in range(n):
                fn()
            _sync(device)
            samples[name].append((time.perf_counter() - start) / n)
    return samples


def record_op_calls(gm: fx.GraphModule, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, list[OpCall]]:
    """Run ``gm(*args, **kwargs)`` once (eval mode, ``no_grad``) and return, per masked weight,
    the calls of the ops reading it."""
    ops = {n.name: t.tensor_fqn for n in gm.graph.nodes if (t := get_sparse_target(n)) is not None and t.role == "op"}
    recorder = _Recorder(gm, set(ops))
    with torch.no_grad(), eval_mode(gm):
        recorder.run(*placeholder_values(gm, args, kwargs))
    calls: dict[str, list[OpCall]] = {}
    for name, node_calls in recorder.calls.items():
        calls.setdefault(ops[name], []).extend(node_calls)
    return calls


def _with_weight(op: Any, args: tuple, kwargs: dict, weight: Tensor) -> tuple[tuple, dict]:
    position = weight_position(op, args)
    if isinstance(position, int):
        return (*args[:position], weight, *args[position + 1 :]), kwargs
    return args, {**kwargs, position: weight}


class LayerTimer:
    """One masked weight of the prepared module, with the calls its forms are timed on.

    Each ``*_fn`` method returns a callable running every recorded call of the
    layer once in that form (``None`` when the layer was never called); time
    several together with :meth:`time`.
    """

    def __init__(self, gm: fx.GraphModule, target: SparseTarget, calls: list[OpCall], repeats: int, cold: bool):
        owner = gm.get_submodule(target.module_fqn)
        self.target = target
        self.weight = getattr(owner, target.tensor_name)
        self.mask = getattr(owner, target.mask_name)
        self.calls, self.repeats, self.cold = calls, repeats, cold
        # Streaming regime: enough copies of the layer's tensors to exceed twice the last-level cache (at most
        # MAX_COPIES), called in turn, so each call reads memory, back to back as the model runs its layers.
        weight_bytes = self.weight.numel() * self.weight.element_size()
        self.copies = min(MAX_COPIES, max(1, math.ceil(2 * last_level_cache_bytes() / weight_bytes))) if cold else 1

    def fused(self) -> Tensor:
        """``weight * mask``, detached."""
        return (self.weight * self.mask).detach()

    def _rotation(self, tensors: tuple[Tensor, ...]) -> Callable[[], tuple[Tensor, ...]]:
        """A function handing out ``tensors``, or in the streaming regime one of several copies of them in turn,
        so that every call reads its tensors from memory as a layer of a large model does."""
        if not self.cold:
            return lambda: tensors
        copies = [tensors] + [tuple(t.clone() for t in tensors) for _ in range(self.copies - 1)]
        rotation = itertools.cycle(copies)
        return lambda: next(rotation)

    def _op_fn(self, tensors: tuple[Tensor, ...], weight: Callable[..., Tensor]) -> Callable[[], None] | None:
        if not self.calls:
            return None
        current = self._rotation(tensors)

        def run() -> None:
            w = weight(*current())
            for op, args, kwargs in self.calls:
                args, kwargs = _with_weight(op, args, kwargs, w)
                op(*args, **kwargs)
        return run

    def masked_fn(self) -> Callable[[], None] | None:
        """The prepared layer: mask multiply, then the op."""
        return self._op_fn((self.weight.detach(), self.mask), lambda weight, mask: weight * mask)

    def dense_fn(self, weight: Tensor) -> Callable[[], None] | None:
        """The op on a given (fused) weight."""
        return self._op_fn((weight,), lambda w: w)

    def sparse_fn(self, fmt: SparseFormat, components: tuple[Tensor, ...]) -> Callable[[], None] | None:
        """The sparse operator of ``fmt`` on the given components."""
        if not self.calls:
            return None
        prepared = []
        for op, args, kwargs in self.calls:
            bound = op_arguments(op, args, kwargs)
            prepared.append((bound["input"], bound["bias"], conv_strides(self.target, op, args, kwargs)))
        current = self._rotation(tuple(components))

        def run() -> None:
            parts = current()
            for x, bias, strides in prepared:
                sparse_layer_forward(fmt.layout, x, parts, bias, strides)
        return run

    def time(self, variants: Mapping[str, Callable[[], None] | None]) -> dict[str, float | None]:
        """Median seconds of each variant (``None`` for a layer that was never called)."""
        return {k: None if s is None else statistics.median(s) for k, s in self.samples(variants).items()}

    def samples(self, variants: Mapping[str, Callable[[], None] | None]) -> dict[str, list[float] | None]:
        """Seconds of each variant in each round (``None`` for a layer that was never called)."""
        runnable = {k: v for k, v in variants.items() if v is not None}
        if not runnable:
            return dict.fromkeys(variants)
        with torch.no_grad():
            samples = time_samples(runnable, self.repeats, self.weight.device, calls=self.copies if self.cold else None)
        return {k: samples.get(k) for k in variants}
