"""Models larger than memory: prepare on the meta device, stream each block's weights through pruning.

* :func:`prepare_on_meta` prepares a model built on the meta device (no weight
  memory): the prepared module's weights and masks are meta tensors.
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
"""

from __future__ import annotations

import copy
import ctypes
import functools
import json
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode

from fx_sparsity.meta import get_sparsifier
from fx_sparsity.preparation import prepare
from fx_sparsity.sparsifier.base import BaseSparsifier
from passes import get_sparse_target
from passes.calibration import Stage, stage_tensors
from passes.utils import fqns_read, set_tensor, split_fqn, tensor_aliases

__all__ = ["SafetensorsWeights", "WeightStreamer", "prepare_on_meta", "write_safetensors"]

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
INDEX_NAME = "model.safetensors.index.json"


def _header(path: Path) -> tuple[int, dict[str, Any]]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


class SafetensorsWeights:
    """A safetensors checkpoint read tensor by tensor, and where the pruned tensors go.

    Args:
        source: a ``.safetensors`` file, or the ``*.index.json`` of a sharded checkpoint.
        out: a directory to write the pruned checkpoint into (shards
            ``pruned-00000.safetensors``, ... and ``model.safetensors.index.json``;
            every tensor of ``source`` is written, pruned or not), or a callable
            receiving each batch of finished tensors (``{name: tensor}``).

    Raises:
        FileNotFoundError / ValueError: ``source`` is missing or not a safetensors checkpoint.
        TypeError: ``out`` is neither a path nor a callable.

    Example::

        >>> import pathlib, tempfile
        >>> directory = pathlib.Path(tempfile.mkdtemp())
        >>> write_safetensors(directory / "model.safetensors", model.state_dict())
        >>> weights = SafetensorsWeights(directory / "model.safetensors", out=directory / "pruned")
        >>> weights.load("0.weight").shape
        torch.Size([64, 64])
    """

    def __init__(self, source: str | Path, out: str | Path | Callable[[dict[str, torch.Tensor]], None]) -> None:
        source = Path(source)
        if not source.is_file():
            raise FileNotFoundError(f"source {str(source)!r} is not a file: give a .safetensors file or an *.index.json")
        if source.name.endswith(".json"):
            weight_map = json.loads(source.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{source} has no 'weight_map': not a sharded safetensors index")
            files = {name: source.parent / file for name, file in weight_map.items()}
        else:
            files = None
        self._entries: dict[str, tuple[Path, int, dict[str, Any]]] = {}
        for path in sorted(set(files.values())) if files else [source]:
            try:
                offset, header = _header(path)
            except (OSError, ValueError, struct.error) as e:
                raise ValueError(f"{path} is not a safetensors file: {e}") from e
            for name, entry in header.items():
                self._entries[name] = (path, offset, entry)
        if isinstance(out, (str, Path)):
            self._dir: Path | None = Path(out)
            self._callback = None
        elif callable(out):
            self._dir, self._callback = None, out
        else:
            raise TypeError(f"out must be a directory path or a callable taking {{name: tensor}}, got {type(out).__name__}")
        self._weight_map: dict[str, str] = {}
        self.written: set[str] = set()

    def keys(self) -> list[str]:
        """The tensor names of the checkpoint."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def load(self, name: str) -> torch.Tensor:
        """Read tensor ``name`` into new memory (a plain file read, no memory map)."""
        path, offset, entry = self._entries[name]
        start, end = entry["data_offsets"]
        buffer = torch.empty(end - start, dtype=torch.uint8)
        with open(path, "rb") as f:
            f.seek(offset + start)
            if f.readinto(buffer.numpy()) != end - start:
                raise ValueError(f"{path} ends inside tensor {name!r}")
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"tensor {name!r} has dtype {entry['dtype']}, which torch cannot read")
        return buffer.view(dtype).reshape(entry["shape"])

    def save(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Write ``tensors`` (one shard, or one callback call)."""
        if not tensors:
            return
        tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
        self.written.update(tensors)
        if self._callback is not None:
            self._callback(tensors)
            return
        self._dir.mkdir(parents=True, exist_ok=True)
        name = f"pruned-{len(set(self._weight_map.values())):05d}.safetensors"
        write_safetensors(self._dir / name, tensors)
        self._weight_map.update(dict.fromkeys(tensors, name))

    def close(self, chunk_bytes: int) -> None:
        """Copy the tensors not written yet (in shards of about ``chunk_bytes``) and write the index."""
        chunk: dict[str, torch.Tensor] = {}
        for name in self.keys():
            if name in self.written:
                continue
            chunk[name] = self.load(name)
            if sum(t.nbytes for t in chunk.values()) >= chunk_bytes:
                self.save(chunk)
                chunk = {}
        self.save(chunk)
        if self._dir is not None:
            total = sum(
                (e[2]["data_offsets"][1] - e[2]["data_offsets"][0]) for n, e in self._entries.items() if n in self.written
            )
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(self._weight_map.items()))}
            (self._dir / INDEX_NAME).write_text(json.dumps(index, indent=2))


