"""Static types: mypy over the whole library, the TensorRT backend included (against tensorrt-stubs)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def test_mypy_passes() -> None:
    mypy = Path(sys.executable).parent / "mypy"
    if not mypy.exists() and shutil.which("mypy") is None:
        pytest.fail("mypy is not installed: pip install -r requirements.txt")
    out = subprocess.run([str(mypy) if mypy.exists() else "mypy"], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:]
