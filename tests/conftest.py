"""Every test starts from the same random state, so results never depend on which tests ran before it; the C++
kernels are built (or loaded from torch's extension cache) once, before the first test."""

import pytest
import torch

from passes.lowering import native_ops


@pytest.fixture(scope="session", autouse=True)
def native_kernels() -> object | None:
    """``torch.ops.fx_sparsity_native``, or ``None`` without the kernels: built here once per run (20-50 s on 2 cores
    when torch's extension cache has no build of these sources), not at collection or inside whichever test lowers a
    layer first."""
    return native_ops()


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    torch.manual_seed(0)
