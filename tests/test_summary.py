"""The run's headline: the same rows on the terminal, in summary.md and as the run's description."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from ptq import summary

BIN = Path(sys.executable).parent

PARAMS = {"model": "lite0", "precision": "int8", "backend": "ort", "weights": "pretrained", "batch_size": "1", "threads_used": "2", "calib_method": "minmax"}
TAGS = {"device.name": "orin-1", "device.cpu": "Cortex-A78AE", "device.gpu": "Orin", "ptq.latency_stability": "stable"}
METRICS = {
    "size/fp32_bytes": 18.6e6, "size/model_bytes": 5.1e6, "compress/total_s": 4.6, "compress/export_s": 0.5, "compress/preprocess_s": 0.2,
    "compress/calibrate_s": 2.9, "compress/quantize_s": 1.0, "compress/build_s": 0.001, "compress/peak_rss_mb": 1512.4,
    "compress/peak_rss_delta_mb": 611.6,
    "acc/top1": 0.862, "acc/fp32_top1": 0.859, "acc/top1_drop_p": 0.55, "latency/p50_ms": 2.3, "latency/p99_ms": 2.9,
    "latency/fp32_p50_ms": 5.0, "speedup/p50": 2.17, "speedup/p50_ci95_low": 2.1, "speedup/p50_ci95_high": 2.25,
}


def test_rows_say_the_headline_and_leave_out_what_was_not_measured() -> None:
    assert summary.rows(PARAMS, TAGS, METRICS) == [
        ("model", "lite0 int8 on ort (weights=pretrained)"),
        ("device", "orin-1: Cortex-A78AE, GPU Orin"),
        ("size", "18.60 MB → 5.10 MB (3.65× smaller)"),
        ("compression", "4.60 s (export 0.50, preprocess 0.20, calibrate 2.90, quantize 1.00)"),
        ("peak memory while compressing", "1512 MB process RSS (+612 MB over its level before compression began: compression's own)"),
        ("top-1, fp32 → model", "85.90 % → 86.20 % (drop -0.30 points, McNemar p = 0.55)"),
        ("latency p50 / p99", "2.300 / 2.900 ms (batch 1, 2 threads)"),
        ("speed-up over fp32 (p50)", "2.17× [95 % CI 2.10-2.25], fp32 p50 5.000 ms"),
    ]
    unstable = summary.rows(PARAMS, {**TAGS, "ptq.latency_stability": "unstable: per-block p50 spread fp32 9.0 %"}, {"latency/evaluate_x": 1.0})
    assert ("latency stability", "unstable: per-block p50 spread fp32 9.0 %") in unstable and len(unstable) == 3
    older = {k: v for k, v in METRICS.items() if k != "compress/peak_rss_delta_mb"}  # a run from before the increase was logged
    assert ("peak memory while compressing", "1512 MB process RSS") in summary.rows(PARAMS, TAGS, older)
    trt = {**METRICS, "latency/gpu_compute_p50_ms": 0.8, "latency/fp32_gpu_compute_p50_ms": 2.4, "speedup/gpu_compute_p50": 3.0}
    rows = summary.rows({**PARAMS, "latency_process": "worker"}, TAGS, trt)
    assert ("latency p50 / p99", "2.300 / 2.900 ms (batch 1, 2 threads, a worker process per model)") in rows
    assert rows[-1] == ("GPU compute p50", "0.800 ms, fp32 2.400 ms (3.00× speed-up)")
    torch_worker = summary.rows({**PARAMS, "latency_process": "worker"}, {**TAGS, "ptq.latency_process": "inprocess: backend torch has no worker"}, METRICS)
    assert ("latency p50 / p99", "2.300 / 2.900 ms (batch 1, 2 threads)") in torch_worker  # asked for, not done: not claimed
    assert summary.sweep_row(PARAMS, METRICS, "FINISHED") == ("lite0", "int8", "minmax", "5.10", "4.60", "86.20", "—", "2.300", "2.17", "FINISHED")


def test_cli_prints_the_summary_and_the_run_describes_itself(small_dir: Path, tmp_path: Path) -> None:
    args = [str(BIN / "ptq"), "run", "--model", "lite0", "--precision", "int8", "--calib-size", "8", "--eval-size", "16", "--min-queries", "4",
            "--min-duration-s", "0", "--blocks", "2", "--warmup", "1", "--monitor", "false", "--progress", "false", "--data", str(small_dir)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr[-3000:]
    run = mlflow.get_run(out.stdout.strip())
    for label, value in summary.rows(run.data.params, run.data.tags, run.data.metrics):
        assert label in out.stderr and value in out.stderr
    assert "speed-up over fp32 (p50)" in out.stderr and f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}" in out.stderr
    text = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="summary.md")).read_text()
    assert run.data.tags["mlflow.note.content"] == text and "| top-1, fp32 → model |" in text and "alternating with the FP32 reference" in text


def test_tensorrt_runs_say_how_they_calibrated_and_where_their_layers_ran() -> None:
    tags = {**TAGS, "tensorrt.calibration": "100 images fed in 20 batches of 5, 0 dropped", "tensorrt.dla_core": "0",
            "tensorrt.dla_subgraphs": "0", "tensorrt.gpu_layers": "57", "tensorrt.dla_fallback": "all 57 layers fell back to the GPU"}
    rows = dict(summary.rows({**PARAMS, "backend": "tensorrt"}, tags, METRICS))
    assert rows["TensorRT calibration"] == "100 images fed in 20 batches of 5, 0 dropped"
    assert rows["DLA placement"] == "core 0: 0 DLA subgraphs, 57 GPU layers (all 57 layers fell back to the GPU)"
    assert "DLA placement" not in dict(summary.rows(PARAMS, TAGS, METRICS))  # a GPU or CPU run has none
