"""Sparsity-level schedulers with torch.ao.pruning's semantics (``LambdaSL``, ``CubicSL``).

A scheduler owns the ``sparsity_level`` of every group of a sparsifier: it
records the levels the groups start with as the targets (``base_sl``), sets the
level for epoch 0 at construction and, on each :meth:`BaseScheduler.step`, for
the next epoch, then re-enables mask updates. Call ``sparsifier.step()`` (which
computes masks at the current level) before ``scheduler.step()``, as with
learning-rate schedulers.

Differences from torch.ao.pruning: the sparsifier's ``step`` is not
monkey-patched (the order check reads the sparsifier's own step counts), and
bad arguments raise ``ValueError`` at construction.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

from fx_sparsity.sparsifier.base import BaseSparsifier

__all__ = ["BaseScheduler", "LambdaSL", "CubicSL"]


def _check_sparsifier(sparsifier: object) -> None:
    if not isinstance(sparsifier, BaseSparsifier):
        raise TypeError(f"sparsifier must be an fx_sparsity BaseSparsifier, got {type(sparsifier).__name__}")


class BaseScheduler:
    """Base of sparsity schedulers; subclasses implement :meth:`get_sl`.

    Args:
        sparsifier: a prepared sparsifier whose groups have a ``sparsity_level``.
        last_epoch: the index of the last epoch (``-1`` to start afresh).
    """

    def __init__(self, sparsifier: BaseSparsifier, last_epoch: int = -1) -> None:
        _check_sparsifier(sparsifier)
        if not sparsifier.records:
            raise ValueError("the sparsifier has no groups: prepare a model with it before making a scheduler")
        missing = [r.tensor_fqn for r in sparsifier.records if "sparsity_level" not in r.args]
        if missing:
            raise ValueError(
                f"{type(sparsifier).__name__} groups have no sparsity_level to schedule ({missing[:3]}); "
                "use a sparsifier with a sparsity_level argument"
            )
        self.sparsifier = sparsifier
        self.base_sl = [record.args["sparsity_level"] for record in sparsifier.records]
        self.last_epoch = last_epoch
        self._last_sl: list[float] = []
        self._step_count = 0
        self.step()

    def get_sl(self) -> list[float]:
        """The sparsity level of each group at epoch ``self.last_epoch``."""
        raise NotImplementedError

    def get_last_sl(self) -> list[float]:
        """The levels the last :meth:`step` set."""
        return self._last_sl

    def _broadcast(self, value: Any, name: str) -> list[Any]:
        n = len(self.sparsifier.records)
        if isinstance(value, (list, tuple)):
            if len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries but the sparsifier has {n} groups")
            return list(value)
        return [value] * n

    def step(self) -> None:
        """Advance one epoch: set every group's ``sparsity_level`` and enable mask updates."""
        if self._step_count == 1 and not self.sparsifier.steps:
            warnings.warn(
                "scheduler.step() was called before sparsifier.step(): call sparsifier.step() first, "
                "as with learning-rate schedulers",
                UserWarning,
                stacklevel=2,
            )
        self._step_count += 1
        self.last_epoch += 1
        levels = self.get_sl()
        records = self.sparsifier.records
        for record, level in zip(records, levels):  # every level is checked before any is set
            self.sparsifier.validate_group(record.with_args(sparsity_level=level).to_dict(), record.weight_shape)
        for record, level in zip(records, levels):
            self.sparsifier.update_group(record.tensor_fqn, sparsity_level=level)
        self._last_sl = [record.args["sparsity_level"] for record in self.sparsifier.records]
        self.sparsifier.enable_mask_update = True

    def state_dict(self) -> dict[str, Any]:
        """Everything but the sparsifier (callables of ``LambdaSL`` included, as in torch.ao.pruning)."""
        return {key: value for key, value in self.__dict__.items() if key != "sparsifier"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.__dict__.update(state_dict)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sparsifier={type(self.sparsifier).__name__}, base_sl={self.base_sl})"


