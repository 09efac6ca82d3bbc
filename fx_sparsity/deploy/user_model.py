"""``to_model`` and ``sparsify_model``: the pruned model back in a copy of the user's own model class.

A ``GraphModule`` has none of what the user's model class offers (transformers'
``generate``, ``save_pretrained`` and ``config``, a serving stack's expectations).
:func:`to_model` returns a copy of the model ``prepare`` was given, of its own
class, holding the weights the prepared module computes with: ``weight * mask``
for masked weights, SparseGPT's updated weights included. Tensors pruning did not
change are the original's own objects; changed ones are new. The user's model is
not touched.

``prepare`` keeps a reference to the user's model in ``gm.meta`` (a
:class:`fx_sparsity.meta.SourceModel`); copies of ``gm`` (``lower``, ``clone``) share it,
and pickling drops it: after ``torch.load`` pass the model as ``model=``.
Weights are matched by FQN, which both captures keep (symbolic tracing copies the
module tree, ``torch.export``'s module registers the tensors under their FQNs).

:func:`sparsify_model` lowers the prepared module (:func:`fx_sparsity.lower`, whose
format choice it reuses) and puts each packed weight in a sparse module
(:mod:`fx_sparsity.deploy.modules`) in place of the layer of the user's class that
reads it: the layer is the module whose ``forward`` ran the masked op (the
``call_module`` it was, or the innermost ``nn_module_stack`` entry that both captures
record). Weights left dense take :func:`to_model`'s path. :func:`densify_model` turns
sparse layers back into plain ones.
"""

from __future__ import annotations

import copy
import difflib
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from fx_sparsity.deploy.modules import SPARSE_MODULES, SparseLinear, sparse_module_for
from fx_sparsity.deploy.resized import is_transformers_model, resized_transformers_model
from fx_sparsity.lowering.backends import MODEL_BACKENDS, BackendConfig, parse_backends
from fx_sparsity.lowering.recipe import lower
from fx_sparsity.meta import clone_without_sparsifier, get_lowering, get_shrink, get_source_model
from fx_sparsity.utils.frames import caller_stacklevel
from fx_sparsity.utils.running import as_model_inputs, eval_mode
from passes import SparseTarget, clone_sharing_tensors, get_capture, get_sparse_target, masked_targets
from passes.lowering import COMPONENT_NAMES, SPARSE_OPS
from passes.masking import fuse_masks
from passes.meta import mask_nodes
from passes.utils import get_tensor, set_tensor, split_fqn, tensor_aliases

__all__ = ["to_model", "sparsify_model", "densify_model"]
_SPARSE_OP_TARGETS = frozenset(SPARSE_OPS.values())
_SPARSE_CLASSES = tuple(SPARSE_MODULES.values())


def _source_model(gm: fx.GraphModule, model: nn.Module | None) -> nn.Module:
    if model is not None:
        if not isinstance(model, nn.Module) or model is gm:
            raise TypeError(f"model must be the nn.Module given to prepare(), got {type(model).__name__}")
        return model
    source = get_source_model(gm)
    if source is None or source.model is None:
        why = ("it was loaded from a file (pickling keeps no reference to the model)" if source is not None
               else "it was not returned by fx_sparsity.prepare")
        raise ValueError(
            f"to_model cannot find the model behind this {type(gm).__name__}: {why}; "
            "pass the model you prepared as to_model(gm, model=model)"
        )
    return source.model


def _exported(gm: fx.GraphModule) -> bool:
    record = get_capture(gm)
    return record is not None and record.method == "export"


def _check_not_packed(gm: fx.GraphModule) -> None:
    packed = [n.name for n in gm.graph.nodes if n.op == "call_function" and n.target in _SPARSE_OP_TARGETS]
    if packed:
        raise ValueError(
            f"gm is lowered to sparse kernels ({', '.join(packed[:3])}{', ...' if len(packed) > 3 else ''}): "
            "its weights are packed and no longer sit under the model's names. Call to_model on the "
            "prepared module you lowered (or on lower(gm, 'fuse'))"
        )


