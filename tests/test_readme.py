"""Every ```python block of the README runs as written, each on its own, in a scratch folder."""

from __future__ import annotations

import pathlib
import re
import warnings

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_has_python_blocks():
    """The README shows code; the test below would otherwise pass by running nothing."""
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path, monkeypatch):
    """README python block ``index`` runs without error (files it writes go to a temporary folder), and uses no
    name fx_sparsity has deprecated (the docs show the new homes)."""
    monkeypatch.chdir(tmp_path)
    code = compile(BLOCKS[index], f"README.md python block {index}", "exec")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r".* is deprecated: use ", category=DeprecationWarning)
        exec(code, {"__name__": f"readme_block_{index}"})
