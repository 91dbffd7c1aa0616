"""The MLflow UI as a researcher sees it: a real `mlflow server` and headless Chromium (slow; needs Debian's
chromium and `pip install playwright`)."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

from ptq import pipeline
from ptq.config import RunConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

pytestmark = pytest.mark.slow


def test_run_page_shows_headline_system_charts_and_models(small_dir: Path, tmp_path: Path) -> None:
    if importlib.util.find_spec("playwright") is None or shutil.which("chromium") is None:
        pytest.skip("needs `pip install playwright` and Debian's chromium (apt-get install chromium)")
    import ui_check

    run_id = pipeline.run(RunConfig(model="lite0", precision="int8", data=small_dir, calib_size=16, eval_size=64, min_queries=100,
                                    min_duration_s=1, monitor_interval=0.5, progress=False))
    seen = ui_check.check(run_id, tmp_path / "shots")
    assert seen["description"] is True  # the run's description is its headline table
    assert seen["system_charts"] >= 10  # MLflow's System metrics tab draws ptq's system/ series
    assert seen["models_page"] == ["fp32-onnx", "int8-"] and seen["logged_models"] == ["fp32-onnx", "int8-"]
    assert seen["runs_table"] is True  # the runs table names the run as ptq does (lite0-int8-ort)
    assert {p.name for p in (tmp_path / "shots").glob("*.png")} == {"runs_table.png", "overview.png", "system_metrics.png", "logged_models.png"}
