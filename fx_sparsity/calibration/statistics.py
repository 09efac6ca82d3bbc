"""``calibrate``: record the input statistics each sparsifier needs of the masked ops.

The sparsifier decides what it observes, through three optional members (the
calibration protocol; a sparsifier without them gets input-channel norms, as
:class:`~fx_sparsity.WandaSparsifier` uses):

* ``calibration_observer(group, target, ops) -> nn.Module``: the observer put in
  front of the ops reading the group's weight (a :data:`passes.calibration.ObserverFactory`
  with the group in front);
* ``calibration_statistic(group, observer) -> Any``: what to keep of the
  finished observer (it may raise when the observer saw nothing);
* ``calibration_key``: where the statistic goes, ``sparsifier.state[tensor_fqn][key]``.

Padding: positions a batch's token mask marks as padding do not enter the
statistics (the observers drop those rows, see :class:`passes.calibration.InputObserver`).
Processes: under ``torch.distributed`` the observers' sums are all-reduced
before the statistics are read (:func:`passes.calibration.all_reduce_observers`).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import fx, nn

from fx_sparsity.meta import get_sparsifier
from fx_sparsity.sparsifier.base import INPUT_NORM_KEY, BaseSparsifier
from fx_sparsity.utils.progress import progress
from fx_sparsity.utils.running import (
    TokenMask,
    batch_token_mask,
    check_batches,
    check_token_mask_source,
    eval_mode,
    fit_inputs,
)
from passes import SparseTarget
from passes.calibration import (
    InputNormObserver,
    all_reduce_observers,
    input_norm_observer,
    insert_input_observers,
    remove_input_observers,
)
from passes.masking import LSTM_KIND

__all__ = [
    "calibrate",
    "calibration_key",
    "calibration_observer",
    "calibration_statistic",
    "apply_token_mask",
    "process_group",
    "run_observed",
]


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


def calibrate(
    gm: fx.GraphModule,
    batches: Iterable[Any],
    *,
    token_mask: TokenMask = "attention_mask",
    distributed: Any = None,
    progress_bar: bool = True,
) -> dict[str, Any]:
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

    **Padding.** A batch's token mask (``[batch, seq]``, 1 = a real token, 0 =
    padding; by default a dict batch's ``"attention_mask"``, as a tokenizer
    returns it) keeps padded positions out of every statistic: input norms,
    Hessians, and so the OWL outlier ratios computed from them. The rows of a
    linear's input map to tokens when the input is ``[batch, seq, ..., features]``
    (batch-first: its first two dims are the mask's shape) or
    ``[batch * seq, features]``. Other inputs (a conv's, a linear's after pooling,
    like BERT's pooler reading the first token) are observed at every position,
    and a ``UserWarning`` names those weights and shapes.

    **Processes.** When a ``torch.distributed`` process group is initialized
    (more than one process), every process calls ``calibrate`` on its own share
    of the batches, and the un-normalized sums (squares per channel, ``X^T X``,
    row counts) are all-reduced before the statistics are read: every process
    gets those of one process running all the batches, so ``step()`` gives the
    same masks (and SparseGPT weights, up to float summation order) everywhere.
    A process whose batches fail tells the others, which raise too.

    The masked parameters of an ``nn.LSTM`` (masked by ``ChannelPruner``) have no input of
    their own and are not observed.

    Args:
        gm: a module returned by ``prepare`` (masks in place).
        batches: an iterable of inputs, each a tensor, a tuple/list of positional
            inputs or a dict of keyword inputs (as a tokenizer returns them).
        token_mask: where a batch's token mask comes from: a key of dict batches
            (default ``"attention_mask"``; batches of other forms, or without the
            key, have none), a callable ``batch -> [batch, seq] tensor or None``
            (e.g. ``lambda b: b[1]`` for ``(input_ids, attention_mask)`` tuples),
            or ``None`` to observe every position.
        distributed: ``None`` (default): all-reduce over the default process group
            when one is initialized with more than one process; ``False``: never
            (each process keeps its own statistics); ``True``: require an
            initialized default group; or a ``ProcessGroup`` to reduce over.
        progress_bar: show a progress bar on stderr.

    Returns:
        tensor FQN -> its statistic (input-channel norms for Wanda).

    Raises:
        TypeError: ``batches`` is not an iterable, or a batch is none of the forms above
            (checked before that batch runs); a token mask is not a tensor; an
            observer of the sparsifier cannot apply token masks or be all-reduced.
        ValueError: ``batches`` is empty (on every process), a token mask is not
            ``[batch, seq]`` of 0/1, ``distributed=True`` without a process group,
            or a sparsifier refuses a weight's ops.
        RuntimeError: an op never ran on the batches, or another process failed;
            the state is unchanged then.

    Example::

        >>> model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
        >>> gm = fx_sparsity.prepare(model, sparsifier=fx_sparsity.WandaSparsifier(0.5))
        >>> norms = fx_sparsity.calibrate(gm, [torch.randn(8, 64) for _ in range(4)], progress_bar=False)
        >>> sorted(norms), tuple(norms["0.weight"].shape)
        (['0.weight', '2.weight'], (64,))

    With padded token batches (a model taking ``input_ids`` and ``attention_mask``),
    and on ``torch.distributed``, each of N processes running every N-th batch::

        >>> batches = [tokenizer(texts, padding=True, return_tensors="pt") for texts in chunks]  # doctest: +SKIP
        >>> torch.distributed.init_process_group("gloo")  # torchrun sets rank and world size  # doctest: +SKIP
        >>> rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()  # doctest: +SKIP
        >>> _ = fx_sparsity.calibrate(gm, batches[rank::world], progress_bar=False)  # doctest: +SKIP
        >>> sparsifier.step()  # the same masks on every process  # doctest: +SKIP
    """
    sparsifier = get_sparsifier(gm)
    check_batches(batches)
    check_token_mask_source(token_mask)
    group = process_group(distributed)
    # nn.LSTM parameters (ChannelPruner's hidden units) are read inside the LSTM, with no input of their own to
    # observe; the criteria that score them read the weights, and the activation criterion refuses their groups.
    groups = {g.record.tensor_fqn: g for g in sparsifier.groups if g.record.kind != LSTM_KIND}
    factories = {fqn: functools.partial(calibration_observer, sparsifier, g) for fqn, g in groups.items()}
    observers = insert_input_observers(gm, factories)
    try:
        seen = run_observed(observers, lambda: _run(gm, observers, batches, token_mask, progress_bar), group)
    finally:
        remove_input_observers(gm)
    if not seen:
        raise ValueError("calibrate needs at least one batch; batches was empty")
    _warn_unmatched(observers)
    statistics = {fqn: calibration_statistic(sparsifier, groups[fqn], o) for fqn, o in observers.items()}
    key = calibration_key(sparsifier)
    for fqn, statistic in statistics.items():
        sparsifier.state[fqn][key] = statistic
    return statistics