class LambdaSL(BaseScheduler):
    """Level of group ``i`` at epoch ``t``: ``base_sl[i] * sl_lambda(t)`` (one callable or one per group).

    Example::

        >>> sparsifier = WeightNormSparsifier(sparsity_level=0.8, sparse_block_shape=(1, 1))
        >>> gm = prepare(nn.Sequential(nn.Linear(16, 16)), sparsifier=sparsifier)
        >>> scheduler = LambdaSL(sparsifier, lambda epoch: min(1.0, epoch / 10))
        >>> for epoch in range(20):
        ...     sparsifier.step()                       # after each epoch's training
        ...     scheduler.step()
        >>> gm.get_buffer("0.weight_mask").float().mean().item()  # bool mask: True = kept
        0.19921875
    """

    def __init__(
        self,
        sparsifier: BaseSparsifier,
        sl_lambda: Callable[[int], float] | Sequence[Callable[[int], float]],
        last_epoch: int = -1,
    ) -> None:
        _check_sparsifier(sparsifier)
        n = len(sparsifier.records)
        lambdas = list(sl_lambda) if isinstance(sl_lambda, (list, tuple)) else [sl_lambda] * n
        if len(lambdas) != n:
            raise ValueError(f"expected {n} sl_lambda callables, got {len(lambdas)}")
        if not all(callable(f) for f in lambdas):
            raise TypeError("sl_lambda must be a callable epoch -> factor, or a list of them")
        self.sl_lambdas = lambdas
        super().__init__(sparsifier, last_epoch)

    def get_sl(self) -> list[float]:
        return [base * fn(self.last_epoch) for fn, base in zip(self.sl_lambdas, self.base_sl)]


class CubicSL(BaseScheduler):
    r"""Cubic ramp from ``init_sl`` to each group's target level (Zhu & Gupta, 2017).

    .. math:: s_t = s_f + (s_0 - s_f) \left(1 - \frac{t - t_0}{n \Delta t}\right)^3,
       clamped to [s_0, s_f]

    Args:
        init_sl: starting level :math:`s_0` (one value, or one per group).
        init_t: epoch :math:`t_0` at which pruning starts.
        delta_t: pruning frequency :math:`\Delta t` (> 0).
        total_t: number of pruning steps :math:`n` (> 0).
        initially_zero: level 0 before ``init_t`` (else ``init_sl``).
    """

    def __init__(
        self,
        sparsifier: BaseSparsifier,
        init_sl: float | Sequence[float] = 0.0,
        init_t: int | Sequence[int] = 0,
        delta_t: int | Sequence[int] = 10,
        total_t: int | Sequence[int] = 100,
        initially_zero: bool | Sequence[bool] = False,
        last_epoch: int = -1,
    ) -> None:
        _check_sparsifier(sparsifier)
        self.sparsifier = sparsifier
        self.init_sl = self._broadcast(init_sl, "init_sl")
        self.init_t = self._broadcast(init_t, "init_t")
        self.delta_t = self._broadcast(delta_t, "delta_t")
        self.total_t = self._broadcast(total_t, "total_t")
        self.initially_zero = self._broadcast(initially_zero, "initially_zero")
        for name in ("delta_t", "total_t"):
            bad = [v for v in getattr(self, name) if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0]
            if bad:
                raise ValueError(f"{name} must be positive, got {bad[0]!r}")
        super().__init__(sparsifier, last_epoch)

    @staticmethod
    def sparsity_compute_fn(
        s_0: float, s_f: float, t: int, t_0: int, dt: float, n: float, initially_zero: bool = False
    ) -> float:
        """The level at epoch ``t`` (torch.ao.pruning's formula, clamped the same way)."""
        if initially_zero and t < t_0:
            return 0
        s_t = s_f + (s_0 - s_f) * (1.0 - (t - t_0) / (dt * n)) ** 3
        return max(s_0, min(s_f, s_t))

    def get_sl(self) -> list[float]:
        return [
            self.sparsity_compute_fn(s_0, s_f, self.last_epoch, t_0, dt, n, zero)
            for s_0, s_f, t_0, dt, n, zero in zip(
                self.init_sl, self.base_sl, self.init_t, self.delta_t, self.total_t, self.initially_zero
            )
        ]
