"""Every test starts from the same random state, so results never depend on which tests ran before it."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    torch.manual_seed(0)
