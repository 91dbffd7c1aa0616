"""Slow end-to-end runs of large models (run with `pytest -m slow`): the study's heaviest model and the larger lite models."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import pytest

from ptq import pipeline
from ptq.config import RunConfig

pytestmark = pytest.mark.slow


def test_d201_random_int8_profile(sample_dir: Path) -> None:
    """DenseNet-201 compresses long enough to show its resource profile second by second."""
    run_id = pipeline.run(RunConfig(model="d201", weights="random", precision="int8", data=sample_dir, min_queries=100, min_duration_s=1, warmup=5, progress=False))
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["size/ratio"] > 3
    table = mlflow.artifacts.load_dict(f"runs:/{run_id}/phases.json")
    phases = pd.DataFrame(table["data"], columns=table["columns"]).set_index("phase")
    assert phases.loc["calibrate", "seconds"] > 5
    history = mlflow.MlflowClient().get_metric_history(run_id, "system/cpu_utilization_percentage")
    assert len({m.step for m in history}) > 20
    for phase in ("calibrate", "quantize", "latency", "fp32_latency"):
        assert phases.loc[phase, "peak_rss_mb"] > 0


@pytest.mark.parametrize("model", ["lite1", "lite2"])
def test_larger_lite_models_int8_keep_accuracy(sample_dir: Path, model: str) -> None:
    run_id = pipeline.run(RunConfig(model=model, precision="int8", data=sample_dir, min_queries=100, min_duration_s=1, warmup=5, progress=False))
    metrics = mlflow.get_run(run_id).data.metrics
    assert metrics["acc/fp32_top1"] > 0.8 and abs(metrics["acc/top1_drop_pt"]) < 2.0
