"""Models larger than memory: prepare on the meta device, stream each block's weights through pruning.

* :func:`fx_sparsity.calibration.meta_device.prepare_on_meta` prepares a model built
  on the meta device (no weight memory): the prepared module's weights and masks are
  meta tensors.
* :class:`SafetensorsWeights` reads tensors one at a time from a safetensors
  checkpoint (a file, or a sharded checkpoint's ``*.index.json``) with plain
  file reads, so that only the tensors read are resident (a memory map would
  leave every page it touched in the process), and writes the pruned tensors
  as shards of a new checkpoint (with a ``model.safetensors.index.json`` that
  ``transformers``' ``from_pretrained`` reads), or hands them to a callback.
* :class:`WeightStreamer` is what :func:`fx_sparsity.calibration.sequential.prune_sequential`
  does with them (``weights=``): before a stage runs, the tensors it reads are
  loaded (masks start as ones); after it ran, its weights, pruned (``weight *
  mask``, SparseGPT's updates included), are written and every tensor goes
  back to the meta device.

A run never loses data: every header of the checkpoint and the output folder
are checked before the first block; the output folder may not hold the source's
files; each shard is written under a temporary name, synced and renamed, an
earlier run's index is removed before the first shard and the new one written
last, and a failed run removes what it wrote. A killed run so leaves no index,
and at most a ``.partial`` file, which no loader takes for a checkpoint. The file
format itself (headers checked, atomic writes) is :mod:`fx_sparsity.utils.safetensors_files`.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import fx, nn

from fx_sparsity.calibration.meta_device import meta_like
from fx_sparsity.meta import get_sparsifier
from fx_sparsity.utils.safetensors_files import (
    DTYPES,
    TensorEntry,
    fsync_dir,
    read_header,
    read_index,
    tensor_records,
    write_atomic,
    write_shard,
)
from passes import get_sparse_target
from passes.calibration import Stage, stage_tensors
from passes.utils import fqns_read, set_tensor, split_fqn, tensor_aliases

__all__ = ["SafetensorsWeights", "WeightStreamer", "write_safetensors"]

INDEX_NAME = "model.safetensors.index.json"
_SHARD = re.compile(r"pruned-\d{5}\.safetensors")
_PARTIAL = re.compile(r"\.(pruned-\d{5}\.safetensors|model\.safetensors\.index\.json)\..+\.partial")


def _is_own_index(path: Path) -> bool:
    """Whether ``path`` is an index SafetensorsWeights wrote (every shard named ``pruned-NNNNN.safetensors``)."""
    try:
        weight_map = json.loads(path.read_bytes()).get("weight_map")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(weight_map, dict) and all(isinstance(f, str) and _SHARD.fullmatch(f) for f in weight_map.values())


class SafetensorsWeights:
    """A safetensors checkpoint read tensor by tensor, and where the pruned tensors go.

    Every header of the checkpoint is read and checked here (each tensor's
    entry, and that its bytes lie inside its file), so a corrupt or truncated
    checkpoint is refused before anything is pruned. A written tensor keeps the
    checkpoint's dtype: a float32 model over a bfloat16 checkpoint writes
    bfloat16 (pruned as ``weight * mask`` in the model's dtype, then cast), and
    the tensors no stage loads are copied byte for byte, whatever their dtype.

    The output directory is written so that only a finished run leaves a
    checkpoint there: an earlier run's index and ``pruned-*`` shards are
    removed before the first shard; each shard is written under a temporary
    ``.partial`` name, synced and renamed; the index comes last; a failed run
    (:meth:`abort`) removes its shards. A directory holding the source's files,
    or another checkpoint's (a ``model.safetensors``, which loaders read before
    an index), is refused. Unlike ``save_pretrained``, nothing but the weights
    is written: copy ``config.json`` and the tokenizer yourself.

    Args:
        source: a ``.safetensors`` file, or the ``*.index.json`` of a sharded checkpoint.
        out: a directory to write the pruned checkpoint into (shards
            ``pruned-00000.safetensors``, ... and ``model.safetensors.index.json``;
            every tensor of ``source`` is written, pruned or not), or a callable
            receiving each batch of finished tensors (``{name: tensor}``; a
            failed run has already handed over some: ``prune_sequential``
            raising is the sign to discard them).

    Raises:
        TypeError: ``source`` is not a path; ``out`` is neither a path nor a callable.
        FileNotFoundError: ``source``, or a shard its index lists, is not a file.
        ValueError: ``source`` (or a shard) is not a safetensors checkpoint:
            not JSON, no ``weight_map``, a header that is too long, not an
            object, or has a malformed entry, bytes outside the file, a tensor
            in two shards; ``out`` is a file, lies under one, is not writable,
            or holds the source's files or another checkpoint's.

    Example::

        >>> import pathlib, tempfile
        >>> directory = pathlib.Path(tempfile.mkdtemp())
        >>> write_safetensors(directory / "model.safetensors", model.state_dict())
        >>> weights = SafetensorsWeights(directory / "model.safetensors", out=directory / "pruned")
        >>> weights.load("0.weight").shape
        torch.Size([64, 64])
    """

    def __init__(self, source: str | Path, out: str | Path | Callable[[dict[str, torch.Tensor]], None]) -> None:
        if not isinstance(source, (str, os.PathLike)):
            raise TypeError(
                "source must be the path of a .safetensors file or of a sharded checkpoint's *.index.json, "
                f"got {type(source).__name__} {str(source)[:80]!r}"
            )
        source = Path(source)
        if not source.is_file():
            raise FileNotFoundError(f"source {str(source)!r} is not a file: give a .safetensors file or an *.index.json")
        shards = read_index(source) if source.name.endswith(".json") else {}
        self._entries: dict[str, TensorEntry] = {}
        for path in sorted(set(shards.values())) or [source]:
            what = f"shard {str(path)!r} of source {str(source)!r}" if shards else f"source {str(source)!r}"
            for name, entry in read_header(path, what).items():
                if name in self._entries:
                    raise ValueError(f"{what}: tensor {name!r} is also in {str(self._entries[name].path)!r}")
                self._entries[name] = entry
        for name, path in shards.items():
            if name not in self._entries or self._entries[name].path != path:
                raise ValueError(f"source {str(source)!r}: weight_map puts tensor {name!r} in {path.name}, whose header has no such tensor")
        self._sources = sorted({source, *shards.values()})
        if isinstance(out, (str, os.PathLike)):
            self._dir: Path | None = Path(out)
            self._callback = None
            self._check_out()
        elif callable(out):
            self._dir, self._callback = None, out
        else:
            raise TypeError(f"out must be a directory path or a callable taking {{name: tensor}}, got {type(out).__name__}")
        self._begun = False
        self._reset()

    def _reset(self) -> None:
        self.written: set[str] = set()
        self._weight_map: dict[str, str] = {}
        self._files: list[str] = []
        self._data_bytes = 0
        self._index_written = False

    def _check_out(self) -> None:
        """Refuse an output directory that cannot be written, or whose files a run would overwrite or mix with."""
        out = self._dir
        what = f"out {str(out)!r}"
        existing = next(p for p in (out, *out.parents) if p.exists())
        if existing == out and not out.is_dir():
            raise ValueError(f"{what} is a file: give a directory for the pruned checkpoint")
        if not existing.is_dir():
            raise ValueError(f"{what} lies under {str(existing)!r}, which is a file: give a directory path")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ValueError(f"{what} is not writable (this process may not create files in {str(existing)!r}): choose another directory")
        if existing != out:
            return
        target = out.resolve()
        held = [str(p) for p in self._sources if target in (p.parent.resolve(), p.resolve().parent)]
        if held:
            raise ValueError(
                f"{what} holds the source checkpoint's files ({held[:3]}): the pruned checkpoint would overwrite or "
                "sit beside them; give a new directory (and swap it in yourself once the run finished)"
            )
        foreign = sorted(f.name for f in out.iterdir() if f.name.endswith(".safetensors") and not _SHARD.fullmatch(f.name))
        if foreign or ((out / INDEX_NAME).exists() and not _is_own_index(out / INDEX_NAME)):
            raise ValueError(
                f"{what} holds another checkpoint ({(foreign or [INDEX_NAME])[:3]}): loaders would read it instead of, or "
                "mixed with, the pruned one; give an empty directory or remove those files"
            )

    def keys(self) -> list[str]:
        """The tensor names of the checkpoint."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def _read_bytes(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
        with open(entry.path, "rb") as f:
            f.seek(entry.start)
            if f.readinto(buffer.numpy()) != entry.nbytes:
                raise ValueError(f"{entry.path} ends inside tensor {name!r} (was it changed since it was opened?)")
        return buffer

    def load(self, name: str) -> torch.Tensor:
        """Read tensor ``name`` into new memory (a plain file read, no memory map)."""
        entry = self._entries[name]
        dtype = DTYPES.get(entry.dtype)
        if dtype is None:
            raise ValueError(f"tensor {name!r} of {entry.path} has dtype {entry.dtype}, which torch cannot read")
        return self._read_bytes(name).view(dtype).reshape(entry.shape)

    def _check_model(self, shapes: Mapping[str, tuple[str, tuple[int, ...]]], read: set[str]) -> None:
        """Refuse a checkpoint that does not fit the model, before anything is read: every tensor of ``shapes``
        (checkpoint name -> the model's FQN and shape) must have the model's shape; those of ``read`` (and, for a
        callback ``out``, all) a dtype torch reads."""
        problems = []
        for name, (fqn, shape) in shapes.items():
            entry = self._entries[name]
            if entry.shape != tuple(shape):
                problems.append(f"tensor {name!r} of {entry.path} has shape {entry.shape}, the model's {fqn} {tuple(shape)}")
        for name in sorted(read if self._callback is None else set(self._entries)):
            entry = self._entries[name]
            if entry.dtype not in DTYPES:
                problems.append(f"tensor {name!r} of {entry.path} has dtype {entry.dtype}, which torch cannot read")
        if problems:
            raise ValueError(f"the checkpoint does not fit the model: {'; '.join(problems[:5])}" + (" ..." if len(problems) > 5 else ""))

    def begin(self) -> None:
        """Start a run: check ``out`` again, create it and remove an earlier run's output (index first)."""
        self._reset()
        if self._dir is not None:
            self._check_out()
            try:
                self._dir.mkdir(parents=True, exist_ok=True)
                (self._dir / INDEX_NAME).unlink(missing_ok=True)
                fsync_dir(self._dir)
                for file in self._dir.iterdir():
                    if _SHARD.fullmatch(file.name) or _PARTIAL.fullmatch(file.name):
                        file.unlink()
            except OSError as e:
                raise ValueError(f"out {str(self._dir)!r} cannot be written: {e}") from e
        self._begun = True

    def _stored(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        entry = self._entries.get(name)
        dtype = DTYPES.get(entry.dtype) if entry is not None else None
        tensor = tensor.detach()
        return (tensor if dtype is None else tensor.to(dtype)).contiguous()

    def _write(self, records: Sequence[tuple[str, str, tuple[int, ...], torch.Tensor]]) -> None:
        name = f"pruned-{len(self._files):05d}.safetensors"
        self._files.append(name)
        self._data_bytes += write_shard(self._dir / name, records)
        self._weight_map.update(dict.fromkeys((r[0] for r in records), name))

    def save(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Write ``tensors`` (one shard, or one callback call), each in the checkpoint's dtype."""
        if not tensors:
            return
        if not self._begun:
            self.begin()
        tensors = {k: self._stored(k, v) for k, v in tensors.items()}
        if self._callback is not None:
            self._callback(tensors)
        else:
            self._write(tensor_records(tensors))
        self.written.update(tensors)

    def _copy(self, names: list[str]) -> None:
        if not names:
            return
        if self._callback is not None:
            self._callback({n: self.load(n) for n in names})
        else:
            self._write([(n, self._entries[n].dtype, self._entries[n].shape, self._read_bytes(n)) for n in names])
        self.written.update(names)

    def close(self, chunk_bytes: int) -> None:
        """Copy the tensors not written yet (in shards of about ``chunk_bytes``), then write the index."""
        if not self._begun:
            self.begin()
        chunk: list[str] = []
        size = 0
        for name in self.keys():
            if name in self.written:
                continue
            chunk.append(name)
            size += self._entries[name].nbytes
            if size >= chunk_bytes:
                self._copy(chunk)
                chunk, size = [], 0
        self._copy(chunk)
        if self._dir is not None:
            index = {"metadata": {"total_size": self._data_bytes}, "weight_map": dict(sorted(self._weight_map.items()))}
            self._index_written = True
            encoded = json.dumps(index, indent=2).encode()
            write_atomic(self._dir / INDEX_NAME, lambda f: f.write(encoded))
        self._begun = False

    def abort(self) -> None:
        """End a failed run: remove what it wrote to ``out`` (its index if it got that far, then its shards)."""
        if self._dir is not None:
            for name in [INDEX_NAME] * self._index_written + self._files:
                try:
                    (self._dir / name).unlink(missing_ok=True)
                except OSError:  # best effort: the error being handled is the one to report
                    pass
            fsync_dir(self._dir)
        self._reset()
        self._begun = False


def write_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write ``tensors`` (CPU) to a safetensors file, straight from their memory, so that it exists only complete.

    ``safetensors.torch.save_file`` first copies every tensor into a Python
    ``bytes``; this writes the header and then each tensor's bytes, so that
    writing a block costs no second copy of it. The file is written under a
    temporary name beside ``path``, synced, and renamed to ``path``.

    Raises:
        TypeError: a tensor's dtype has no safetensors name.

    Example::

        >>> import pathlib, tempfile
        >>> from safetensors.torch import load_file
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "x.safetensors"
        >>> write_safetensors(path, {"w": torch.ones(2, 2)})
        >>> load_file(str(path))["w"].sum().item()
        4.0
    """
    write_shard(Path(path), tensor_records(tensors))


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _release_heap() -> None:
    """Give the memory of the tensors just freed back to the OS (glibc's ``malloc_trim``, where there is one).

    glibc serves allocations below its mmap threshold from a heap, and raises
    that threshold to the size of the largest block freed so far: after the
    first block, a block's tensors land in the heap, whose free pages stay
    resident and fragment, so without a trim the peak grows well past one block.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _get(module: nn.Module, fqn: str) -> torch.Tensor:
    owner, name = split_fqn(fqn)
    return getattr(module.get_submodule(owner), name)


class WeightStreamer:
    """Loads each stage's tensors into ``gm`` before it runs and writes and unloads them after.

    Built (and everything checked) before the first stage runs; used by
    :func:`fx_sparsity.calibration.sequential.prune_sequential`. Only the
    tensors it loaded are written from ``gm`` and put back on the meta device;
    the checkpoint's others are copied from it at the end.

    Raises:
        ValueError: a masked weight of ``gm`` is a real tensor (a module
            prepared in memory: streaming is for :func:`prepare_on_meta`'s); a
            meta tensor a stage reads is not in the checkpoint under any of its
            names; a checkpoint tensor has another shape than the model's, or a
            dtype torch cannot read; a masked weight is also read unmasked (its
            pruned version cannot be written back for both uses).
    """

    def __init__(self, gm: fx.GraphModule, store: SafetensorsWeights, stages: Sequence[Stage]) -> None:
        self.gm, self.store = gm, store
        sparsifier = get_sparsifier(gm)
        self._masked = {g["tensor_fqn"]: g for g in sparsifier.groups}
        real = [f for f in self._masked if not _get(gm, f).is_meta]
        if real:
            raise ValueError(
                f"weights= streams a module prepared on the meta device, but gm's {real[0]}"
                f"{f' (and {len(real) - 1} more masked weights)' if len(real) > 1 else ''} is a real tensor: streaming "
                "would prune it in place and leave gm on the meta device. For a module in memory call "
                "prune_sequential(gm, batches) without weights=; for one larger than memory build the model under "
                "torch.device('meta') and prepare it with fx_sparsity.calibration.prepare_on_meta"
            )
        self._aliases = {}
        for aliases in tensor_aliases(gm).values():
            for a in aliases:
                self._aliases[a] = aliases
        self._tensors = [stage_tensors(gm, s) for s in stages]
        missing, read = [], set()
        for fqns in self._tensors:
            for fqn in fqns:
                if self._is_mask(fqn) or fqn not in self._aliases or not _get(gm, fqn).is_meta:
                    continue
                key = self._key(fqn)
                if key is None:
                    missing.append(fqn)
                else:
                    read.add(key)
        if missing:
            raise ValueError(
                f"{sorted(set(missing))[:5]} are on the meta device and not in the checkpoint under any of their "
                "names: materialise them on the model before preparing (non-persistent buffers, such as rotary "
                "inv_freq, are not saved in checkpoints; prepare_on_meta computes them with the model's own init "
                "where it has one, transformers' _init_weights, and leaves the others to you)"
            )
        shapes = {}
        for fqn, tensor in [*gm.named_parameters(), *gm.named_buffers()]:
            key = self._key(fqn)
            if tensor.is_meta and not self._is_mask(fqn) and key is not None:
                shapes[key] = (fqn, tuple(tensor.shape))
        store._check_model(shapes, read)
        muls = [n for n in gm.graph.nodes if (t := get_sparse_target(n)) is not None and t.role == "mask_mul"]
        for fqn in self._masked:
            mul = [n for n in muls if get_sparse_target(n).tensor_fqn == fqn]
            unmasked = fqns_read(gm, self._aliases.get(fqn, [fqn]), skip=[i for m in mul for i in m.all_input_nodes])
            if unmasked:
                raise ValueError(
                    f"{fqn} is masked but also read unmasked as {sorted(unmasked)} (a tied weight): its pruned "
                    "version cannot be written back for both uses; exclude it from the config"
                )
        self.loaded_bytes = self.peak_loaded_bytes = 0
        self._loaded: list[str] = []

    def _key(self, fqn: str) -> str | None:
        return next((a for a in self._aliases.get(fqn, [fqn]) if a in self.store), None)

    def _is_mask(self, fqn: str) -> bool:
        return fqn.endswith("_mask") and fqn[: -len("_mask")] in self._masked

    def begin(self) -> None:
        """Prepare the output (checked again, an earlier run's output there removed); call before the first stage."""
        self.store.begin()

    def load(self, index: int) -> None:
        """Materialise the tensors stage ``index`` reads (masks as ones); ``loaded_bytes`` says how much."""
        total = 0
        for fqn in self._tensors[index]:
            tensor = _get(self.gm, fqn)
            if not isinstance(tensor, torch.Tensor) or not tensor.is_meta:
                continue
            if self._is_mask(fqn):
                real = torch.ones(tensor.shape, dtype=tensor.dtype)
            else:
                key = self._key(fqn)
                real = self.store.load(key)
                if tuple(real.shape) != tuple(tensor.shape):
                    raise ValueError(f"checkpoint tensor {key!r} has shape {tuple(real.shape)}, the model's {fqn} has {tuple(tensor.shape)}")
                real = real.to(tensor.dtype)
            if isinstance(tensor, nn.Parameter):
                real = nn.Parameter(real, tensor.requires_grad)
            set_tensor(self.gm, self._aliases.get(fqn, [fqn]), real)
            self._loaded.append(fqn)
            total += real.nbytes
        self.loaded_bytes = total
        self.peak_loaded_bytes = max(self.peak_loaded_bytes, total)

    def release(self, index: int) -> None:
        """Write the weights stage ``index`` loaded (pruned), unless written already, then unload them."""
        done: dict[str, torch.Tensor] = {}
        for fqn in self._loaded:
            key = self._key(fqn)
            if self._is_mask(fqn) or key in self.store.written or key in done:
                continue
            tensor = _get(self.gm, fqn)
            if fqn in self._masked:  # the loaded copy (or SparseGPT's own) goes right after: prune in place
                tensor.detach().mul_(_get(self.gm, fqn + "_mask"))
            done[key] = tensor
        self.store.save(done)
        self._unload()

    def _unload(self) -> None:
        for fqn in self._loaded:
            tensor = _get(self.gm, fqn)
            if not tensor.is_meta:
                set_tensor(self.gm, self._aliases.get(fqn, [fqn]), meta_like(tensor))
        self._loaded = []
        _release_heap()

    def finish(self) -> None:
        """Copy the checkpoint's other tensors to the output and close it (the index last)."""
        self.store.close(max(self.peak_loaded_bytes, 1 << 26))

    def abort(self) -> None:
        """After a failed stage: put what is loaded back on the meta device and remove what was written."""
        self._unload()
        self.store.abort()
