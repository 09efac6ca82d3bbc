"""Names every docstring example may use (pytest runs them with --doctest-modules): torch, nn, F, fx, the
public API of fx_sparsity and passes and of their namespaces, and a small ``model`` (64 inputs) with
calibration ``batches`` for it."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fx_sparsity
import passes

# Every namespace whose __all__ docstring examples may name without a prefix (later ones win on a clash).
NAMESPACES = (
    "passes.capturing",
    "passes.matching",
    "passes.masking",
    "passes.calibration",
    "passes.lowering",
    "passes.dependency",
    "passes.shrink",
    "passes.meta",
    "passes.utils",
    "passes",
    "fx_sparsity.config",
    "fx_sparsity.meta",
    "fx_sparsity.sparsifier",
    "fx_sparsity.levels",
    "fx_sparsity.calibration",
    "fx_sparsity.structured",
    "fx_sparsity.lowering",
    "fx_sparsity.deploy",
    "fx_sparsity.report",
    "fx_sparsity",
)


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace: dict) -> None:
    torch.manual_seed(0)
    doctest_namespace.update(torch=torch, nn=nn, F=F, fx=fx, fx_sparsity=fx_sparsity, passes=passes)
    for name in NAMESPACES:
        module = importlib.import_module(name)
        doctest_namespace.update({n: getattr(module, n) for n in module.__all__})
    doctest_namespace["model"] = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    doctest_namespace["batches"] = [torch.randn(8, 64) for _ in range(4)]
    torch.manual_seed(0)
