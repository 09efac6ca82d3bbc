"""Compressed checkpoints: a model holding sparse layers saved as packed tensors, and loaded back without its
dense weights ever existing.

:func:`save_sparse` writes a folder a Hugging Face user recognises::

    config.json                          transformers models: the model's config (architectures set)
    generation_config.json               transformers models that generate
    sparse-00001-of-00001.safetensors    every tensor once: packed components, dense tensors, small
                                         non-persistent buffers (rotary inv_freq, ...); shards of max_shard_bytes
    fx_sparsity.json                     written last: the format version, fx_sparsity and torch versions, the
                                         model class, each sparse layer (module, format, shape, dtype, stride,
                                         bias), each tensor (file, dtype, shape), tied names, each shard's size

There is no ``model.safetensors`` (or its index): ``from_pretrained`` refuses the folder instead of loading
Linears of random weights. :func:`load_sparse` builds the model on the meta device (a transformers class from
``config.json``; a plain ``nn.Module`` from the skeleton the caller passes: its class cannot be rebuilt from a
name without its constructor's arguments), swaps the sparse layers in, and reads each tensor from the shards
straight into its own memory (plain file reads, no memory map), so that the peak is the packed size, never the
dense one. Tied names are tied again.

Nothing is trusted: the metadata's version, every layer's format and shape, every shard's size (a truncated or
missing shard), every tensor's header entry, dtype and shape against the metadata, and every tensor against the
model (another model's checkpoint) are checked, and an error names the file and the tensor; a model is returned
only when every tensor of it came from the checkpoint. Writing follows the house rule for files: the previous
metadata is removed first, each shard is written under a temporary name, synced and renamed, and the metadata
comes last, so a killed save leaves a folder :func:`load_sparse` refuses.

A loading process needs ``import fx_sparsity`` (it registers the ``fx_sparsity::*`` operators the sparse
layers call; :func:`load_sparse` is in it), and ``transformers`` for a transformers model. The shards are plain
safetensors files (``safetensors.torch.load_file`` reads them), written and read by fx_sparsity's own
safetensors code (:mod:`fx_sparsity.calibration.streaming`): the ``safetensors`` package is not needed.

Example::

    >>> import tempfile
    >>> gm = fx_sparsity.prepare(model, sparsifier=WeightNormSparsifier(0.75))
    >>> fx_sparsity.get_sparsifier(gm).step()
    >>> sparse = sparsify_model(gm, "bitmask")
    >>> folder = save_sparse(sparse, tempfile.mkdtemp())
    >>> with torch.device("meta"):
    ...     skeleton = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    >>> loaded = load_sparse(folder, model=skeleton)
    >>> x = torch.randn(2, 64)
    >>> torch.equal(loaded(x), sparse(x))
    True
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fx_sparsity.calibration.streaming import SafetensorsWeights, write_safetensors
from fx_sparsity.deploy.modules import SPARSE_MODULES, SparseLinear, check_components, sparse_module_for
from fx_sparsity.deploy.resized import is_transformers_model
from fx_sparsity.utils.safetensors_files import fsync_dir, write_atomic
from passes import clone_sharing_tensors
from passes.lowering import COMPONENT_NAMES, LAYOUTS, QUANT_LAYOUTS
from passes.utils import get_tensor, set_tensor, split_fqn

__all__ = ["save_sparse", "load_sparse", "METADATA_NAME", "CHECKPOINT_FORMAT", "FORMAT_VERSION"]

METADATA_NAME = "fx_sparsity.json"
CHECKPOINT_FORMAT = "fx_sparsity.sparse_checkpoint"
# Bump on any change a loader of the previous version would misread.
FORMAT_VERSION = 1
_SHARD = re.compile(r"sparse-\d{5}-of-\d{5}\.safetensors")
_CONFIG_FILES = ("config.json", "generation_config.json")
_PARTIAL = re.compile(r"\..+\.partial")
_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16", torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip
_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
_SPARSE_CLASSES = {cls.__name__: cls for cls in SPARSE_MODULES.values()}
_LOADING_NEEDS = ("a loading process needs `import fx_sparsity` (it registers the fx_sparsity::* operators the "
                  "sparse layers call)")


def _version() -> str:
    return str(getattr(sys.modules.get("fx_sparsity"), "__version__", "unknown"))


# ----------------------------------------------------------------------------------------------------- writing
def _check_folder(folder: Path) -> None:
    """Refuse a folder whose files a save would overwrite or mix with (only a previous save's are replaced)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if existing == folder and not folder.is_dir():
        raise ValueError(f"path {str(folder)!r} is a file: give a folder for the checkpoint")
    if not existing.is_dir():
        raise ValueError(f"path {str(folder)!r} lies under {str(existing)!r}, which is a file: give a folder path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"path {str(folder)!r} is not writable: choose another folder")
    if existing != folder:
        return
    ours = {METADATA_NAME, *_CONFIG_FILES}
    foreign = sorted(f.name for f in folder.iterdir()
                     if f.name not in ours and not _SHARD.fullmatch(f.name) and not _PARTIAL.fullmatch(f.name))
    if foreign:
        raise ValueError(
            f"path {str(folder)!r} holds files a sparse checkpoint does not write ({', '.join(foreign[:4])}"
            f"{', ...' if len(foreign) > 4 else ''}): give a new or empty folder (a previous save_sparse folder "
            "is overwritten)"
        )


def _named_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """``(tensors, aliases, non_persistent)``: every tensor the model needs once under its first name (the
    state dict's persistent ones, then non-persistent buffers), each other name of it, and the non-persistent."""
    named: dict[str, torch.Tensor] = dict(model.state_dict(keep_vars=True))
    non_persistent = []
    for module_fqn, module in model.named_modules(remove_duplicate=False):
        for name in sorted(module._non_persistent_buffers_set):
            tensor = module._buffers.get(name)
            fqn = f"{module_fqn}.{name}" if module_fqn else name
            if isinstance(tensor, torch.Tensor) and fqn not in named:
                named[fqn] = tensor
                non_persistent.append(fqn)
    first: dict[int, str] = {}
    tensors, aliases = {}, {}
    for fqn, tensor in named.items():
        if id(tensor) in first:
            aliases[fqn] = first[id(tensor)]
        else:
            first[id(tensor)] = fqn
            tensors[fqn] = tensor
    return tensors, aliases, non_persistent


def _layer_record(module: nn.Module) -> dict[str, Any]:
    return {
        "module": type(module).__name__,
        "layout": module.layout,
        "shape": list(module.weight_shape),
        "dtype": str(module.weight_dtype).removeprefix("torch."),
        "stride": list(module.stride) if hasattr(module, "stride") else None,
        "bias": module.bias is not None,
    }


def _shards(tensors: Mapping[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def save_sparse(model: nn.Module, path: str | os.PathLike, *, max_shard_bytes: int = 4 << 30) -> Path:
    """Save ``model`` (with sparse layers from :func:`~fx_sparsity.deploy.sparsify_model`, or none) as a
    compressed checkpoint folder: packed tensors, not dense zeros (see the module docstring for the files).

    Args:
        model: the model; its tensors on any device (copied to CPU shard by shard), none on the meta device.
        path: the folder (created; a previous ``save_sparse`` folder is overwritten, any other file refused).
        max_shard_bytes: bytes of tensors per shard (a tensor larger than this gets a shard of its own).

    Returns:
        The folder's ``Path``.

    Raises:
        TypeError: ``model`` is not a module, a tensor's dtype has no safetensors name, ``max_shard_bytes``
            is not a positive int.
        ValueError: a tensor is on the meta device; ``path`` is a file, not writable, or holds other files.
            Raised before anything is written.

    Example::

        >>> import tempfile
        >>> sparse = nn.Sequential(SparseLinear.from_dense(nn.Linear(64, 64), "csr"))
        >>> folder = save_sparse(sparse, tempfile.mkdtemp())
        >>> sorted(p.name for p in folder.iterdir())
        ['fx_sparsity.json', 'sparse-00001-of-00001.safetensors']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise TypeError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a folder path, got {type(path).__name__}")
    folder = Path(path)
    tensors, aliases, non_persistent = _named_tensors(model)
    for name, tensor in tensors.items():
        if tensor.is_meta:
            raise ValueError(f"tensor {name} of {type(model).__name__} is on the meta device: it has no values to "
                             "save (load or compute the model first)")
        if tensor.dtype not in _DTYPE_NAMES:
            raise TypeError(f"tensor {name} has dtype {tensor.dtype}, which safetensors cannot store")
    _check_folder(folder)
    is_hf = is_transformers_model(model)
    config_files = {}
    if is_hf:
        config = model.config.__class__.from_dict(model.config.to_dict())  # a copy: the user's config unchanged
        config.architectures = [type(model).__name__]
        config_files["config.json"] = config.to_json_string().encode()
        generation = getattr(model, "generation_config", None)
        if generation is not None and model.can_generate():
            config_files["generation_config.json"] = generation.to_json_string().encode()
    layers = {fqn: _layer_record(m) for fqn, m in model.named_modules(remove_duplicate=False)
              if isinstance(m, tuple(_SPARSE_CLASSES.values()))}
    groups = _shards(tensors, max_shard_bytes)
    files = [f"sparse-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "format_version": FORMAT_VERSION,
        "fx_sparsity_version": _version(),
        "torch_version": torch.__version__,
        "model": {"class": type(model).__qualname__, "module": type(model).__module__, "transformers": is_hf},
        "layers": layers,
        "tensors": {},
        "aliases": aliases,
        "non_persistent": non_persistent,
        "files": {},
        "weight_map": {},
        "loading": _LOADING_NEEDS + (", and transformers" if is_hf else ""),
    }

    written: list[Path] = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / METADATA_NAME).unlink(missing_ok=True)  # first: until the new one is written, no checkpoint
        fsync_dir(folder)
        for old in folder.iterdir():
            if _SHARD.fullmatch(old.name) or _PARTIAL.fullmatch(old.name) or old.name in _CONFIG_FILES:
                old.unlink()
        for file, names in zip(files, groups):
            shard = {name: tensors[name].detach().cpu() for name in names}
            written.append(folder / file)
            write_safetensors(folder / file, shard)
            metadata["files"][file] = {"bytes": (folder / file).stat().st_size}
            for name, tensor in shard.items():
                metadata["tensors"][name] = {"file": file, "dtype": _DTYPE_NAMES[tensor.dtype],
                                             "shape": list(tensor.shape)}
                metadata["weight_map"][name] = file
        for file, data in config_files.items():
            written.append(folder / file)
            write_atomic(folder / file, lambda f, data=data: f.write(data))
        metadata_bytes = json.dumps(metadata, indent=1).encode()
        write_atomic(folder / METADATA_NAME, lambda f: f.write(metadata_bytes))
    except BaseException:
        for file in written:  # best effort: the error being handled is the one to report
            try:
                file.unlink(missing_ok=True)
            except OSError:
                pass
        raise
    return folder


# ----------------------------------------------------------------------------------------------------- reading
class _Refuse(ValueError):
    pass


def _read_metadata(folder: Path) -> dict[str, Any]:
    where = str(folder / METADATA_NAME)
    if not folder.is_dir():
        raise ValueError(f"path {str(folder)!r} is not a folder: give the folder save_sparse wrote")
    if not (folder / METADATA_NAME).is_file():
        raise ValueError(
            f"{str(folder)!r} has no {METADATA_NAME}: it is not a folder save_sparse wrote, or its save did not "
            "finish (the metadata is written last); save it again"
        )
    try:
        metadata = json.loads((folder / METADATA_NAME).read_bytes())
    except ValueError as e:
        raise ValueError(f"{where} is not JSON ({e}): save the model again") from e
    if not isinstance(metadata, dict) or metadata.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{where} is not the metadata of an fx_sparsity sparse checkpoint")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{where} was written by fx_sparsity {metadata.get('fx_sparsity_version', '?')} in checkpoint format "
            f"{version!r}; this fx_sparsity ({_version()}) reads format {FORMAT_VERSION} only: load it with the "
            "fx_sparsity version that wrote it (and save it dense with densify_model, or again with this one)"
        )
    for key, kind in (("layers", dict), ("tensors", dict), ("aliases", dict), ("non_persistent", list),
                      ("files", dict), ("weight_map", dict), ("model", dict)):
        if not isinstance(metadata.get(key), kind):
            raise ValueError(f"{where} has no {key!r} {kind.__name__}: the file is damaged; save the model again")
    for fqn, layer in metadata["layers"].items():
        if not isinstance(layer, dict) or layer.get("module") not in _SPARSE_CLASSES:
            module = layer.get("module") if isinstance(layer, dict) else layer
            raise ValueError(f"{where}: layer {fqn} is a {module!r}, which this fx_sparsity does not know "
                             f"(known: {', '.join(_SPARSE_CLASSES)})")
        if layer.get("layout") not in (*LAYOUTS, *QUANT_LAYOUTS):
            raise ValueError(f"{where}: layer {fqn} has the format {layer.get('layout')!r}, which this fx_sparsity "
                             f"does not know (known: {', '.join((*LAYOUTS, *QUANT_LAYOUTS))}); load it with the version that wrote it")
    for name, entry in metadata["tensors"].items():
        if not (isinstance(entry, dict) and entry.get("dtype") in _DTYPES and isinstance(entry.get("shape"), list)
                and entry.get("file") in metadata["files"]):
            raise ValueError(f"{where}: tensor {name} has the entry {str(entry)[:120]}, not "
                             "{'file': <a listed shard>, 'dtype': <a safetensors dtype>, 'shape': [...]}")
    return metadata


def _check_shards(folder: Path, metadata: dict[str, Any]) -> None:
    for file, entry in metadata["files"].items():
        path = folder / file
        if not _SHARD.fullmatch(file) or not path.is_file():
            raise ValueError(f"shard {str(path)!r} listed in {METADATA_NAME} is missing: the folder is incomplete; "
                             "copy it whole or save the model again")
        size = path.stat().st_size
        if not isinstance(entry, dict) or size != entry.get("bytes"):
            raise ValueError(f"shard {str(path)!r} has {size} bytes, {METADATA_NAME} says {entry.get('bytes')}: it is "
                             "truncated or was changed since it was saved; save the model again")


def _transformers_skeleton(folder: Path, metadata: dict[str, Any]) -> nn.Module:
    model_record = metadata["model"]
    name = model_record.get("class")
    if not model_record.get("transformers"):
        raise ValueError(
            f"{str(folder)!r} holds a plain nn.Module ({model_record.get('module')}.{name}), whose class cannot be "
            "rebuilt without its constructor's arguments: pass model=, the model built as it was (under "
            "`with torch.device('meta'):` to allocate nothing)"
        )
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"{str(folder)!r} holds a transformers {name}: pip install transformers "
                          f"({_LOADING_NEEDS})") from e
    cls = getattr(transformers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"{str(folder)!r} holds a transformers {name}, which this transformers "
                         f"({transformers.__version__}) lacks: install the version that has it, or pass model=")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{str(folder)!r} has no config.json to build its {name} from: pass model=")
    config = cls.config_class.from_pretrained(folder)
    with torch.device("meta"):
        skeleton = cls(config)
    if (folder / "generation_config.json").is_file() and hasattr(skeleton, "generation_config"):
        skeleton.generation_config = transformers.GenerationConfig.from_pretrained(folder)
    return skeleton


def _sparse_layers(skeleton: nn.Module, metadata: dict[str, Any], where: str) -> dict[int, nn.Module]:
    """The sparse layer (meta tensors, shapes from the metadata) for each layer module of ``skeleton``."""
    tensors, aliases = metadata["tensors"], metadata["aliases"]
    kind = type(skeleton).__name__
    shared: dict[str, torch.Tensor] = {}
    swaps: dict[int, nn.Module] = {}
    for fqn, layer in metadata["layers"].items():
        try:
            module = skeleton.get_submodule(fqn)
        except AttributeError:
            raise _Refuse(f"{where} has a sparse layer {fqn}, which {kind} lacks: it is a checkpoint of another "
                          "model") from None
        cls = _SPARSE_CLASSES[layer["module"]]
        if id(module) in swaps:
            continue
        found = type(module) if type(module) is cls else sparse_module_for(module)
        if found is not cls:
            what = found if isinstance(found, str) else f"a {type(module).__name__}"
            raise _Refuse(f"{where}: layer {fqn} is a {cls.__name__}, but {kind}.{fqn} is {what}: it is a checkpoint "
                          "of another model")
        shape = list(module.weight_shape) if isinstance(module, cls) else list(module.weight.shape)
        has_bias = module.bias is not None
        stride = list(module.stride) if cls is not SparseLinear else None
        if (shape, has_bias, stride) != (layer.get("shape"), layer.get("bias"), layer.get("stride")):
            raise _Refuse(
                f"{where}: layer {fqn} has weight shape {layer.get('shape')}, bias {layer.get('bias')}, stride "
                f"{layer.get('stride')}; {kind}.{fqn} has {shape}, {has_bias}, {stride}: a checkpoint of another model"
            )
        components = []
        for part in COMPONENT_NAMES[layer["layout"]]:
            name = f"{fqn}.weight_{part}"
            canonical = aliases.get(name, name)
            entry = tensors.get(canonical)
            if entry is None:
                raise _Refuse(f"{where}: layer {fqn} ({layer['layout']}) has no tensor {name}")
            if canonical not in shared:
                shared[canonical] = torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]], device="meta")
            components.append(shared[canonical])
        try:
            check_components(layer["layout"], shape[0], shape[1], components)
        except ValueError as e:
            raise _Refuse(f"{where}: layer {fqn}: {e}") from None
        bias = module.bias
        if cls is SparseLinear:
            swaps[id(module)] = cls(shape[1], shape[0], layer["layout"], components, bias)
        else:
            swaps[id(module)] = cls(shape[1], shape[0], layer["layout"], components, bias, tuple(stride))
    return swaps


def _swap(model: nn.Module, swaps: dict[int, nn.Module]) -> nn.Module:
    if id(model) in swaps:
        return swaps[id(model)]
    for fqn, module in list(model.named_modules(remove_duplicate=False)):
        new = swaps.get(id(module))
        if new is not None and fqn:
            parent, name = split_fqn(fqn)
            setattr(model.get_submodule(parent), name, new)
    return model


def _expected(skeleton: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(persistent, non_persistent)`` tensors of ``skeleton`` by FQN (every name)."""
    persistent = dict(skeleton.state_dict(keep_vars=True))
    non_persistent = {}
    for module_fqn, module in skeleton.named_modules(remove_duplicate=False):
        for name in module._non_persistent_buffers_set:
            tensor = module._buffers.get(name)
            if isinstance(tensor, torch.Tensor):
                non_persistent[f"{module_fqn}.{name}" if module_fqn else name] = tensor
    return persistent, non_persistent


def _check_fits(skeleton: nn.Module, metadata: dict[str, Any], where: str) -> None:
    """Every persistent tensor of ``skeleton`` in the checkpoint with its shape, and nothing else in it."""
    persistent, non_persistent = _expected(skeleton)
    tensors, aliases = metadata["tensors"], metadata["aliases"]
    stored = {**{n: n for n in tensors}, **aliases}
    kind = type(skeleton).__name__
    missing = sorted(n for n in persistent if n not in stored)
    missing += sorted(n for n, t in non_persistent.items() if t.is_meta and n not in stored)
    unexpected = sorted(n for n in stored if n not in persistent and n not in non_persistent)
    if missing or unexpected:
        parts = [f"lacks {', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''} of {kind}"] if missing else []
        if unexpected:
            parts.append(f"holds {', '.join(unexpected[:4])}{', ...' if len(unexpected) > 4 else ''}, which {kind} "
                         "lacks")
        raise _Refuse(f"{where} {' and '.join(parts)}: it is a checkpoint of another model (or of {kind} built with "
                      "another config)")
    for name, canonical in stored.items():
        tensor = persistent.get(name, non_persistent.get(name))
        entry = tensors.get(canonical)
        if entry is None:
            raise _Refuse(f"{where}: {name} is an alias of {canonical}, which the checkpoint does not hold")
        if list(tensor.shape) != entry["shape"]:
            raise _Refuse(f"{where}: tensor {canonical} (in {entry['file']}) has shape {entry['shape']}, {kind}.{name} "
                          f"has {list(tensor.shape)}: it is a checkpoint of another model")


def _meta_leftovers(model: nn.Module) -> list[str]:
    found = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    for fqn, module in model.named_modules():
        for name, value in vars(module).items():
            if isinstance(value, torch.Tensor) and value.is_meta and not name.startswith("_"):
                found.append(f"{fqn}.{name}" if fqn else name)
    return found


def _read_only(tensors: dict[str, torch.Tensor]) -> None:
    raise RuntimeError("internal error: the checkpoint reader was asked to write")


def load_sparse(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Load a folder :func:`save_sparse` wrote: the model's class with its sparse layers and tensors.

    The model is built on the meta device (no weight memory), its sparse layers swapped in with the shapes the
    metadata gives, then every tensor is read from the shards into its own memory (the packed size, never the
    dense one) and assigned, on the CPU (``.to(device)`` after); tied names are tied again. Everything is
    checked first (see the module docstring); the model is returned in eval mode.

    Args:
        path: the folder.
        model: a skeleton of the saved model (any device; build it under ``torch.device("meta")`` to allocate
            nothing); not modified. Needed for a plain ``nn.Module``; a transformers model is built from
            ``config.json`` when it is ``None``.

    Returns:
        A new module of the saved class.

    Raises:
        TypeError: ``model`` is not a module.
        ImportError: a transformers checkpoint without transformers installed (``pip install transformers``).
        ValueError: not a finished checkpoint (no ``fx_sparsity.json``), another format version, an unknown
            layer format, a missing or truncated shard, a header or tensor that disagrees with the metadata,
            a checkpoint of another model (a layer, a tensor or a shape the model lacks or disagrees with), a
            tensor of the model the checkpoint does not give; each names the file and the tensor.

    Example::

        >>> import tempfile
        >>> folder = save_sparse(nn.Sequential(SparseLinear.from_dense(nn.Linear(8, 4), "csr")), tempfile.mkdtemp())
        >>> with torch.device("meta"):
        ...     skeleton = nn.Sequential(nn.Linear(8, 4))
        >>> type(load_sparse(folder, model=skeleton)[0]).__name__
        'SparseLinear'
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be the folder save_sparse wrote, got {type(path).__name__}")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module skeleton of the saved model, got {type(model).__name__}")
    folder = Path(path)
    metadata = _read_metadata(folder)
    where = f"checkpoint {str(folder)!r}"
    _check_shards(folder, metadata)
    reader = SafetensorsWeights(folder / METADATA_NAME, out=_read_only)
    for name in reader.keys():
        if name not in metadata["tensors"]:
            raise ValueError(f"{where}: {metadata['weight_map'].get(name, 'a shard')} holds tensor {name}, which "
                             f"{METADATA_NAME} does not list: the folder was changed since it was saved")
    skeleton = _transformers_skeleton(folder, metadata) if model is None else clone_sharing_tensors(model)
    try:
        skeleton = _swap(skeleton, _sparse_layers(skeleton, metadata, where))
        _check_fits(skeleton, metadata, where)
    except _Refuse as e:
        raise ValueError(str(e)) from None
    loaded: dict[str, torch.Tensor] = {}
    for name, entry in metadata["tensors"].items():
        tensor = reader.load(name)
        if list(tensor.shape) != entry["shape"] or tensor.dtype != _DTYPES[entry["dtype"]]:
            raise ValueError(f"{where}: tensor {name} of {entry['file']} is {tensor.dtype} of shape "
                             f"{list(tensor.shape)} in its header, {METADATA_NAME} says {entry['dtype']} "
                             f"{entry['shape']}: the shard was changed since it was saved")
        loaded[name] = tensor
    names = {**{n: n for n in loaded}, **metadata["aliases"]}
    persistent, non_persistent = _expected(skeleton)
    state = {n: loaded[c] for n, c in names.items() if n in persistent}
    skeleton.load_state_dict(state, strict=True, assign=True)
    for name, canonical in names.items():
        if name in non_persistent:
            set_tensor(skeleton, [name], loaded[canonical])
    for fqns in _groups(metadata["aliases"]):  # assign made a parameter per name: one object per tie again
        set_tensor(skeleton, fqns[1:], get_tensor(skeleton, fqns[0]))
    leftovers = _meta_leftovers(skeleton)
    if leftovers:
        raise ValueError(
            f"{where} gives no values for {', '.join(leftovers[:4])} of {type(skeleton).__name__} (tensors its "
            "constructor made on the meta device outside the state dict): pass model= built with real values for them"
        )
    return skeleton.eval()


def _groups(aliases: Mapping[str, str]) -> list[list[str]]:
    """``[canonical, alias, ...]`` for each tensor stored once under several names."""
    groups: dict[str, list[str]] = {}
    for alias, canonical in aliases.items():
        groups.setdefault(canonical, [canonical]).append(alias)
    return list(groups.values())
