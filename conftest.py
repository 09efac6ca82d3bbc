"""Names every docstring example may use (pytest runs them with --doctest-modules): torch, nn, F, fx and the
public API of fx_sparsity and passes."""

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