def _fused(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with every ``weight * mask`` as a tensor (a clone sharing the rest), or ``gm`` when it has no masks."""
    targets = masked_targets(gm)
    if not targets:
        return gm
    aliases = tensor_aliases(gm)
    names = {t.tensor_fqn: aliases[id(get_tensor(gm, t.tensor_fqn))] for t in targets}
    fused = fuse_masks(clone_without_sparsifier(gm))
    for t in targets:
        owner = fused.get_submodule(t.module_fqn)
        if f"{t.tensor_name}_fused" in owner._parameters or f"{t.tensor_name}_fused" in owner._buffers:
            raise ValueError(_tied_message(names[t.tensor_fqn]))
    return fused


def _tied_message(names: list[str]) -> str:
    return (
        f"{' and '.join(names)} are one tied tensor that the prepared module reads masked in some ops and "
        "dense in others (a head tied to an embedding, say), and its capture does not say which module reads "
        "which: to_model cannot put the masked value in its place. Leave the tied weight out of the config "
        "(SparseGPT and Wanda's reference code prune the decoder layers only, not the head), or capture "
        "with capture_method='symbolic_trace'"
    )


def _lookup(module: nn.Module, fqn: str) -> torch.Tensor | None:
    owner_fqn, _, name = fqn.rpartition(".")
    try:
        owner = module.get_submodule(owner_fqn)
    except AttributeError:
        return None
    tensor = owner._parameters.get(name, owner._buffers.get(name))
    return tensor if isinstance(tensor, torch.Tensor) else None


def _same(new: torch.Tensor, old: torch.Tensor) -> bool:
    if new is old:
        return True
    if new.dtype != old.dtype or new.device != old.device or new.shape != old.shape:
        return False
    return bool(torch.equal(new, old))


def _as_kind_of(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new`` as a parameter when ``old`` is one (with its ``requires_grad``), else as a plain tensor."""
    data = new.detach()
    if isinstance(old, nn.Parameter):
        return nn.Parameter(data, requires_grad=old.requires_grad)
    return data


def _check_names(model: nn.Module, fused: fx.GraphModule) -> None:
    """Every parameter of ``fused`` must be one of ``model``'s tensors: else ``model`` is not the prepared one."""
    names = {fqn for fqns in tensor_aliases(model).values() for fqn in fqns}
    for fqn, _ in fused.named_parameters(remove_duplicate=False):
        if fqn not in names:
            close = difflib.get_close_matches(fqn, names, n=3)
            hint = f" (closest: {', '.join(close)})" if close else ""
            raise ValueError(
                f"gm holds the parameter {fqn}, which {type(model).__name__} lacks{hint}: pass the model "
                "that was prepared as to_model(gm, model=...)"
            )


def _replacements(
    model: nn.Module, fused: fx.GraphModule, by_module: bool
) -> list[tuple[list[str], torch.Tensor]]:
    """``(fqns, tensor)`` for every tensor of ``model`` whose value ``fused`` changed; raises before any change.

    ``by_module``: a name of a tied tensor in ``fused`` is the name the module calling it uses (symbolic
    tracing); torch.export picks one name of a tied tensor for all its uses, so its names cannot be untied.
    """
    _check_names(model, fused)
    changes, untied = [], []
    for fqns in tensor_aliases(model).values():
        old = _lookup(model, fqns[0])
        found = {fqn: t for fqn in fqns if (t := _lookup(fused, fqn)) is not None}
        if not found:  # gm no longer holds it (a weight lowered to packed buffers, read by no op)
            continue
        for fqn, new in found.items():
            if new.shape != old.shape:
                raise ValueError(
                    f"{fqn} has shape {tuple(new.shape)} in gm but {tuple(old.shape)} in "
                    f"{type(model).__name__}: structured pruning (shrink) changed the architecture, which the "
                    "model's class cannot hold; call to_model on the module before shrinking"
                )
        values = {id(t): t for t in found.values()}
        if len(values) == 1:
            (new,) = values.values()
            if not _same(new, old):
                # Names gm does not read (no module calls them) stay tied to those it does.
                changes.append((fqns, _as_kind_of(new, old)))
            continue
        # The tie is broken in gm: some names are read masked, others dense (a head tied to an embedding).
        if not by_module:
            raise ValueError(_tied_message(fqns))
        groups: dict[int, list[str]] = {}
        for fqn, new in found.items():
            groups.setdefault(id(new), []).append(fqn)
        for names in groups.values():
            new = found[names[0]]
            if not _same(new, old):
                changes.append((names, _as_kind_of(new, old)))
        untied.append([names for names in groups.values()])
    if untied:
        lines = "; ".join(" / ".join(", ".join(n) for n in split) for split in untied)
        warnings.warn(
            f"tied weights are untied in the returned model, as the prepared module reads them ({lines}): "
            "one name reads the masked weight, another the dense one. A class that re-ties them on loading "
            "(transformers with config.tie_word_embeddings=True) would lose that; leave the tied weight out "
            "of the config to keep the tie",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )
    return changes


def _leaf_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t for n, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]}


