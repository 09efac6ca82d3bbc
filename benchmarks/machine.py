"""What a benchmark ran on, in one line: CPU model, cores and threads, ISA, last-level cache, torch and Python;
and the load a benchmark can put beside itself.

Every script in this folder prints :func:`describe` with its results, so that numbers in
BENCHMARKS.md always name the machine that produced them.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from fx_sparsity.lowering.timing import last_level_cache_bytes

__all__ = ["cpu_name", "describe", "start_cotenants"]

# A co-tenant: a bare interpreter (no imports) keeping one core busy, that exits once its parent is gone
# (a benchmark killed before its cleanup leaves no spinning process behind).
_SPIN = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    for _ in range(1_000_000):\n        pass\n"


def start_cotenants(n: int) -> list[subprocess.Popen]:
    """``n`` busy processes, one core each; terminate them after."""
    return [subprocess.Popen([sys.executable, "-c", _SPIN]) for _ in range(n)]


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> str:
    """``"<CPU>, <n> cores, <t> threads, ISA <isa>, L3 <MiB> MiB, torch <version>, Python <version>"``."""
    return (
        f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
        f"ISA {torch.backends.cpu.get_cpu_capability()}, L3 {last_level_cache_bytes() >> 20} MiB, "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )
