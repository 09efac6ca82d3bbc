"""Safetensors files without the safetensors package: headers read and checked entry by entry, tensors written
straight from their memory, every file written so that it exists only complete.

:func:`read_header` checks a file's whole header before any tensor is read (the header length against the file,
each entry's form, its bytes inside the file and equal to shape x dtype), so a truncated or corrupt file is refused
with its name and the tensor. :func:`write_atomic` writes under a temporary ``.partial`` name, syncs and renames
(then syncs the folder), so a killed writer never leaves a file a loader would take for finished.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch

__all__ = [
    "DTYPES",
    "DTYPE_NAMES",
    "MAX_HEADER_BYTES",
    "TensorEntry",
    "read_header",
    "read_index",
    "fsync_dir",
    "write_atomic",
    "write_shard",
    "tensor_records",
]

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit on a header's length
_ENTRY_FORM = "{'dtype': str, 'shape': [int, ...], 'data_offsets': [start, end]}"


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """Where one tensor of a checkpoint lies: its file, the absolute offset and length of its bytes, its header."""

    path: Path
    start: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]


def _is_ints(value: Any, length: int | None = None) -> bool:
    return (
        isinstance(value, list)
        and (length is None or len(value) == length)
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    )


def read_header(path: Path, what: str) -> dict[str, TensorEntry]:
    """The tensors of safetensors file ``path`` (``what`` names it in errors), every header entry checked."""

    def refuse(reason: str) -> ValueError:
        return ValueError(f"{what} is not a safetensors file: {reason}")

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise refuse(f"it has {size} bytes, fewer than the 8 of a header length")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(size - 8, MAX_HEADER_BYTES):
                raise refuse(f"its first 8 bytes give a header of {length} bytes, the file has {size} (at most 100 MB)")
            raw = f.read(length)
    except OSError as e:
        raise ValueError(f"{what} cannot be read: {e}") from e
    try:
        header = json.loads(raw)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise refuse(f"its header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise refuse(f"its header is a JSON {type(header).__name__}, not an object of tensor entries")
    header.pop("__metadata__", None)
    data = size - 8 - length
    entries: dict[str, TensorEntry] = {}
    for name, entry in header.items():
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("dtype"), str)
            and _is_ints(entry.get("shape"))
            and _is_ints(entry.get("data_offsets"), 2)
        ):
            raise refuse(f"tensor {name!r} has the entry {str(entry)[:120]}, not {_ENTRY_FORM}")
        start, end = entry["data_offsets"]
        if not start <= end <= data:
            raise refuse(f"tensor {name!r} has data_offsets {[start, end]} outside the file's {data} data bytes (truncated?)")
        dtype = DTYPES.get(entry["dtype"])
        if dtype is not None and end - start != math.prod(entry["shape"]) * dtype.itemsize:
            raise refuse(
                f"tensor {name!r} of shape {entry['shape']} and dtype {entry['dtype']} needs "
                f"{math.prod(entry['shape']) * dtype.itemsize} bytes, its data_offsets {[start, end]} hold {end - start}"
            )
        entries[name] = TensorEntry(path, 8 + length + start, end - start, entry["dtype"], tuple(entry["shape"]))
    return entries


def read_index(source: Path) -> dict[str, Path]:
    """The shard of each tensor that the sharded checkpoint index ``source`` lists."""
    what = f"source {str(source)!r}"
    try:
        index = json.loads(source.read_bytes())
    except ValueError as e:
        raise ValueError(f"{what} is not JSON ({e}): give a sharded checkpoint's *.index.json or a .safetensors file") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise ValueError(
            f"{what} has no 'weight_map' object (it is a JSON {type(index).__name__}"
            f"{' with keys ' + str(sorted(index))[:80] if isinstance(index, dict) else ''}): not a sharded safetensors index"
        )
    shards: dict[str, Path] = {}
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file:
            raise ValueError(f"{what}: weight_map gives tensor {name!r} the shard {file!r}, not a file name")
        path = source.parent / file
        if not path.is_file():
            raise FileNotFoundError(f"{what}: weight_map puts tensor {name!r} in {str(path)!r}, which is not a file")
        shards[name] = path
    return shards


def fsync_dir(directory: Path) -> None:
    """Make the renames and removals in ``directory`` durable (where the platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` so that it exists only complete: under a temporary ``.partial`` name beside it, synced,
    then renamed over it; on any error the temporary file is removed."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
    # os.open rather than tempfile.mkstemp: the file gets the umask's permissions, not mkstemp's 0600
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_shard(path: Path, records: Sequence[tuple[str, str, tuple[int, ...], torch.Tensor]]) -> int:
    """Write a safetensors file of ``(name, dtype name, shape, contiguous CPU tensor)`` records, each tensor's
    bytes straight from its memory; return the number of data bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape, tensor in records:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)

    def write(f: BinaryIO) -> None:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for *_, tensor in records:
            if tensor.numel():
                f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)

    write_atomic(path, write)
    return offset


def tensor_records(tensors: Mapping[str, torch.Tensor]) -> list[tuple[str, str, tuple[int, ...], torch.Tensor]]:
    records = []
    for name, tensor in tensors.items():
        if tensor.dtype not in DTYPE_NAMES:
            raise TypeError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store")
        records.append((name, DTYPE_NAMES[tensor.dtype], tuple(tensor.shape), tensor.detach().contiguous()))
    return records
