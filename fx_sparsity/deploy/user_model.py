"""``to_model``: the pruned weights back in a copy of the user's own model class.

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
"""

from __future__ import annotations

import copy
import difflib
import warnings

import torch
from torch import fx, nn

from fx_sparsity.meta import clone_without_sparsifier, get_shrink, get_source_model
from fx_sparsity.utils.frames import caller_stacklevel
from fx_sparsity.utils.running import as_model_inputs, eval_mode
from passes import clone_sharing_tensors, get_capture, masked_targets
from passes.lowering import SPARSE_OPS
from passes.masking import fuse_masks
from passes.utils import get_tensor, set_tensor, tensor_aliases

__all__ = ["to_model"]
_SPARSE_OP_TARGETS = frozenset(SPARSE_OPS.values())


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
    if _exported(gm):
        raise ValueError(
            "to_model of a shrunk module needs a symbolically traced capture: a torch.export capture keeps no "
            f"module of {type(source).__name__}'s classes to swap in. Use the shrunk GraphModule itself"
        )
    inputs = get_shrink(gm).example_inputs
    if inputs is None:
        raise ValueError("the shrunk module no longer knows the pruner's example inputs to check the copy on "
                         "(they are kept in gm.meta); shrink the prepared module again")
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
    a size in an attribute or config its forward reads.

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
