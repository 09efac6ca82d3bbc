"""The one ``node.meta`` key through which the sparsity passes talk to each other.

The matcher finds weight ops, the mask-insertion pass tags every node it creates
or rewrites with a :class:`SparseTarget`, and the fusing pass reads those tags to
undo the rewrite. Nothing else is stored on nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["SPARSITY_META_KEY", "SparseTarget", "Role", "get_sparse_target"]

SPARSITY_META_KEY = "fx_sparsity"

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


def get_sparse_target(node) -> SparseTarget | None:
    """The node's :class:`SparseTarget`, or ``None`` when the node has none."""
    return node.meta.get(SPARSITY_META_KEY)
