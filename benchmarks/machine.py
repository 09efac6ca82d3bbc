"""What a benchmark ran on, in one line: CPU model, cores and threads, ISA, last-level cache, torch and Python.

Every script in this folder prints :func:`describe` with its results, so that numbers in
BENCHMARKS.md always name the machine that produced them.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from fx_sparsity.lowering.timing import last_level_cache_bytes

__all__ = ["cpu_name", "describe"]


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