def _shrunk_model(gm: fx.GraphModule, source: nn.Module) -> nn.Module:
    """A copy of ``source`` whose layers that shrinking changed are ``gm``'s (copies), checked to compute what
    ``gm`` computes on the example inputs the pruner was prepared with; raises before returning otherwise."""
    inputs = get_shrink(gm).example_inputs
    if inputs is None:
        raise ValueError("the shrunk module no longer knows the pruner's example inputs to check the copy on "
                         "(they are kept in gm.meta); shrink the prepared module again")
    if is_transformers_model(source):
        return resized_transformers_model(gm, source, inputs)
    if _exported(gm):
        raise ValueError(
            "to_model of a shrunk module needs a symbolically traced capture: a torch.export capture keeps no "
            f"module of {type(source).__name__}'s classes to swap in. Use the shrunk GraphModule itself"
        )
    pruned = clone_sharing_tensors(source)
    for fqn, layer in gm.named_modules():
        if not fqn or next(layer.children(), None) is not None:
            continue
        try:
            original = source.get_submodule(fqn)
        except AttributeError:
            raise ValueError(f"the shrunk module has a layer {fqn!r} that {type(source).__name__} lacks; pass the "
                             "model that was prepared as to_model(gm, model=...)") from None
        old, new = _leaf_tensors(original), _leaf_tensors(layer)
        if old.keys() == new.keys() and all(_same(new[k], old[k]) for k in old):
            continue
        if type(layer) is not type(original):
            raise ValueError(f"layer {fqn!r} is a {type(layer).__name__} in the shrunk module but a "
                             f"{type(original).__name__} in {type(source).__name__}: use the shrunk GraphModule")
        owner_fqn, _, name = fqn.rpartition(".")
        setattr(pruned.get_submodule(owner_fqn), name, copy.deepcopy(layer))
    args, kwargs = as_model_inputs(inputs, "the pruner's example inputs")
    with torch.no_grad(), eval_mode(gm), eval_mode(pruned):
        expected = gm(*args, **kwargs)
        try:
            got = pruned(*args, **kwargs)
            torch.testing.assert_close(got, expected)
        except Exception as e:  # a size kept in an attribute or config breaks the class's own forward
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(
                f"{type(source).__name__} with its shrunk layers does not compute what the shrunk module does "
                f"({type(e).__name__}: {first}): the class keeps a size that shrinking changed in an attribute or "
                "config its forward reads. Use the shrunk GraphModule (it exports and saves), or patch that "
                "attribute on a copy yourself"
            ) from None
    return pruned


def to_model(gm: fx.GraphModule, model: nn.Module | None = None) -> nn.Module:
    """A copy of the user's model, of its own class, carrying the weights ``gm`` computes with.

    Masked weights become ``weight * mask``, with SparseGPT's updates; the
    result has no masks, no graph and no sparsifier: a transformers model keeps
    ``generate``, ``save_pretrained`` and its ``config``. Tensors pruning left
    unchanged are the original's own objects (shared, as ``prepare`` shares them);
    changed ones are new tensors (those of ``gm`` itself once it is squashed or
    lowered with ``"fuse"``). Tied weights stay tied, unless ``gm`` reads one name
    masked and another dense (a head tied to an unmasked embedding): then a
    symbolically traced ``gm`` has them untied as it computes them, with a
    ``UserWarning``, and an export-captured one (whose graph reads a tied tensor
    under one name for every use) is refused. The user's model is not modified.

    A module returned by :func:`fx_sparsity.shrink` (symbolically traced) comes
    back as a copy of the model whose layers shrinking changed are the shrunk
    ones (a torchvision ResNet with slimmer convs, BatchNorms and fc), running
    eagerly as the class does; the copy is checked to compute what the shrunk
    module does on the pruner's example inputs, and refused when the class keeps
    a size in an attribute or config its forward reads. A shrunk transformers
    model (either capture) comes back as a new instance of its class built from a
    copy of its config with the changed sizes (``num_attention_heads``,
    ``num_key_value_heads``, ``intermediate_size``, ...; see
    :mod:`fx_sparsity.deploy.resized`): ``generate``, ``save_pretrained`` and
    ``from_pretrained`` work; where no config can hold the sizes (layers pruned
    to different widths) it is refused, naming the tensors.

    Args:
        gm: a module returned by :func:`fx_sparsity.prepare`, stepped, squashed
            (``squash_mask``), lowered with the ``"fuse"`` backend, or shrunk.
        model: the model that was prepared; by default the one ``prepare`` kept
            a reference to (needed after ``torch.load`` of ``gm``, which keeps none).

    Returns:
        A new module of ``type(model)``, in ``model``'s training mode.

    Raises:
        TypeError: ``gm`` is not a ``GraphModule`` or ``model`` not a module.
        ValueError: the model cannot be found or lacks a parameter of ``gm``,
            ``gm`` is lowered to sparse kernels (packed weights), a tied weight is
            read masked and dense in an export capture, or a shrunk ``gm`` was
            captured by export or does not run as the class with its shrunk layers;
            raised before anything is returned.

    Example::

        >>> sparsifier = fx_sparsity.SparseGPTSparsifier(0.5)
        >>> gm = fx_sparsity.prepare(model, sparsifier=sparsifier)
        >>> _ = fx_sparsity.calibrate(gm, batches, progress_bar=False)
        >>> sparsifier.step()
        >>> pruned = to_model(gm)       # model's class again: a transformers LlamaForCausalLM stays one
        >>> type(pruned).__name__, (pruned[0].weight == 0).float().mean().item()
        ('Sequential', 0.5)
        >>> pruned[0].bias is model[0].bias, pruned[0].weight is model[0].weight
        (True, False)
    """
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"gm must be the GraphModule fx_sparsity.prepare returned, got {type(gm).__name__}")
    source = _source_model(gm, model)
    _check_not_packed(gm)
    if get_shrink(gm) is not None:
        return _shrunk_model(gm, source)
    changes = _replacements(source, _fused(gm), by_module=not _exported(gm))
    pruned = clone_sharing_tensors(source)
    for fqns, tensor in changes:
        set_tensor(pruned, fqns, tensor)
    return pruned


# ------------------------------------------------------------------------------------ sparse layers in the class
def _op_nodes(mul: fx.Node) -> list[fx.Node]:
    return [u for u in mul.users if (t := get_sparse_target(u)) is not None and t.role == "op"]


def _calling_module(node: fx.Node) -> str | None:
    """The FQN of the module whose ``forward`` ran ``node``: the module a ``call_module`` called (symbolic
    tracing), else the innermost entry of the node's ``nn_module_stack`` (both captures record it)."""
    target = get_sparse_target(node)
    if target is not None and target.call_module_fqn is not None:
        return target.call_module_fqn
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path if isinstance(path, str) else None


