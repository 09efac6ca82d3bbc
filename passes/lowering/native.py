"""Build and load the C++ sparse kernels (``passes/csrc``) on first use.

The kernels are compiled against the installed torch by
:func:`torch.utils.cpp_extension.load` the first time an operator needs them
(20-45 s on a busy 2-core machine), into torch's extension cache
(``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``), in a folder of its
own per source folder, Python and torch version (two checkouts of fx_sparsity
would otherwise rebuild over each other in every new process); later processes
only check the sources' hash and load the library (under a second). A source
change rebuilds, and a file lock lets concurrent processes share one build.
``pip install -e .`` stays a plain Python install.

Without a C++ compiler, or when the build fails, :func:`native_ops` returns
``None`` after ONE warning saying why and how to fix it, and the operators
(:mod:`passes.lowering.operators`) use their pure-torch reference (and MKL for csr).
``FX_SPARSITY_NO_NATIVE=1`` forces that path without a warning.
"""

from __future__ import annotations

import functools
import hashlib
import sys
import logging
import os
import warnings
from pathlib import Path

import torch

__all__ = ["native_ops", "native_isa", "NO_NATIVE_ENV"]

NO_NATIVE_ENV = "FX_SPARSITY_NO_NATIVE"
_CSRC = Path(__file__).with_name("csrc")
_SOURCES = ("ops.cpp", "kernels_avx512bf16.cpp", "kernels_avx512.cpp", "kernels_avx2.cpp", "kernels_generic.cpp")


def _build_directory(root: Path) -> Path:
    """``root/fx_sparsity_native-py311-torch2.14.1-<hash of the csrc folder's path>``."""
    digest = hashlib.sha256(str(_CSRC.resolve()).encode()).hexdigest()[:12]
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return root / f"fx_sparsity_native-{python}-torch{torch.__version__.split('+')[0]}-{digest}"


@functools.cache
def _load() -> object | None:
    try:
        # Importing cpp_extension logs "No CUDA runtime is found" on CUDA wheels without a GPU;
        # these kernels are CPU-only, so that line is noise here.
        logger = logging.getLogger("torch.utils.cpp_extension")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            from torch.utils import cpp_extension
        finally:
            logger.setLevel(level)

        build = _build_directory(Path(cpp_extension.get_default_build_root()))
        build.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(
            name="fx_sparsity_native",
            build_directory=str(build),
            sources=[str(_CSRC / s) for s in _SOURCES],
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
        return torch.ops.fx_sparsity_native
    except Exception as e:  # a missing compiler raises RuntimeError, OSError or a CalledProcessError
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        warnings.warn(
            f"fx_sparsity: the C++ sparse kernels could not be built ({type(e).__name__}: {first_line}); "
            "bitmask/nm/csr operators use the slower pure-torch path. Install a C++ compiler "
            f"(g++ or clang++, the one torch.compile needs on CPU) and restart, or set {NO_NATIVE_ENV}=1 "
            "to silence this warning.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def native_ops() -> object | None:
    """``torch.ops.fx_sparsity_native`` once built and loaded, else ``None`` (forced by ``FX_SPARSITY_NO_NATIVE=1``).

    Returns:
        The operator namespace, or ``None`` when the kernels are unavailable.

    Example::

        >>> ops = native_ops()
        >>> ops is None or ops.isa() in ("avx512-bf16", "avx512-lut-bf16", "avx512", "avx512-lut", "avx2", "generic")
        True
    """
    if os.environ.get(NO_NATIVE_ENV, "") not in ("", "0"):
        return None
    return _load()


def native_isa() -> str | None:
    """The instruction set the C++ kernels run with, or ``None`` without them.

    ``"avx512"``, with ``-bf16`` appended where the CPU has AVX512-BF16 and AVX512-VBMI2 (bf16 bitmask
    and N:M weights then use ``vdpbf16ps`` dot products on bf16 inputs), ``"avx2"``, ``"generic"``. The
    ``-lut`` variants (batch-1 fp32/fp16 and quantized bitmask decode through a permutation table instead of
    ``vexpandps``) are never chosen by cpuid; the ``isa`` operator forces them, to compare on a new CPU.

    Example::

        >>> native_isa() in ("avx512-bf16", "avx512-lut-bf16", "avx512", "avx512-lut", "avx2", "generic", None)
        True
    """
    ops = native_ops()
    return None if ops is None else ops.isa()
