"""Calibration observers: modules that record statistics of a masked op's input and pass it through.

:class:`InputNormObserver` (the default) accumulates, per input channel, the sum
of squares over every other dimension (Wanda); :class:`InputHessianObserver`
accumulates ``X^T X`` of the rows the weight's ``[out, in * kernel]`` view
multiplies (SparseGPT), a conv's input unfolded into patches with the op's own
stride, padding, dilation and groups (:func:`input_rows`). :mod:`passes.calibration.insertion`
puts them in front of the ops.

Token masks (padding): both observers are :class:`InputObserver` subclasses, whose
``token_mask`` (``[batch, seq]``, non-zero = a real token; set by the caller
before each batch, ``None`` = every position) restricts a linear's input rows to
real tokens (:func:`token_rows`): an input ``[batch, seq, ..., features]`` whose
first two dims are the mask's shape, or ``[batch * seq, features]``. Other inputs
(a conv's, a linear's after pooling) are observed in full and their shapes kept
in ``unmatched`` for the caller to report.

Processes: the statistics are sums over the observed rows, named by each
observer's ``summed`` attribute; :func:`all_reduce_observers` adds them up
over a ``torch.distributed`` process group, so that processes that each saw a
share of the batches end with the statistics of all of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from passes.meta import SparseTarget

__all__ = [
    "InputHessianObserver",
    "InputNormObserver",
    "InputObserver",
    "ObserverFactory",
    "accumulate_hessian",
    "all_reduce_observers",
    "input_norm_observer",
    "input_rows",
    "token_rows",
]

# factory(target, ops) -> observer module; ``ops`` holds, per op reading the weight, its conv
# arguments (``stride``, ``padding``, ``dilation``, ``groups``, and ``pad`` = (pad, mode) of an
# explicit padding node in front of it, else None); empty dicts for linear ops.
ObserverFactory = Callable[[SparseTarget, list[dict[str, Any]]], nn.Module]

_CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def token_rows(x: Tensor, token_mask: Tensor) -> Tensor | None:
    """The rows of a linear's input ``x`` at the positions ``token_mask`` keeps; ``None`` where they do not map.

    ``token_mask`` is ``[batch, seq]`` (non-zero = a real token). ``x`` maps to it
    when it is ``[batch, seq, ..., features]`` (its first two dims are the mask's
    shape; batch-first, as transformers lay tokens out) or ``[batch * seq, features]``
    (tokens flattened, row ``b * seq + s``). The result keeps the dims after the
    token dims: ``[kept, ..., features]``.

    Example::

        >>> x = torch.arange(12.0).reshape(2, 3, 2)
        >>> token_rows(x, torch.tensor([[1, 1, 0], [1, 0, 0]])).tolist()
        [[0.0, 1.0], [2.0, 3.0], [6.0, 7.0]]
        >>> token_rows(torch.ones(2, 2), torch.ones(2, 3)) is None   # [batch, features] after pooling
        True
    """
    keep = token_mask.to(x.device) != 0
    if x.dim() >= 3 and tuple(x.shape[:2]) == tuple(keep.shape):
        return x[keep]
    if x.dim() == 2 and keep.dim() == 2 and x.shape[0] == keep.numel():
        return x[keep.reshape(-1)]
    return None


class InputObserver(nn.Module):
    """Base of the calibration observers: a token mask, and the sums processes add up.

    ``token_mask`` (``[batch, seq]`` or ``None``) is set by the caller before a
    batch runs; :meth:`observed` applies it to an input. ``unmatched`` collects
    the shapes of inputs a mask was set for but could not apply to (observed in
    full). ``summed`` names the attributes that are sums over observed rows
    (float64 tensors, ``None`` before any input, or ints):
    :func:`all_reduce_observers` adds exactly those over processes.
    """

    summed: tuple[str, ...] = ()

    def __init__(self, linear: bool) -> None:
        super().__init__()
        self.linear = linear
        self.token_mask: Tensor | None = None
        self.unmatched: set[tuple[int, ...]] = set()

    def observed(self, x: Tensor) -> Tensor:
        """``x`` restricted to the real tokens of ``token_mask`` (a linear's input), else ``x``."""
        if self.token_mask is None:
            return x
        rows = token_rows(x, self.token_mask) if self.linear else None
        if rows is None:
            self.unmatched.add(tuple(x.shape))
            return x
        return rows


class InputNormObserver(InputObserver):
    """Pass-through module accumulating the squared L2 norm of each input channel.

    Args:
        spatial_dims: 0 for a linear (channels are the last dim), N for an
            N-d conv (channels come before the N spatial dims).
    """

    summed = ("sum_squares", "rows", "batches")

    def __init__(self, spatial_dims: int) -> None:
        super().__init__(linear=spatial_dims == 0)
        self.spatial_dims = spatial_dims
        self.sum_squares: Tensor | None = None
        self.rows = 0
        self.batches = 0

    def forward(self, x: Tensor) -> Tensor:
        seen = self.observed(x)
        channel_dim = seen.dim() - 1 - self.spatial_dims
        squares = seen.detach().double().square()
        dims = [d for d in range(seen.dim()) if d != channel_dim]
        total = squares.sum(dim=dims) if dims else squares
        self.sum_squares = total if self.sum_squares is None else self.sum_squares + total
        self.rows += seen.numel() // max(seen.shape[channel_dim], 1)
        self.batches += 1
        return x

    def norm(self) -> Tensor:
        """L2 norm of each input channel over everything observed (float32)."""
        if self.sum_squares is None:
            raise RuntimeError("the observer saw no input: run calibration batches through the module")
        return self.sum_squares.sqrt().float()


def input_norm_observer(target: SparseTarget, ops: list[dict[str, Any]]) -> InputNormObserver:
    """The default :data:`ObserverFactory`: an :class:`InputNormObserver` for the weight's rank."""
    return InputNormObserver(len(target.weight_shape) - 2)


def input_rows(
    x: Tensor,
    weight_shape: tuple[int, ...],
    *,
    stride: object = 1,
    padding: object = 0,
    dilation: object = 1,
    groups: int = 1,
    pad: tuple[tuple[int, ...], str] | None = None,
) -> Tensor:
    """The rows the weight's ``[out, in * kernel]`` view multiplies, per conv group (float64).

    A linear's input ``[..., in]`` gives ``[1, N, in]``. A conv's input is
    unfolded into patches (``in_per_group * kernel`` values each, channel-major
    like the weight's view) with the conv's own stride, padding and dilation:
    ``[groups, N, in_per_group * kernel]``, where group ``g`` holds the input
    channels the outputs of group ``g`` read.

    Args:
        x: the op's input (batched or not).
        weight_shape: ``[out, in]`` or ``[out, in / groups, *kernel]``.
        stride, padding, dilation, groups: the conv's arguments.
        pad: ``(pad, mode)`` of an explicit ``F.pad`` in front of the conv
            (``padding_mode`` other than ``"zeros"``), applied first.

    Returns:
        float64 tensor ``[groups, rows, columns]``.

    Example::

        >>> input_rows(torch.ones(2, 3, 4, 4), (8, 3, 3, 3)).shape
        torch.Size([1, 8, 27])
    """
    x = x.detach().double()
    if len(weight_shape) == 2:
        return x.reshape(1, -1, x.shape[-1])
    spatial = len(weight_shape) - 2
    if x.dim() == spatial + 1:
        x = x.unsqueeze(0)
    if pad is not None:
        x = F.pad(x, pad[0], mode=pad[1])
    channels, kernel = x.shape[1], tuple(weight_shape[2:])
    positions = math.prod(kernel)
    # A depthwise conv with a one-hot kernel per output channel copies each patch value out.
    eye = torch.eye(positions, dtype=x.dtype, device=x.device).reshape(positions, 1, *kernel)
    patches = _CONVS[spatial](x, eye.repeat(channels, *([1] * (spatial + 1))), None, stride, padding, dilation, channels)
    columns = channels // groups * positions
    return patches.reshape(patches.shape[0], groups, columns, -1).permute(1, 0, 3, 2).reshape(groups, -1, columns)


def accumulate_hessian(hessian: Tensor | None, rows: Tensor, *, inplace: bool = False) -> Tensor:
    """``hessian + rows^T rows`` per group (float64); ``hessian=None`` starts from zero.

    ``inplace=True`` adds into ``hessian`` (the same sums, bit for bit) instead of allocating a third
    ``[groups, columns, columns]`` tensor beside it and the update: an observer owns its sum.

    Example::

        >>> accumulate_hessian(None, torch.ones(1, 5, 2)).tolist()
        [[[5.0, 5.0], [5.0, 5.0]]]
    """
    rows = rows.double()
    update = rows.transpose(1, 2) @ rows
    if hessian is None:
        return update
    return hessian.add_(update) if inplace else hessian + update


class InputHessianObserver(InputObserver):
    """Pass-through module accumulating ``X^T X`` (float64) of the rows the weight multiplies.

    Args:
        weight_shape: the observed weight's shape.
        stride, padding, dilation, groups, pad: the conv's arguments (see :func:`input_rows`).

    Example::

        >>> observer = InputHessianObserver((4, 3))
        >>> _ = observer(torch.ones(2, 5, 3))
        >>> observer.hessian().shape, observer.rows
        (torch.Size([1, 3, 3]), 10)
    """

    summed = ("sum_outer", "rows")

    def __init__(
        self,
        weight_shape: tuple[int, ...],
        stride: object = 1,
        padding: object = 0,
        dilation: object = 1,
        groups: int = 1,
        pad: tuple[tuple[int, ...], str] | None = None,
    ) -> None:
        super().__init__(linear=len(weight_shape) == 2)
        self.weight_shape = tuple(weight_shape)
        self.conv = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups, "pad": pad}
        self.sum_outer: Tensor | None = None
        self.rows = 0

    @classmethod
    def for_target(cls, target: SparseTarget, ops: list[dict[str, Any]]) -> InputHessianObserver:
        """An :data:`ObserverFactory`: refuses a weight read by convs with different arguments."""
        if any(op != ops[0] for op in ops):
            raise ValueError(
                f"{target.tensor_fqn} is read by convs with different arguments {ops}: one input Hessian "
                "cannot describe them; exclude it from the config"
            )
        return cls(target.weight_shape, **(ops[0] if ops else {}))

    def forward(self, x: Tensor) -> Tensor:
        kwargs = self.conv if len(self.weight_shape) > 2 else {}
        rows = input_rows(self.observed(x), self.weight_shape, **kwargs)
        self.sum_outer = accumulate_hessian(self.sum_outer, rows, inplace=True)
        self.rows += rows.shape[1]
        return x

    def hessian(self) -> Tensor:
        """``X^T X`` over everything observed: ``[groups, columns, columns]`` float64."""
        if self.sum_outer is None:
            raise RuntimeError("the observer saw no input: run calibration batches through the module")
        return self.sum_outer


