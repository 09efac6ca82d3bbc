"""``auto``'s picks kept in a file, per layer and machine: ``lower(gm, "auto", decisions=path)``.

Timing decides ``auto``'s format for each layer, and on a shared machine two runs can time two formats of the
same bytes in opposite order. With ``decisions=path`` a pick is made once per layer *kind* and machine and
reused: a layer whose weight shape and dtype, mask density (to 1%), inputs (shapes and dtypes of the recorded
calls), candidate formats, block size, quantization bits and timing regime match one decided before, on a
machine with the same CPU model, kernel ISA, thread count, torch and fx_sparsity versions, gets the same format
without being timed against the others. Anything else is timed as usual and its pick added. A file copied to
another machine, or kept across a torch upgrade, therefore never hands over a pick it was not measured for.

The file is JSON (``{"format": "fx_sparsity auto decisions", "version": 1, "machines": {machine: {layer:
{"backend": ..., "note": ...}}}}``), written to a temporary name and renamed, so that a killed run leaves the
old file or the new one, never half of one. Delete it (or a machine's entry) to time everything again.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from fx_sparsity.lowering.timing import LayerTimer
from passes.lowering import native_isa

__all__ = ["DECISIONS_VERSION", "Decisions", "layer_key", "machine_key"]

DECISIONS_VERSION = 1
_FORMAT = "fx_sparsity auto decisions"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key() -> str:
    """What a pick depends on besides the layer: CPU model, kernel ISA, threads, torch and fx_sparsity versions.

    Example::

        >>> f"threads={torch.get_num_threads()}" in machine_key()
        True
    """
    version = getattr(sys.modules.get("fx_sparsity"), "__version__", "unknown")  # the package imports this module
    return (f"{_cpu_model()} | isa={native_isa()} | threads={torch.get_num_threads()} | torch={torch.__version__} | "
            f"fx_sparsity={version}")


def _describe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return [list(value.shape), str(value.dtype).removeprefix("torch.")]
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return type(value).__name__


def layer_key(layer: LayerTimer, candidates: Iterable[str], blocksize: tuple[int, int] | None,
              record_bits: int | None) -> str:
    """The layer's kind, as far as ``auto``'s pick goes: weight shape and dtype, mask density to 1%, the recorded
    calls (op, argument shapes and dtypes), the candidate formats, block size, quantization bits, timing regime."""
    mask = layer.mask
    density = round(float(mask.count_nonzero()) / max(mask.numel(), 1), 2)
    calls = [[str(op), _describe(args), {k: _describe(v) for k, v in sorted(kwargs.items())}]
             for op, args, kwargs in layer.calls]
    key = {
        "weight": _describe(layer.weight), "density": density, "calls": calls, "candidates": sorted(candidates),
        "blocksize": list(blocksize) if blocksize else None, "bits": record_bits,
        "regime": "streaming" if layer.cold else "warm",
    }
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


class Decisions:
    """The picks of a decisions file for this machine; :meth:`save` writes them back with the other machines'.

    Raises:
        TypeError: ``path`` is not a path.
        ValueError: ``path`` is a folder, or a file that is not a decisions file of this version (naming it:
            delete it, or give another path). Nothing is written then.

    Example::

        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "auto.json"
        >>> decisions = Decisions(path)
        >>> decisions.put("layer", "bitmask", "auto: bitmask 1.50x vs fused")
        >>> decisions.save()
        >>> Decisions(path).get("layer")
        'bitmask'
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise TypeError(f"decisions must be a path to a JSON file (e.g. 'auto_decisions.json'), got {path!r:.60}")
        self.path = Path(path)
        self.machine = machine_key()
        self._machines: dict[str, dict[str, dict[str, str]]] = {}
        self._added = False
        if self.path.is_dir():
            raise ValueError(f"decisions {str(self.path)!r} is a folder: give a file path, e.g. {str(self.path / 'auto.json')!r}")
        if self.path.exists():
            self._machines = self._read()

    def _read(self) -> dict[str, dict[str, dict[str, str]]]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"decisions file {str(self.path)!r} cannot be read as JSON ({e}): delete it or give "
                             "another path") from None
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ValueError(f"{str(self.path)!r} is not an fx_sparsity decisions file: give another path (it is "
                             "not written over)")
        if data.get("version") != DECISIONS_VERSION:
            raise ValueError(f"decisions file {str(self.path)!r} has version {data.get('version')!r}, this "
                             f"fx_sparsity reads version {DECISIONS_VERSION}: delete it to decide again")
        machines = data.get("machines")
        valid = isinstance(machines, dict) and all(
            isinstance(layers, dict) and all(isinstance(v, dict) and isinstance(v.get("backend"), str)
                                             for v in layers.values())
            for layers in machines.values())
        if not valid:
            raise ValueError(f"decisions file {str(self.path)!r} is damaged (its 'machines' entry): delete it")
        return machines

    def get(self, key: str) -> str | None:
        """The backend decided for ``key`` on this machine, or ``None``."""
        entry = self._machines.get(self.machine, {}).get(key)
        return None if entry is None else entry["backend"]

    def put(self, key: str, backend: str, note: str) -> None:
        """Record this machine's pick for ``key`` (written by :meth:`save`)."""
        self._machines.setdefault(self.machine, {})[key] = {"backend": backend, "note": note}
        self._added = True

    def save(self) -> None:
        """Write the file (temporary name, then rename) if a pick was added."""
        if not self._added:
            return
        data = {"format": _FORMAT, "version": DECISIONS_VERSION, "machines": self._machines}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        self._added = False