def _sparse_owners(
    gm: fx.GraphModule, source: nn.Module, nodes: dict[str, fx.Node]
) -> tuple[dict[str, list[str]], dict[str, str]]:
    """For each masked weight, the FQNs of the modules of ``source`` that read it masked, when every one is a
    layer a sparse module can replace and the weight is that layer's own ``weight``; else why not."""
    owners: dict[str, list[str]] = {}
    reasons: dict[str, str] = {}
    for fqn, mul in nodes.items():
        weight = _lookup(source, fqn)
        modules: list[str] = []
        for op in _op_nodes(mul):
            path = _calling_module(op)
            if not path:
                reasons[fqn] = f"an op of {type(source).__name__}.forward itself reads it (a functional call)"
                break
            try:
                module = source.get_submodule(path)
            except AttributeError:
                reasons[fqn] = f"the module {path!r} that reads it is not one of {type(source).__name__}'s"
                break
            sparse = sparse_module_for(module)
            if isinstance(sparse, str):
                reasons[fqn] = f"{path} is {sparse}"
                break
            if weight is None or module._parameters.get("weight") is not weight:
                reasons[fqn] = f"{path} reads it, but it is not {path}.weight"
                break
            if path not in modules:
                modules.append(path)
        else:
            owners[fqn] = modules
    return owners, reasons


def _check_fused_names(lowered: fx.GraphModule, fused: Sequence[SparseTarget]) -> None:
    """Refuse a fused weight that the module reads masked and dense under one name (see :func:`_fused`)."""
    aliases = None
    for t in fused:
        owner = lowered.get_submodule(t.module_fqn)
        if f"{t.tensor_name}_fused" in owner._parameters or f"{t.tensor_name}_fused" in owner._buffers:
            aliases = tensor_aliases(lowered) if aliases is None else aliases
            raise ValueError(_tied_message(aliases.get(id(getattr(owner, t.tensor_name)), [t.tensor_fqn])))


def _sparse_layer(dense: nn.Module, layout: str, components: Sequence[torch.Tensor]) -> nn.Module:
    sparse = sparse_module_for(dense)
    if sparse is SparseLinear:
        return SparseLinear(dense.in_features, dense.out_features, layout, components, dense.bias)
    return sparse(dense.in_channels, dense.out_channels, layout, components, dense.bias, dense.stride)


def _swap_modules(model: nn.Module, replacements: dict[int, nn.Module]) -> None:
    """Put ``replacements[id(module)]`` in place of ``module`` under every name it has in ``model``."""
    for fqn, module in list(model.named_modules(remove_duplicate=False)):
        new = replacements.get(id(module))
        if new is not None and fqn:
            parent_fqn, name = split_fqn(fqn)
            setattr(model.get_submodule(parent_fqn), name, new)


def _check_computes(model: nn.Module, lowered: fx.GraphModule, example_inputs: Any) -> None:
    args, kwargs = as_model_inputs(example_inputs, "example_inputs")
    with torch.no_grad(), eval_mode(model), eval_mode(lowered):
        expected = lowered(*args, **kwargs)
        try:
            torch.testing.assert_close(model(*args, **kwargs), expected)
        except Exception as e:  # noqa: BLE001 -- any failure means the swapped model is not the lowered one
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(
                f"{type(model).__name__} with its sparse layers does not compute what the lowered module does on "
                f"example_inputs ({type(e).__name__}: {first}): its forward reads a pruned layer's weight outside "
                "the layer. Use fx_sparsity.lower(gm, backend) (it exports and saves) or to_model(gm)"
            ) from None


