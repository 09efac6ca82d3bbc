"""Package layering: passes is importable without fx_sparsity."""

from __future__ import annotations

import subprocess
import sys


def test_passes_does_not_import_fx_sparsity():
    """Importing passes loads no fx_sparsity module."""
    code = "import sys, passes; assert not [m for m in sys.modules if m.startswith('fx_sparsity')], sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
