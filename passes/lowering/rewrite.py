"""Replace masked Linear (and 1x1 Conv) ops by sparse-kernel custom operators.

For each weight named in ``formats`` the pass computes ``weight * mask``,
compresses it to the requested layout (:mod:`passes.lowering.operators`) and registers
the components as buffers on the module that owns the weight:

* ``bitmask``: ``<tensor_name>_bitmask``, ``<tensor_name>_values`` and
  ``<tensor_name>_row_offsets``; ``nm``: ``<tensor_name>_bitmask`` and
  ``<tensor_name>_values`` (see :mod:`passes.lowering.formats`);
* ``csr``/``bsr``: ``<tensor_name>_crow_indices``, ``<tensor_name>_col_indices``
  (csr: int16 when they fit, else int32) and ``<tensor_name>_values``;
* ``semi_structured``: ``<tensor_name>_packed`` and ``<tensor_name>_meta``.
* the quantized layouts (:data:`QUANT_LAYOUTS`, e.g. ``bitmask-int8``, ``nm-int4``, ``dense-int8``):
  the components of :data:`passes.lowering.quantized.QUANT_COMPONENT_NAMES` (the sparse ones plus
  ``<tensor_name>_scales``; ``dense-int4`` also ``<tensor_name>_zeros``). Their values are not
  computed here: the caller passes each weight's quantized values, scales and zeros
  (``quantized={"fc.weight": QuantizedWeight}``), and the pass checks they are the weight's shape
  and keep every entry the mask prunes at exactly 0.

Every op reading the masked weight becomes a call to the matching
``torch.ops.fx_sparsity.*_linear`` operator. A 1x1 conv (no padding, one
group) is a linear over channels: its input is strided-sliced when the conv has
a stride, moved channels-last, run through the operator and moved back
(contiguous). The ``mul(weight, mask)``
node and the mask buffer are removed, and the dense weight too when nothing
else in the graph reads it (a tied embedding, say). Masked weights not named
in ``formats`` are left for :func:`passes.masking.fuse.fuse_masks`.

Everything is validated before the module is touched. The pass mutates and
returns ``gm``.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, fx

from passes.lowering.formats import detect_nm, to_bitmask_components, to_nm_components
from passes.lowering.native import NO_NATIVE_ENV, native_ops
from passes.lowering.operators import (
    NATIVE_DTYPES,
    QUANT_OPS,
    eager_native_linear,
    to_bsr_components,
    to_csr_components,
    to_semi_structured_components,
)
from passes.lowering.quantized import (
    QUANT_COMPONENT_NAMES,
    QUANT_LAYOUTS,
    as_quantized,
    check_quantized,
    dequantize,
    quant_bits,
    to_quantized_components,
)
from passes.masking.lstm import LSTM_KIND
from passes.matching.weights import op_arguments
from passes.meta import SPARSITY_META_KEY, SparseTarget, get_sparse_target, mask_nodes
from passes.utils import ReadIndex, erase_unused_get_attrs, split_fqn, tensor_aliases

__all__ = [
    "LAYOUTS",
    "QUANT_LAYOUTS",
    "SparseFormat",
    "unsupported_reason",
    "lower_sparse",
    "lowering_blocker",
    "lowering_blockers",
    "sparse_layer_forward",
    "conv_strides",
    "SPARSE_OPS",
    "COMPONENT_NAMES",
]

Layout = Literal[
    "csr", "bsr", "semi_structured", "bitmask", "nm",
    "bitmask-int8", "bitmask-int4", "nm-int8", "nm-int4", "csr-int8", "csr-int4", "dense-int8", "dense-int4",
]

SPARSE_OPS = {
    "csr": torch.ops.fx_sparsity.csr_linear.default,
    "bsr": torch.ops.fx_sparsity.bsr_linear.default,
    "semi_structured": torch.ops.fx_sparsity.semi_structured_linear.default,
    "bitmask": torch.ops.fx_sparsity.bitmask_linear.default,
    "nm": torch.ops.fx_sparsity.nm_linear.default,
}
# The float layouts (what lower's backends and autotune choose among); the quantized ones need their
# values from the quantization step and are lowered only when it gives them.
LAYOUTS: tuple[Layout, ...] = tuple(SPARSE_OPS)
SPARSE_OPS.update({layout: getattr(torch.ops.fx_sparsity, f"{layout.replace('-', '_')}_linear").default
                   for layout in QUANT_OPS})
_MKL_DTYPES = (torch.float32, torch.float64)
_SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)
# Buffer name suffixes, per layout: <tensor_name>_<suffix> on the weight's owner.
COMPONENT_NAMES = {
    "csr": ("crow_indices", "col_indices", "values"),
    "bsr": ("crow_indices", "col_indices", "values"),
    "semi_structured": ("packed", "meta"),
    # not "mask": <tensor_name>_mask is the prepared module's mask buffer
    "bitmask": ("bitmask", "values", "row_offsets"),
    "nm": ("bitmask", "values"),
    **QUANT_COMPONENT_NAMES,
}
_NM_LAYOUTS = ("nm", "nm-int8", "nm-int4")


@dataclass(frozen=True)
class SparseFormat:
    """How to store one weight: ``layout``; for ``"bsr"`` the ``blocksize`` (rows, cols); for ``"nm"`` (and
    ``"nm-int8"``/``"nm-int4"``) the pattern ``nm=(n, m)`` (``None``: :func:`passes.lowering.formats.detect_nm`
    finds it in the weight). A quantized layout (:data:`QUANT_LAYOUTS`) packs the weight's quantized values,
    which :meth:`components` must be given.

    Example::

        >>> SparseFormat("nm", nm=(2, 4)).components(torch.tensor([[1.0, 0.0, 0.0, 2.0]]))[1].tolist()
        [[1.0, 2.0]]
    """

    layout: Layout
    blocksize: tuple[int, int] | None = None
    nm: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.layout not in SPARSE_OPS:
            raise ValueError(f"SparseFormat.layout must be one of {sorted(SPARSE_OPS)}, got {self.layout!r}")
        if self.layout == "bsr":
            size = self.blocksize
            if not (
                isinstance(size, Sequence) and len(size) == 2
                and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
            ):
                raise ValueError(f"bsr needs blocksize=(rows, cols) of positive ints, got {size!r}")
            object.__setattr__(self, "blocksize", tuple(size))
        elif self.blocksize is not None:
            raise ValueError(f"blocksize applies to 'bsr' only, got blocksize={self.blocksize!r} for {self.layout!r}")
        if self.nm is not None:
            if self.layout not in _NM_LAYOUTS:
                raise ValueError(f"nm applies to {', '.join(map(repr, _NM_LAYOUTS))} only, got nm={self.nm!r} for "
                                 f"{self.layout!r}")
            pattern = self.nm
            if not (
                isinstance(pattern, Sequence) and len(pattern) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in pattern)
                and 1 <= pattern[0] < pattern[1]
            ):
                raise ValueError(f"nm must be a pair of ints (n, m) with 1 <= n < m, e.g. (2, 4), got {pattern!r}")
            object.__setattr__(self, "nm", tuple(pattern))

    @property
    def quantized(self) -> bool:
        """Whether the layout holds quantized values (:data:`QUANT_LAYOUTS`)."""
        return self.layout in QUANT_COMPONENT_NAMES

    def components(self, weight: Tensor, quantized: object | None = None) -> tuple[Tensor, ...]:
        """The strided tensors the operator of this layout takes for a dense 2-D ``weight``.

        A quantized layout packs ``quantized`` instead (values/scales/zeros of ``weight``, see
        :func:`passes.lowering.quantized.to_quantized_components`); ``weight`` gives only the shape it must have.

        Raises:
            ValueError: the weight (or its quantized values) does not fit the layout, or a quantized layout
                was given no ``quantized``.
        """
        if self.quantized:
            if quantized is None:
                raise ValueError(
                    f"{self.layout} packs quantized values: give the weight's values, scales and zeros (a "
                    "QuantizedWeight from fx_sparsity.quantization), or choose a float layout"
                )
            q = as_quantized(quantized)
            if isinstance(q.values, Tensor) and tuple(q.values.shape) != tuple(weight.shape):
                raise ValueError(f"the quantized values have shape {tuple(q.values.shape)}, the weight "
                                 f"{tuple(weight.shape)}: they are of another weight")
            return to_quantized_components(self.layout, q, self.nm)
        if self.layout == "csr":
            return to_csr_components(weight)
        if self.layout == "bsr":
            return to_bsr_components(weight, self.blocksize)
        if self.layout == "bitmask":
            return to_bitmask_components(weight)
        if self.layout == "nm":
            pattern = self.nm or detect_nm(weight)
            if pattern is None:
                raise ValueError(
                    "the weight is not N:M sparse (no group of 4, 8 or 16 columns bounds the nonzeros "
                    "per group to half or less); use 'bitmask' or prune it with an N:M sparsifier"
                )
            return to_nm_components(weight, *pattern)
        return to_semi_structured_components(weight)


def unsupported_reason(layout: str, weight: Tensor, blocksize: tuple[int, int] | None) -> str | None:
    """Why ``layout`` cannot run ``weight`` on this machine; ``None`` when it can.

    Checks on the weight's values and shape (2:4 pattern, divisibility) are made
    when it is compressed (:class:`passes.SparseFormat`).
    """
    cpu = weight.device.type == "cpu"
    if layout in QUANT_COMPONENT_NAMES:
        if not cpu:
            return f"{layout} kernels run on CPU only, the weight is on {weight.device}"
        if weight.dtype not in NATIVE_DTYPES:
            return f"{layout} kernels take float32, bfloat16 or float16 activations, the weight is {weight.dtype}"
        if native_ops() is None:
            return (
                f"the C++ {layout} kernel is not available (see the warning above, or {NO_NATIVE_ENV} is set); "
                "its pure-torch fallback would only dequantize to dense"
            )
        return None
    if layout in ("bitmask", "nm"):
        if not cpu:
            return f"{layout} kernels run on CPU only, the weight is on {weight.device}"
        if weight.dtype not in NATIVE_DTYPES:
            return f"{layout} kernels take float32, bfloat16 or float16 weights, the weight is {weight.dtype}"
        if native_ops() is None:
            # The operator's pure-torch path (unpack, dense linear) keeps saved programs running anywhere,
            # but it is never faster than the fused weight: lowering does not pick it.
            return (
                f"the C++ {layout} kernel is not available (see the warning above, or {NO_NATIVE_ENV} is set); "
                "its pure-torch fallback would only unpack to dense"
            )
    if layout == "csr" and cpu and weight.dtype not in _MKL_DTYPES:
        if weight.dtype not in NATIVE_DTYPES:
            return f"csr on CPU takes float32, bfloat16, float16 or float64 weights, the weight is {weight.dtype}"
        if native_ops() is None:
            return (
                f"the C++ csr kernel is not available (see the warning above) and MKL runs float32 and "
                f"float64 only, the weight is {weight.dtype}"
            )
    if layout == "bsr" and cpu and weight.dtype not in _MKL_DTYPES:
        return f"torch.sparse on CPU runs float32 and float64 only, the weight is {weight.dtype}"
    if layout == "bsr":
        if blocksize is None:
            return (
                "no block size: give one per layer, e.g. {'fc': {'backend': 'bsr', 'blocksize': (32, 32)}}, "
                "or prepare with a sparsifier whose sparse_block_shape is square"
            )
        if weight.device.type == "cpu" and blocksize[0] != blocksize[1]:
            return f"MKL on CPU takes square blocks only, got blocksize {blocksize}"
    if layout == "semi_structured":
        if not weight.is_cuda:
            return f"2:4 kernels run on CUDA GPUs only, the weight is on {weight.device}"
        if weight.dtype not in _SEMI_STRUCTURED_DTYPES:
            return f"2:4 kernels take float16 or bfloat16 weights, the weight is {weight.dtype}"
        if torch.cuda.get_device_capability(weight.device) < (8, 0):
            return "2:4 kernels need a GPU of compute capability 8.0 or newer"
    return None


def _ops(mul: fx.Node) -> list[fx.Node]:
    return [u for u in mul.users if (t := get_sparse_target(u)) is not None and t.role == "op"]


def _as_tuple(value: object, n: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def lowering_blockers(gm: fx.GraphModule, nodes: Mapping[str, fx.Node] | None = None) -> dict[str, str | None]:
    """:func:`lowering_blocker` of every masked weight of ``gm``, in one pass over the graph (none when
    ``nodes``, :func:`passes.meta.mask_nodes` of ``gm``, are given)."""
    return {fqn: _blocker(mul) for fqn, mul in (mask_nodes(gm) if nodes is None else nodes).items()}


def lowering_blocker(gm: fx.GraphModule, tensor_fqn: str) -> str | None:
    """Why the ops using masked weight ``tensor_fqn`` cannot run as a sparse linear; ``None`` if they can.

    Linear ops always can; a conv can when it is 1x1 with no padding and one
    group (a stride becomes a strided slice of the input).
    """
    mul = mask_nodes(gm).get(tensor_fqn)
    if mul is None:
        raise ValueError(f"{tensor_fqn!r} is not a masked weight of the module")
    return _blocker(mul)


def _blocker(mul: fx.Node) -> str | None:
    for op in _ops(mul):
        target: SparseTarget = get_sparse_target(op)
        if target.kind == LSTM_KIND:
            return "nn.LSTM parameter: no sparse LSTM kernel (backend 'fuse' folds its mask, 'shrink' removes units)"
        if target.transposed:
            return "weight stored [in, out] (x @ W, as transformers' Conv1D): the sparse kernels take [out, in]"
        if target.kind == "linear":
            continue
        nd = len(target.weight_shape) - 2
        args = op_arguments(op.target, op.args, op.kwargs)
        kernel = target.weight_shape[2:]
        if any(k != 1 for k in kernel):
            return f"{'x'.join(map(str, kernel))} conv: only 1x1 convs run as sparse linears"
        # "same" pads a 1x1 kernel by nothing.
        if args["padding"] not in ("valid", "same") and _as_tuple(args["padding"], nd) != (0,) * nd:
            return f"1x1 conv with padding {args['padding']}: only unpadded convs run as sparse linears"
        if args["groups"] != 1:
            return f"grouped conv (groups={args['groups']}): only groups=1 runs as a sparse linear"
    return None


def _strides(target: SparseTarget, args: dict) -> tuple[int, ...]:
    return _as_tuple(args["stride"], len(target.weight_shape) - 2)


def conv_strides(target: SparseTarget, op_target: object, args: tuple, kwargs: dict) -> tuple[int, ...] | None:
    """``None`` for a linear op, else the strides of the conv called as ``op_target(*args, **kwargs)``."""
    if target.kind == "linear":
        return None
    return _strides(target, op_arguments(op_target, args, kwargs))


def _stride_slice(strides: tuple[int, ...]) -> tuple:
    """The index that picks what a 1x1 conv of these strides reads: ``x[..., ::sh, ::sw]``."""
    return (Ellipsis, *(slice(None, None, s) for s in strides))


def sparse_layer_forward(
    layout: Layout, x: Tensor, components: Sequence[Tensor], bias: Tensor | None, conv_strides: tuple[int, ...] | None
) -> Tensor:
    """Eager equivalent of the nodes the pass emits for one op (used to time layers, and the forward of the
    deployment modules): the C++ kernel called directly where :func:`eager_native_linear` allows it.

    ``conv_strides`` is ``None`` for a linear, else the strides of a 1x1 conv.
    """
    if conv_strides is not None:
        channel_dim = -(len(conv_strides) + 1)
        if any(s != 1 for s in conv_strides):
            x = x[_stride_slice(conv_strides)]
        x = torch.movedim(x, channel_dim, -1)
    y = eager_native_linear(layout, x, components, bias)
    if y is None:
        y = SPARSE_OPS[layout](x, *components, bias)
    return y if conv_strides is None else torch.movedim(y, -1, channel_dim).contiguous()


def _emit(graph: fx.Graph, op: fx.Node, layout: Layout, components: list[fx.Node]) -> fx.Node:
    target: SparseTarget = get_sparse_target(op)
    args = op_arguments(op.target, op.args, op.kwargs)
    x, bias = args["input"], args["bias"]
    sparse_op = SPARSE_OPS[layout]
    with graph.inserting_before(op):
        if target.kind == "linear":
            new = graph.call_function(sparse_op, (x, *components, bias))
        else:
            channel_dim = -(len(target.weight_shape) - 1)
            strides = _strides(target, args)
            if any(s != 1 for s in strides):
                x = graph.call_function(operator.getitem, (x, _stride_slice(strides)))
            x_last = graph.call_function(torch.movedim, (x, channel_dim, -1))
            y = graph.call_function(sparse_op, (x_last, *components, bias))
            y = graph.call_function(torch.movedim, (y, -1, channel_dim))
            new = graph.call_method("contiguous", (y,))
    new.meta.update({k: v for k, v in op.meta.items() if k in ("val", "tensor_meta", "stack_trace", "nn_module_stack")})
    new.meta[SPARSITY_META_KEY] = dataclasses.replace(target, role="lowered")  # which layer's output it is
    return new


def _check_names(gm: fx.GraphModule, tensor_fqn: str, layout: Layout) -> None:
    module_fqn, name = split_fqn(tensor_fqn)
    owner = gm.get_submodule(module_fqn)
    for part in COMPONENT_NAMES[layout]:
        if hasattr(owner, f"{name}_{part}"):
            raise ValueError(
                f"cannot add buffer {tensor_fqn}_{part}: module {module_fqn or '<root>'!r} already has it"
            )


def _quantized_for(fqn: str, fmt: SparseFormat, quantized: Mapping[str, object] | None, mask: Tensor) -> object:
    """The checked quantized weight of ``fqn`` for a quantized ``fmt`` (else ``None``)."""
    if not fmt.quantized:
        return None
    if quantized is None or fqn not in quantized:
        raise ValueError(
            "no quantized values given for it: pass quantized={" + repr(fqn) + ": <its QuantizedWeight>} "
            "(values, scales, zeros from fx_sparsity.quantization), or lower it to a float layout"
        )
    q = as_quantized(quantized[fqn], f"quantized[{fqn!r}]")
    for name in ("values", "scales"):
        if not isinstance(getattr(q, name), Tensor):
            raise TypeError(f"quantized[{fqn!r}].{name} must be a tensor, got {type(getattr(q, name)).__name__}")
    if tuple(q.values.shape) != tuple(mask.shape):
        raise ValueError(f"its quantized values have shape {tuple(q.values.shape)}, the weight {tuple(mask.shape)}")
    check_quantized(q, quant_bits(fmt.layout), sparse=not fmt.layout.startswith("dense"))
    kept = dequantize(q.values.detach().cpu(), q.scales.detach().cpu(), None if q.zeros is None else q.zeros.cpu())
    pruned = (mask.cpu() == 0) & (kept != 0)
    if bool(pruned.any()):
        row, col = (int(i) for i in pruned.nonzero()[0])
        raise ValueError(
            f"its quantized values keep {int(pruned.sum())} entries the mask prunes (the first at row {row}, "
            f"column {col}): quantize the masked weight, keeping pruned entries at 0"
        )
    return q


def lower_sparse(
    gm: fx.GraphModule, formats: Mapping[str, SparseFormat], quantized: Mapping[str, object] | None = None
) -> fx.GraphModule:
    """Run the masked weights named in ``formats`` through sparse-kernel operators.

    Args:
        gm: a module with mask nodes from :func:`passes.masking.insert.insert_masks` (mutated in place).
        formats: canonical tensor FQN (``"fc.weight"``) -> :class:`SparseFormat`.
        quantized: tensor FQN -> the weight's quantized values, scales and zeros (a ``QuantizedWeight``,
            :class:`passes.lowering.quantized.QuantizedComponents` or a mapping), for the weights given a
            quantized layout; entries for other weights are ignored.

    Returns:
        ``gm``, recompiled.

    Raises:
        ValueError: an FQN is not a masked weight, an op cannot run as a sparse
            linear (:func:`lowering_blocker`), the weight does not fit the
            layout, or a quantized layout has no quantized weight, one of another shape or one that keeps
            an entry the mask prunes (each naming the layer); ``gm`` is unchanged then.

    Example::

        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(8, 8)))
        >>> gm = lower_sparse(insert_masks(gm, find_weights(gm)), {"0.weight": SparseFormat("csr")})
        >>> [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        ['fx_sparsity.csr_linear.default']
    """
    muls = mask_nodes(gm)
    plans = []
    for fqn, fmt in formats.items():
        if fqn not in muls:
            raise ValueError(f"{fqn!r} is not a masked weight; masked weights are: {', '.join(muls) or 'none'}")
        if not isinstance(fmt, SparseFormat):
            raise TypeError(f"formats[{fqn!r}] must be a SparseFormat, got {type(fmt).__name__}")
        blocker = _blocker(muls[fqn])
        if blocker is not None:
            raise ValueError(f"cannot lower {fqn} to {fmt.layout}: {blocker}")
        _check_names(gm, fqn, fmt.layout)
        target: SparseTarget = get_sparse_target(muls[fqn])
        owner = gm.get_submodule(target.module_fqn)
        weight, mask = getattr(owner, target.tensor_name), getattr(owner, target.mask_name)
        fused = (weight * mask).detach().reshape(weight.shape[0], -1)
        try:
            q = _quantized_for(fqn, fmt, quantized, mask.detach().reshape(fused.shape))
            components = fmt.components(fused, q)
        except (ValueError, TypeError) as e:
            raise type(e)(f"cannot lower {fqn} to {fmt.layout}: {e}") from None
        plans.append((target, fmt, components))

    graph = gm.graph
    aliases = tensor_aliases(gm)
    dense_weights = []
    for target, fmt, components in plans:
        owner = gm.get_submodule(target.module_fqn)
        dense_weights.append(aliases[id(getattr(owner, target.tensor_name))])
        names = []
        for part, tensor in zip(COMPONENT_NAMES[fmt.layout], components):
            owner.register_buffer(f"{target.tensor_name}_{part}", tensor)
            names.append(f"{target.tensor_fqn}_{part}")
        mul = muls[target.tensor_fqn]
        for op in _ops(mul):
            with graph.inserting_before(op):
                nodes = [graph.get_attr(name) for name in names]
            op.replace_all_uses_with(_emit(graph, op, fmt.layout, nodes))
            graph.erase_node(op)
        inputs = mul.all_input_nodes
        graph.erase_node(mul)
        erase_unused_get_attrs(graph, inputs)
        del owner._buffers[target.mask_name]
    reads = ReadIndex(graph)  # once all ops are rewritten: linear in the number of lowered weights
    for weight_aliases in dense_weights:
        if not any(reads.is_read(alias) for alias in weight_aliases):
            for alias in weight_aliases:
                module_fqn, name = split_fqn(alias)
                delattr(gm.get_submodule(module_fqn), name)
    graph.lint()
    gm.recompile()
    return gm