def sparsify_model(
    gm: fx.GraphModule,
    backend: BackendConfig = "auto",
    *,
    example_inputs: Any = None,
    model: nn.Module | None = None,
    repeats: int = 7,
    progress_bar: bool = True,
    decisions: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """A copy of the user's model, of its own class, whose pruned layers are sparse modules.

    Each masked weight gets the format :func:`fx_sparsity.lower` gives it (the
    same ``backend`` forms: one name for every layer, or per layer; ``"auto"``
    times each format on the layer's own input from ``example_inputs`` and keeps
    a sparse one only where it is faster), and every module of the user's class
    that reads it masked, a plain ``nn.Linear`` or a 1x1 unpadded ungrouped
    ``nn.Conv1d/2d/3d``, is replaced by a :class:`SparseLinear` /
    :class:`SparseConv2d` (1d, 3d) holding the packed buffers and calling the same
    ``fx_sparsity::*`` operator as the lowered graph. Weights that stay dense
    (``"fuse"``, or ``auto`` found no faster format) are ``weight * mask`` in the
    class's own layer, as :func:`to_model` gives them. A weight read by anything
    else (a functional ``F.linear`` in a ``forward``, a subclass with its own
    ``forward``, transformers' ``Conv1D`` storing it ``[in, out]``, a 3x3 conv) is
    fused too, as ``lower`` fuses what its kernels cannot run.

    The result keeps the class's methods (transformers' ``generate`` with its KV
    cache runs the sparse kernels), runs under ``torch.compile`` and
    ``torch.export``, and saves with :func:`fx_sparsity.deploy.save_sparse`.
    Tied weights stay tied: layers sharing a masked weight share one set of packed
    buffers, and a use that reads it dense (an embedding tied to a pruned head)
    keeps the dense tensor, as ``lower`` keeps it. Tensors pruning left unchanged
    are the user's own (shared); the user's model is not modified. With
    ``example_inputs``, the copy is checked to compute what the lowered module
    computes on them. The sparse layers are for inference: their packed weights
    get no gradient (unlike torch.ao.pruning's ``convert``, which keeps a
    trainable module).

    Args:
        gm: a module returned by :func:`fx_sparsity.prepare` (masks in place, stepped), captured by
            symbolic tracing or ``torch.export``.
        backend: as for :func:`fx_sparsity.lower` (``"fuse"``, ``"bitmask"``, ``"nm"``, ``"csr"``,
            ``"bsr"``, ``"semi_structured"``, ``"auto"``, or a per-layer config); not ``"shrink"``.
        example_inputs: inputs of the model (tensor, tuple or dict of keyword inputs); required by ``"auto"``.
        model: the model that was prepared; by default the one ``prepare`` kept a reference to.
        repeats, progress_bar, decisions: as for :func:`fx_sparsity.lower` (``decisions``: a file keeping
            ``auto``'s picks per layer kind and machine).

    Returns:
        A new module of ``type(model)``, in ``model``'s training mode.

    Raises:
        TypeError: ``gm`` is not a ``GraphModule`` or ``model`` not a module; a backend of the wrong type.
        ValueError: ``gm`` has no masks, is lowered or shrunk; a backend, block size or ``example_inputs`` is
            invalid or an explicit format cannot hold a layer here (as ``lower`` says); the model cannot be
            found or lacks a weight of ``gm``; the copy does not compute what the lowered module does.
            Raised before anything is returned.

    Example::

        >>> gm = fx_sparsity.prepare(model, sparsifier=WeightNormSparsifier(0.75))
        >>> fx_sparsity.get_sparsifier(gm).step()
        >>> sparse = sparsify_model(gm, "bitmask")
        >>> type(sparse).__name__, type(sparse[0]).__name__, type(model[0]).__name__
        ('Sequential', 'SparseLinear', 'Linear')
        >>> x = torch.randn(2, 64)
        >>> torch.testing.assert_close(sparse(x), gm(x))
    """
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"gm must be the GraphModule fx_sparsity.prepare returned, got {type(gm).__name__}")
    source = _source_model(gm, model)
    _check_not_packed(gm)
    if get_shrink(gm) is not None:
        raise ValueError("gm is shrunk: its layers are dense and smaller, not packed; use to_model(gm)")
    if isinstance(backend, str) and backend in MODEL_BACKENDS:
        raise ValueError(f"backend {backend!r} removes channels instead of packing weights: use "
                         f"fx_sparsity.lower(gm, {backend!r}) or fx_sparsity.shrink, then to_model")
    nodes = mask_nodes(gm)
    if not nodes:
        raise ValueError("gm has no mask nodes: sparsify_model takes the module prepare() returned, before "
                         "squash_mask() (use to_model for a squashed one)")
    requests = parse_backends(gm, backend)
    owners, _ = _sparse_owners(gm, source, nodes)
    config = [
        {"tensor_fqn": fqn, "backend": r.backend, **({"blocksize": r.blocksize} if r.blocksize else {})}
        for fqn, r in requests.items()
        if fqn in owners and r.backend != "fuse"
    ]
    lowered = lower(gm, config or "fuse", example_inputs=example_inputs, repeats=repeats, progress_bar=progress_bar,
                    decisions=decisions)
    records = {r.tensor_fqn: r for r in get_lowering(lowered)}
    _check_fused_names(lowered, [t for t in masked_targets(gm, nodes) if records[t.tensor_fqn].backend == "fuse"])
    changes = _replacements(source, lowered, by_module=not _exported(gm))
    pruned = clone_sharing_tensors(source)
    for fqns, tensor in changes:
        set_tensor(pruned, fqns, tensor)
    swaps: dict[int, nn.Module] = {}
    for fqn, record in records.items():
        if record.backend == "fuse":
            continue
        components = [lowered.get_buffer(f"{fqn}_{part}") for part in COMPONENT_NAMES[record.backend]]
        for module_fqn in owners[fqn]:
            dense = pruned.get_submodule(module_fqn)
            if id(dense) not in swaps:
                swaps[id(dense)] = _sparse_layer(dense, record.backend, components)
    _swap_modules(pruned, swaps)
    if example_inputs is not None:
        _check_computes(pruned, lowered, example_inputs)
    return pruned


