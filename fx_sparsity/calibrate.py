"""``calibrate``: record the input statistics each sparsifier needs of the masked ops.

The sparsifier decides what it observes, through three optional members (the
calibration protocol; a sparsifier without them gets input-channel norms, as
:class:`~fx_sparsity.WandaSparsifier` uses):

* ``calibration_observer(group, target, ops) -> nn.Module``: the observer put in
  front of the ops reading the group's weight (a :data:`passes.ObserverFactory`
  with the group in front);
* ``calibration_statistic(group, observer) -> Any``: what to keep of the
  finished observer (it may raise when the observer saw nothing);
* ``calibration_key``: where the statistic goes, ``sparsifier.state[tensor_fqn][key]``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn

from passes import (
    InputNormObserver,
    SparseTarget,
    input_norm_observer,
    insert_input_observers,
    remove_input_observers,
)

from .progress import progress
from .running import as_model_inputs, eval_mode
from .sparsifier import BaseSparsifier, get_sparsifier
from .sparsifier.wanda import INPUT_NORM_KEY

__all__ = ["calibrate", "calibration_key", "calibration_observer", "calibration_statistic"]


def calibration_observer(
    sparsifier: BaseSparsifier, group: dict[str, Any], target: SparseTarget, ops: list[dict[str, Any]]
) -> nn.Module:
    """The observer ``sparsifier`` wants for ``group``: its ``calibration_observer``, else input norms."""
    method = getattr(sparsifier, "calibration_observer", None)
    return method(group, target, ops) if method is not None else input_norm_observer(target, ops)


def calibration_statistic(sparsifier: BaseSparsifier, group: dict[str, Any], observer: nn.Module) -> Any:
    """What ``sparsifier`` keeps of ``group``'s finished observer: its ``calibration_statistic``, else the norms."""
    method = getattr(sparsifier, "calibration_statistic", None)
    if method is not None:
        return method(group, observer)
    assert isinstance(observer, InputNormObserver), type(observer)
    return observer.norm()


def calibration_key(sparsifier: BaseSparsifier) -> str:
    """The state key under which ``calibrate`` stores ``sparsifier``'s statistics."""
    return getattr(sparsifier, "calibration_key", INPUT_NORM_KEY)


def calibrate(gm: fx.GraphModule, batches: Iterable[Any], *, progress_bar: bool = True) -> dict[str, Any]:
    """Run ``batches`` through ``gm`` with the sparsifier's observers in front of every masked op.

    Observer nodes are inserted, every batch is run under ``no_grad`` in eval mode
    (``gm`` shares its buffers with the user's model: a training-mode pass would
    move its BatchNorm statistics), and the observers are removed again, leaving
    ``gm``'s graph and modes as they were. The
    sparsifier chooses the observers and what is kept of them (see the module
    docstring): input-channel L2 norms for :class:`~fx_sparsity.WandaSparsifier`
    and sparsifiers that do not say, input Hessians ``X^T X`` for
    :class:`~fx_sparsity.SparseGPTSparsifier`. Each weight's statistic is stored
    in ``get_sparsifier(gm).state[tensor_fqn][key]`` (``"input_norm"``,
    ``"input_hessian"``) once every batch has run, and returned.

    Args:
        gm: a module returned by ``prepare`` (masks in place).
        batches: an iterable of inputs, each a tensor, a tuple/list of positional
            inputs or a dict of keyword inputs (as a tokenizer returns them).
        progress_bar: show a progress bar on stderr.

    Returns:
        tensor FQN -> its statistic (input-channel norms for Wanda).

    Raises:
        TypeError: ``batches`` is not an iterable, or a batch is none of the forms above
            (checked before that batch runs).
        ValueError: ``batches`` is empty, or a sparsifier refuses a weight's ops.
        RuntimeError: an op never ran on the batches; the state is unchanged then.

    Example::

        >>> model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
        >>> gm = fx_sparsity.prepare(model, sparsifier=fx_sparsity.WandaSparsifier(0.5))
        >>> norms = fx_sparsity.calibrate(gm, [torch.randn(8, 64) for _ in range(4)], progress_bar=False)
        >>> sorted(norms), tuple(norms["0.weight"].shape)
        (['0.weight', '2.weight'], (64,))
    """
    sparsifier = get_sparsifier(gm)
    if batches is None or isinstance(batches, (torch.Tensor, str, bytes)) or not isinstance(batches, Iterable):
        raise TypeError(
            "batches must be an iterable of model inputs, e.g. a list of tensors or a DataLoader; "
            f"got {type(batches).__name__}" + (" (wrap one tensor in a list: [x])" if isinstance(batches, torch.Tensor) else "")
        )
    groups = {g["tensor_fqn"]: g for g in sparsifier.groups}
    factories = {fqn: functools.partial(calibration_observer, sparsifier, g) for fqn, g in groups.items()}
    observers = insert_input_observers(gm, factories)
    total = len(batches) if hasattr(batches, "__len__") else None
    seen = 0
    try:
        with torch.no_grad(), eval_mode(gm):
            for batch in progress(batches, progress_bar, "calibrate", total):
                args, kwargs = as_model_inputs(batch, f"batch {seen} of batches")
                gm(*args, **kwargs)
                seen += 1
    finally:
        remove_input_observers(gm)
    if not seen:
        raise ValueError("calibrate needs at least one batch; batches was empty")
    statistics = {fqn: calibration_statistic(sparsifier, groups[fqn], o) for fqn, o in observers.items()}
    key = calibration_key(sparsifier)
    for fqn, statistic in statistics.items():
        sparsifier.state[fqn][key] = statistic
    return statistics
