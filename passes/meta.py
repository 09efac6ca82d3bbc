"""What the passes record on the graphs they rewrite: one ``node.meta`` key, one ``gm.meta`` key.

Nodes: the mask-insertion pass tags every node it creates or rewrites with a
:class:`SparseTarget` under :data:`SPARSITY_META_KEY`; the other passes read those tags
(:func:`masked_targets` lists the masked weights) and the fusing pass undoes the rewrite by
them. Nothing else is stored on nodes.

Modules: :func:`passes.capture` records how it captured a module as a :class:`CaptureRecord`
under :data:`CAPTURE_META_KEY` (:func:`get_capture` reads it, also from modules saved by
fx_sparsity 0.1.0, which kept it under two bare keys).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from torch import fx

__all__ = [
    "SPARSITY_META_KEY",
    "SparseTarget",
    "Role",
    "get_sparse_target",
    "mask_nodes",
    "masked_targets",
    "CAPTURE_META_KEY",
    "CaptureRecord",
    "get_capture",
    "set_capture",
]

SPARSITY_META_KEY = "fx_sparsity"
CAPTURE_META_KEY = "fx_sparsity.capture"

Role = Literal["op", "mask_mul", "pad", "observer", "lowered"]


@dataclass(frozen=True)
class SparseTarget:
    """What a node is, as far as sparsity goes.

    Attributes:
        module_fqn: FQN of the module that owns the (canonical) weight tensor.
        tensor_name: attribute name of the weight on that module (usually ``"weight"``).
        kind: ``"linear"``, ``"conv1d"``, ``"conv2d"``, ``"conv3d"`` or ``"lstm"`` (a
            parameter of an ``nn.LSTM``, :mod:`passes.masking.lstm`; the LSTM call's own
            ``"op"`` target names the module, with ``tensor_name`` ``""``).
        weight_shape: shape of the weight tensor.
        role: ``"op"`` for the linear/conv node, ``"mask_mul"`` for the
            ``mul(weight, mask)`` node, ``"pad"`` for the explicit padding node
            of a conv whose ``padding_mode`` is not ``"zeros"``, ``"observer"`` for a
            calibration observer in front of the op (:mod:`passes.calibration.insertion`, :mod:`passes.calibration.observers`),
            ``"lowered"`` for the node holding a lowered op's output in the layer's
            layout (:mod:`passes.lowering.rewrite`; the sparse operator's call, or the
            conv's ``contiguous`` after it).
        call_module_fqn: for an op that was a ``call_module`` before masking,
            the FQN of the module it called (it may differ from ``module_fqn``
            when weights are tied); ``None`` for functional ops.
        transposed: the weight is stored ``[in, out]`` and used as ``x @ W``
            (``addmm``/``mm``/``matmul``, transformers' ``Conv1D``), transposed
            relative to ``nn.Linear``'s ``[out, in]``.
    """

    module_fqn: str
    tensor_name: str
    kind: str
    weight_shape: tuple[int, ...]
    role: Role = "op"
    call_module_fqn: str | None = None
    transposed: bool = False

    @property
    def tensor_fqn(self) -> str:
        return f"{self.module_fqn}.{self.tensor_name}" if self.module_fqn else self.tensor_name

    @property
    def mask_name(self) -> str:
        return f"{self.tensor_name}_mask"

    @property
    def mask_fqn(self) -> str:
        return f"{self.module_fqn}.{self.mask_name}" if self.module_fqn else self.mask_name


def get_sparse_target(node: fx.Node) -> SparseTarget | None:
    """The node's :class:`SparseTarget`, or ``None`` when the node has none."""
    return node.meta.get(SPARSITY_META_KEY)


def mask_nodes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """The ``mul(weight, mask)`` node of every masked weight of ``gm``, by tensor FQN, in graph order: one scan of
    the graph, which the readers below accept so that a recipe scans once."""
    found = {}
    for node in gm.graph.nodes:
        target = get_sparse_target(node)
        if target is not None and target.role == "mask_mul":
            found[target.tensor_fqn] = node
    return found


def masked_targets(gm: fx.GraphModule, nodes: Mapping[str, fx.Node] | None = None) -> list[SparseTarget]:
    """The :class:`SparseTarget` of every ``mul(weight, mask)`` node of ``gm``, in graph order.

    Args:
        gm: a module rewritten by :func:`passes.insert_masks`.
        nodes: :func:`mask_nodes` of ``gm``, when the caller has them.

    Example::

        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4)))
        >>> [t.mask_fqn for t in masked_targets(insert_masks(gm, find_weights(gm)))]
        ['0.weight_mask']
    """
    return [get_sparse_target(n) for n in (mask_nodes(gm) if nodes is None else nodes).values()]


@dataclass(frozen=True)
class CaptureRecord:
    """How :func:`passes.capture` captured a module.

    Attributes:
        method: ``"symbolic_trace"`` or ``"export"``.
        dynamic_batch: for an export capture, ``True`` when dim 0 of the inputs is dynamic,
            ``False`` when export specialised it (a warning said why), ``None`` when the caller gave
            ``dynamic_shapes``; ``None`` for symbolic tracing (which has no shapes).
    """

    method: Literal["symbolic_trace", "export"]
    dynamic_batch: bool | None = None


def get_capture(gm: Any) -> CaptureRecord | None:
    """The :class:`CaptureRecord` of a module :func:`passes.capture` returned (or one copied from it), else ``None``.

    Example::

        >>> get_capture(capture(nn.Sequential(nn.Linear(4, 4)))).method
        'symbolic_trace'
    """
    meta = getattr(gm, "meta", None) or {}
    record = meta.get(CAPTURE_META_KEY)
    if record is None and meta.get("capture") in ("symbolic_trace", "export"):  # saved by fx_sparsity 0.1.0
        record = CaptureRecord(meta["capture"], meta.get("dynamic_batch"))
    return record


def set_capture(gm: fx.GraphModule, record: CaptureRecord) -> None:
    gm.meta[CAPTURE_META_KEY] = record