def _float_dtype_outside_sparse_layers(model: nn.Module) -> torch.dtype:
    """The floating dtype of ``model``'s parameters outside its sparse layers (embeddings, norms) where they all
    share one, else float32: the dtype a quantized layer's dense weight takes when it has no bias to tell."""
    inside = {id(t) for m in model.modules() if isinstance(m, _SPARSE_CLASSES) for t in m.parameters()}
    dtypes = {p.dtype for p in model.parameters() if id(p) not in inside and p.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def densify_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose sparse layers are plain ``nn.Linear`` / ``nn.Conv`` layers again (weights rebuilt
    from the packed buffers, exactly), for tools that cannot run ours (``save_pretrained`` of a dense checkpoint,
    say). Layers sharing packed buffers share one dense weight; other tensors are the model's own. A quantized
    layer's weight is dequantized (``scale * (value - zero)``, in float32) and cast to the dtype the layer
    computes in: its bias's, else that of the model's other parameters (float32 where they differ).

    Raises:
        TypeError: ``model`` is not a module.

    Example::

        >>> dense = densify_model(nn.Sequential(SparseLinear.from_dense(nn.Linear(4, 2), "csr")))
        >>> type(dense[0]).__name__, tuple(dense[0].weight.shape)
        ('Linear', (2, 4))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    copy_ = clone_sharing_tensors(model)
    quantized_dtype = _float_dtype_outside_sparse_layers(copy_)
    weights: dict[int, nn.Parameter] = {}
    swaps: dict[int, nn.Module] = {}
    for module in copy_.modules():
        if not isinstance(module, _SPARSE_CLASSES) or id(module) in swaps:
            continue
        key = id(module.components[0])
        if key not in weights:
            dense_weight = module.dense_weight()
            if module.quantized:  # dequantized in float32: back to the dtype the layer computes in
                dense_weight = dense_weight.to(module.bias.dtype if module.bias is not None else quantized_dtype)
            weights[key] = nn.Parameter(dense_weight, requires_grad=False)
        dense_class = next(d for d, s in SPARSE_MODULES.items() if s is type(module))
        with torch.device("meta"):
            if dense_class is nn.Linear:
                dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            else:
                dense = dense_class(module.in_channels, module.out_channels, 1, stride=module.stride,
                                    bias=module.bias is not None)
        dense.weight = weights[key]
        dense.bias = module.bias
        dense.train(module.training)
        swaps[id(module)] = dense
    if isinstance(copy_, _SPARSE_CLASSES):
        return swaps[id(copy_)]
    _swap_modules(copy_, swaps)
    return copy_