def process_group(distributed: Any) -> Any:
    """The process group ``calibrate(distributed=...)`` reduces over, or ``None`` for no reduction.

    Example::

        >>> process_group(False) is None   # also None without an initialized group
        True
    """
    import torch.distributed as dist

    initialized = dist.is_available() and dist.is_initialized()
    if distributed is None:
        return dist.group.WORLD if initialized and dist.get_world_size() > 1 else None
    if distributed is False:
        return None
    if distributed is True:
        if not initialized:
            raise ValueError(
                "distributed=True needs an initialized process group: call torch.distributed.init_process_group "
                "first, or pass distributed=None/False"
            )
        return dist.group.WORLD
    if dist.is_available() and isinstance(distributed, dist.ProcessGroup):
        return distributed
    raise TypeError(f"distributed must be None, True, False or a torch.distributed ProcessGroup, got {distributed!r}")


def _run(gm: fx.GraphModule, observers: dict[str, nn.Module], batches: Iterable[Any], token_mask: TokenMask,
         progress_bar: bool) -> int:
    """Run the batches with each one's token mask set on the observers; the number of batches run."""
    total = len(batches) if hasattr(batches, "__len__") else None
    seen = 0
    try:
        with torch.no_grad(), eval_mode(gm):
            for batch in progress(batches, progress_bar, "calibrate", total):
                name = f"batch {seen} of batches"
                args, kwargs = fit_inputs(gm, batch, name)
                apply_token_mask(observers, batch_token_mask(batch, token_mask, name))
                gm(*args, **kwargs)
                seen += 1
    finally:
        apply_token_mask(observers, None)
    return seen


def apply_token_mask(observers: dict[str, nn.Module], mask: torch.Tensor | None) -> None:
    """Make ``mask`` (a batch's ``[batch, seq]`` token mask, or ``None``) the token mask of every observer.

    Raises:
        TypeError: ``mask`` is given and an observer cannot apply token masks.
    """
    if mask is not None:
        _check_maskable(observers)
    for observer in observers.values():
        if hasattr(observer, "token_mask"):
            observer.token_mask = mask


def run_observed(observers: dict[str, nn.Module], run: Callable[[], int], group: Any) -> int:
    """``run()`` (which runs batches through the observers and returns how many); under a process ``group``,
    every process learns whether another failed, and the observers' sums are all-reduced.

    Returns:
        The number of batches run, summed over the group's processes.
    """
    if group is not None:
        _check_reducible(observers)
    try:
        seen = run()
    except Exception:
        if group is not None:
            _share_failure(True, group)
        raise
    if group is not None:
        _share_failure(False, group)
        seen = _sum(seen, group)
        all_reduce_observers(observers, group)
    return seen


def _check_maskable(observers: dict[str, nn.Module]) -> None:
    unable = {fqn: type(o).__name__ for fqn, o in observers.items() if not hasattr(o, "token_mask")}
    if unable:
        raise TypeError(
            f"the batches carry token masks, but the observers of {unable} cannot apply them (they are not "
            "passes.calibration.InputObserver subclasses): pass token_mask=None to observe every position"
        )


def _check_reducible(observers: dict[str, nn.Module]) -> None:
    unable = {fqn: type(o).__name__ for fqn, o in observers.items() if not getattr(o, "summed", ())}
    if unable:
        raise TypeError(
            f"calibrate runs under torch.distributed, but the observers of {unable} name no summed statistics "
            "to all-reduce (a 'summed' attribute, see passes.calibration.InputObserver): pass distributed=False to keep "
            "each process's own statistics"
        )


def _share_failure(failed: bool, group: Any) -> None:
    """Tell every process whether one failed; those that did not raise too, instead of waiting forever."""
    import torch.distributed as dist

    flag = torch.tensor([int(failed)])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if flag.item() and not failed:
        raise RuntimeError("another process failed while running its calibration batches (see its error)")


def _sum(count: int, group: Any) -> int:
    import torch.distributed as dist

    total = torch.tensor([count])
    dist.all_reduce(total, group=group)
    return int(total.item())


def _warn_unmatched(observers: dict[str, nn.Module]) -> None:
    unmatched = {fqn: sorted(o.unmatched) for fqn, o in observers.items() if getattr(o, "unmatched", None)}
    if unmatched:
        warnings.warn(
            f"token masks did not map to the inputs of {unmatched} (not [batch, seq, ..., features] or "
            "[batch * seq, features]: a conv, or a linear after pooling): every position of those was observed",
            UserWarning,
            stacklevel=3,
        )
