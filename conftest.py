"""Names every docstring example may use (pytest runs them with --doctest-modules): torch, nn, F, fx, the
public API of fx_sparsity and passes, and a small ``model`` (64 inputs) with calibration ``batches`` for it."""

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fx_sparsity
import passes


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace: dict) -> None:
    torch.manual_seed(0)
    doctest_namespace.update(torch=torch, nn=nn, F=F, fx=fx, fx_sparsity=fx_sparsity, passes=passes)
    doctest_namespace.update({name: getattr(passes, name) for name in passes.__all__})
    doctest_namespace.update({name: getattr(fx_sparsity, name) for name in fx_sparsity.__all__})
    doctest_namespace["model"] = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    doctest_namespace["batches"] = [torch.randn(8, 64) for _ in range(4)]
    torch.manual_seed(0)