def write_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write ``tensors`` (contiguous, CPU) to a safetensors file, straight from their memory.

    ``safetensors.torch.save_file`` first copies every tensor into a Python
    ``bytes``; this writes the header and then each tensor's bytes, so that
    writing a block costs no second copy of it.

    Example::

        >>> import pathlib, tempfile
        >>> from safetensors.torch import load_file
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "x.safetensors"
        >>> write_safetensors(path, {"w": torch.ones(2, 2)})
        >>> load_file(str(path))["w"].sum().item()
        4.0
    """
    names = {dtype: name for name, dtype in _DTYPES.items()}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, tensor in tensors.items():
        if tensor.dtype not in names:
            raise TypeError(f"tensor {key!r} has dtype {tensor.dtype}, which safetensors cannot store")
        header[key] = {"dtype": names[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for tensor in tensors.values():
            if tensor.numel():
                f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)


def prepare_on_meta(
    model: nn.Module, config: Any = None, *, sparsifier: BaseSparsifier | None = None, **kwargs: Any
) -> fx.GraphModule:
    """``prepare`` for a model whose parameters are on the meta device (no weight memory).

    Capture refuses meta tensors (it needs real weights for ``torch.export``),
    so a copy of ``model`` (meta tensors cost nothing to copy) gets fake tensors
    in their place (``torch._subclasses.FakeTensorMode``: shapes without data)
    and is captured by symbolic tracing; the prepared module's tensors, masks
    included, are then put on the meta device. Tensors already real in
    ``model`` (a non-persistent buffer the user materialised) stay shared.
    Give the result to ``prune_sequential(..., weights=SafetensorsWeights(...))``.

    Args:
        model: the module, built under ``torch.device("meta")`` (it is not modified).
        config, sparsifier, kwargs: as for :func:`fx_sparsity.prepare`;
            ``capture_method`` must be ``"symbolic_trace"`` (the default here).

    Returns:
        The prepared ``GraphModule``, its weights and masks on the meta device.

    Raises:
        ValueError: ``model`` has no meta tensor, or another capture method is asked for.

    Example::

        >>> with torch.device("meta"):
        ...     big = nn.Sequential(nn.Linear(8192, 8192), nn.ReLU(), nn.Linear(8192, 8192))  # 512 MiB, none used
        >>> gm = prepare_on_meta(big, sparsifier=fx_sparsity.WandaSparsifier(0.5))
        >>> gm.get_parameter("0.weight").is_meta, gm.get_buffer("0.weight_mask").is_meta
        (True, True)
    """
    method = kwargs.pop("capture_method", "symbolic_trace")
    if method != "symbolic_trace":
        raise ValueError(f"prepare_on_meta captures by symbolic tracing only, got capture_method={method!r}")
    if not any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise ValueError("model has no tensor on the meta device: use fx_sparsity.prepare")
    clone = copy.deepcopy(model)
    mode = FakeTensorMode()
    for aliases in tensor_aliases(clone).values():
        tensor = _get(clone, aliases[0])
        if tensor.is_meta:
            with mode:
                fake = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
            set_tensor(clone, aliases, nn.Parameter(fake, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else fake)
    gm = prepare(clone, config, sparsifier=sparsifier, capture_method="symbolic_trace", **kwargs)
    for aliases in tensor_aliases(gm).values():
        tensor = _get(gm, aliases[0])
        if isinstance(tensor, torch._subclasses.fake_tensor.FakeTensor):
            set_tensor(gm, aliases, _meta_like(tensor))
    return gm


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


def _meta_like(tensor: torch.Tensor) -> torch.Tensor:
    meta = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
    return nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta


class WeightStreamer:
    """Loads each stage's tensors into ``gm`` before it runs and writes and unloads them after.

    Built (and everything checked) before the first stage runs; used by
    :func:`fx_sparsity.calibration.sequential.prune_sequential`.

    Raises:
        ValueError: a meta tensor a stage reads is not in the checkpoint under
            any of its names; a masked weight is also read unmasked (its pruned
            version cannot be written back for both uses).
    """

    def __init__(self, gm: fx.GraphModule, store: SafetensorsWeights, stages: Sequence[Stage]) -> None:
        self.gm, self.store = gm, store
        sparsifier = get_sparsifier(gm)
        self._masked = {g["tensor_fqn"]: g for g in sparsifier.groups}
        self._aliases = {}
        for aliases in tensor_aliases(gm).values():
            for a in aliases:
                self._aliases[a] = aliases
        self._tensors = [stage_tensors(gm, s) for s in stages]
        masks = {f + "_mask" for f in self._masked}
        missing = []
        for fqns in self._tensors:
            for fqn in fqns:
                if fqn in masks or fqn not in self._aliases or not _get(gm, fqn).is_meta:
                    continue
                if self._key(fqn) is None:
                    missing.append(fqn)
        if missing:
            raise ValueError(
                f"{sorted(set(missing))[:5]} are on the meta device and not in the checkpoint under any of their "
                "names: materialise them on the model before preparing (non-persistent buffers such as "
                "rotary inv_freq are not saved in checkpoints)"
            )
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

    def _key(self, fqn: str) -> str | None:
        return next((a for a in self._aliases.get(fqn, [fqn]) if a in self.store), None)

    def load(self, index: int) -> None:
        """Materialise the tensors stage ``index`` reads (masks as ones); ``loaded_bytes`` says how much."""
        total = 0
        for fqn in self._tensors[index]:
            tensor = _get(self.gm, fqn)
            if not isinstance(tensor, torch.Tensor) or not tensor.is_meta:
                continue
            if fqn.endswith("_mask") and fqn[: -len("_mask")] in self._masked:
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
            total += real.nbytes
        self.loaded_bytes = total
        self.peak_loaded_bytes = max(self.peak_loaded_bytes, total)

    def release(self, index: int) -> None:
        """Write stage ``index``'s tensors that are final (pruned weights, ones no later stage prunes), then unload."""
        done: dict[str, torch.Tensor] = {}
        for fqn in self._tensors[index]:
            tensor = _get(self.gm, fqn)
            if not isinstance(tensor, torch.Tensor) or tensor.is_meta:
                continue
            key = self._key(fqn)
            if key is not None and key not in self.store.written and key not in done:
                if fqn in self._masked:  # the loaded copy (or SparseGPT's own) goes right after: prune in place
                    tensor.detach().mul_(_get(self.gm, fqn + "_mask"))
                done[key] = tensor
        self.store.save(done)
        for fqn in self._tensors[index]:
            tensor = _get(self.gm, fqn)
            if isinstance(tensor, torch.Tensor) and not tensor.is_meta and (self._key(fqn) is not None or fqn.endswith("_mask")):
                set_tensor(self.gm, self._aliases.get(fqn, [fqn]), _meta_like(tensor))
        _release_heap()

    def finish(self) -> None:
        """Copy the checkpoint's other tensors to the output and close it."""
        self.store.close(max(self.peak_loaded_bytes, 1 << 26))