_MAX_DIMS = 8
_ABSENT = torch.iinfo(torch.int64).max


def all_reduce_observers(observers: Mapping[str, nn.Module], group: Any = None) -> None:
    """Add up every observer's ``summed`` statistics over the processes of a ``torch.distributed`` group.

    Every process calls it with observers for the same keys (one per weight),
    after running its own batches. A tensor statistic a process never recorded
    (``None``: none of its batches reached the op) counts as zeros of the shape
    the others recorded; ints are added as they are. Afterwards every process
    holds the sums over all processes' inputs, so the normalized statistics
    (norms from sums of squares, Hessians) are those of one process that ran
    every batch. Collectives: one for the shapes, one for the ints, one per tensor.

    Args:
        observers: key -> an observer with a ``summed`` attribute (an :class:`InputObserver`).
        group: the process group; ``None`` for the default one.

    Raises:
        RuntimeError: processes recorded different shapes for one statistic
            (raised on every process alike).

    Example::

        >>> InputHessianObserver.summed        # what is added up
        ('sum_outer', 'rows')
        >>> # in each of N processes, after torch.distributed.init_process_group(...)
        >>> all_reduce_observers(observers)  # doctest: +SKIP
        >>> observers["fc.weight"].rows      # rows seen by all N processes together  # doctest: +SKIP
    """
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    fields = [(key, name) for key in sorted(observers) for name in observers[key].summed]
    values = [getattr(observers[key], name) for key, name in fields]
    counts = [i for i, v in enumerate(values) if isinstance(v, int)]
    tensors = [i for i, v in enumerate(values) if not isinstance(v, int)]
    if counts:
        total = torch.tensor([values[i] for i in counts], dtype=torch.int64, device=device)
        dist.all_reduce(total, group=group)
        for i, v in zip(counts, total.tolist()):
            setattr(observers[fields[i][0]], fields[i][1], v)
    if not tensors:
        return
    most = torch.zeros(len(tensors), _MAX_DIMS + 1, dtype=torch.int64)
    least = torch.full_like(most, _ABSENT)
    for row, i in enumerate(tensors):
        value = values[i]
        if value is None:
            continue
        if not isinstance(value, Tensor) or value.dtype != torch.float64 or value.dim() > _MAX_DIMS:
            raise TypeError(f"{fields[i]}: summed statistics are float64 tensors of at most {_MAX_DIMS} dims or ints")
        most[row, : value.dim() + 1] = torch.tensor([value.dim(), *value.shape])
        least[row] = most[row]
    most, least = most.to(device), least.to(device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(least, op=dist.ReduceOp.MIN, group=group)
    most, least = most.cpu(), least.cpu()
    for row, i in enumerate(tensors):
        if least[row, 0] == _ABSENT:
            continue  # no process recorded it
        if not torch.equal(most[row], least[row]):
            raise RuntimeError(
                f"processes recorded {fields[i][1]} of {fields[i][0]} with different shapes "
                f"(dims/sizes {least[row].tolist()} vs {most[row].tolist()}): they must run the same model"
            )
        shape = most[row, 1 : int(most[row, 0]) + 1].tolist()
        local = values[i]
        summed = local.to(device) if local is not None else torch.zeros(shape, dtype=torch.float64, device=device)
        dist.all_reduce(summed, group=group)
        setattr(observers[fields[i][0]], fields[i][1], summed.to(local.device) if local is not None else summed.cpu())
