"""Sweep children in their own processes: a native crash costs one combination, each child's peak memory is its
own, and SIGTERM to the sweep alone stops its child. Real processes, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from ptq import bench, errors, sweep, tracking
from ptq.config import RunConfig

BASE = dict(weights="random", calib_size=8, eval_size=16, min_queries=4, min_duration_s=0, blocks=2, warmup=1, monitor=False, progress=False)
FP32, FP16 = "mob-s/fp32/ort", "mob-s/fp16/ort"


def children() -> pd.DataFrame:
    runs = mlflow.search_runs(experiment_names=["ptq"])
    return runs[runs["tags.mlflow.parentRunId"].notna()] if "tags.mlflow.parentRunId" in runs else runs.iloc[:0]


def segfault_while_timing_fp32(job: sweep.ChildJob) -> str:
    """In the child process: the fp32 run crashes natively (SIGSEGV) once its models are logged, while it is timed."""
    if job.cfg.precision == "fp32":

        def crash(*_: object, **__: object) -> None:
            os.kill(os.getpid(), signal.SIGSEGV)

        bench.time_blocks = crash  # type: ignore[assignment]
    return sweep.run_child(job)


def test_a_child_that_crashes_natively_ends_failed_and_the_sweep_goes_on(small_dir: Path) -> None:
    base = RunConfig(model="mob-s", data=small_dir, **BASE)  # type: ignore[arg-type]
    result = sweep.run_sweep("crash", base, ["mob-s"], ["fp32", "fp16"], target=segfault_while_timing_fp32)
    assert result.failed == [FP32] and result.passed == [FP16]
    runs = children().set_index("params.precision")
    crashed = MlflowClient().get_run(runs.loc["fp32"].run_id)
    assert crashed.info.status == "FAILED" and crashed.data.tags["ptq.error"] == "child process died of SIGSEGV"
    assert {"size/fp32_bytes", "size/model_bytes", "data/calib_images"} <= set(crashed.data.metrics)  # what it logged before the crash
    assert {m.name for m in MlflowClient().search_logged_models([crashed.info.experiment_id], f"source_run_id = '{crashed.info.run_id}'")} == {"fp32-onnx"}
    assert not Path(crashed.data.tags[tracking.TEMP_TAG]).exists()  # the crashed child's work folder went with its run
    assert runs.loc["fp16"].status == "FINISHED"
    parent = mlflow.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["ptq.sweep_failed"] == FP32
    assert parent.data.metrics["sweep/failed"] == 1 and parent.data.metrics["sweep/ran"] == 1

    again = sweep.run_sweep("crash", base, ["mob-s"], ["fp32", "fp16"])
    assert again.passed == [FP32] and again.skipped == [FP16]
    runs = children()
    assert len(runs) == 2 and (runs["status"] == "FINISHED").all()  # the crashed attempt was superseded


def ballast_in_fp32(job: sweep.ChildJob) -> str:
    """In the child process: the fp32 run holds 1 GiB more than it needs."""
    ballast = np.ones(2**27) if job.cfg.precision == "fp32" else None  # written, so resident
    run_id = sweep.run_child(job)
    del ballast
    return run_id


def test_each_childs_peak_memory_is_its_own(small_dir: Path) -> None:
    base = RunConfig(model="mob-s", data=small_dir, **{**BASE, "monitor": True, "monitor_interval": 0.2})  # type: ignore[arg-type]
    result = sweep.run_sweep("memory", base, ["mob-s"], ["fp32", "fp16"], target=ballast_in_fp32)
    assert result.passed == [FP32, FP16]
    peak = children().set_index("params.precision")["metrics.system/ptq_process_rss_peak_megabytes"]
    assert peak["fp32"] > 1024 and peak["fp16"] < peak["fp32"] - 700, peak  # one process would carry fp32's peak over to fp16


def test_sigterm_to_the_sweep_alone_stops_its_child_and_both_end_killed(small_dir: Path, store: Path) -> None:
    args = ["sweep", "--name", "term", "--models", "mob-s", "--precisions", "fp32,fp16", "--weights", "random", "--data", str(small_dir),
            "--calib-size", "8", "--eval-size", "8", "--min-queries", "4", "--min-duration-s", "120", "--blocks", "2", "--warmup", "1",
            "--monitor", "false", "--progress", "false"]
    with open(store / "stderr.txt", "w") as err:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "ptq"), *args], env={**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()},
                                stdout=subprocess.DEVNULL, stderr=err, cwd=store, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (len(runs := children()) == 1 and "size/model_bytes" in MlflowClient().get_run(runs.iloc[0].run_id).data.metrics):  # timing fp32 for 120 s
            assert proc.poll() is None and time.time() < deadline, (store / "stderr.txt").read_text()[-3000:]
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)  # to the sweep's process only, as `kill` or `timeout` would
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM, (store / "stderr.txt").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    child = mlflow.get_run(children().iloc[0].run_id)
    assert child.info.status == "KILLED" and child.data.tags["ptq.error"] == "Terminated: SIGTERM"
    assert not tracking.process_alive(child.data.tags["ptq.process"])  # the child process is gone too
    assert "size/fp32_bytes" in child.data.metrics and "error.txt" in {a.path for a in MlflowClient().list_artifacts(child.info.run_id)}
    runs = mlflow.search_runs(experiment_names=["ptq"])
    parent = runs[runs["tags.mlflow.parentRunId"].isna()].iloc[0]
    assert parent.status == "KILLED" and parent["metrics.sweep/total"] == 2 and parent["metrics.sweep/finished"] == 0
    assert parent["metrics.sweep/failed"] == 0 and len(children()) == 1  # fp16 never started


def deaf_while_timing(job: sweep.ChildJob) -> str:
    """In the child process: SIGTERM is sent to the sweep while the child is stuck where no signal reaches it (as in a
    long native call)."""

    def stuck(*_: object, **__: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.kill(os.getppid(), signal.SIGTERM)
        time.sleep(600)

    bench.time_blocks = stuck  # type: ignore[assignment]
    return sweep.run_child(job)


def test_a_child_that_does_not_stop_is_killed_and_its_run_closed_killed(small_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sweep, "STOP_GRACE_S", 2.0)
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    errors.stop_on_signals()  # as `ptq` does
    try:
        with pytest.raises(errors.Terminated):
            sweep.run_sweep("deaf", RunConfig(model="mob-s", data=small_dir, **BASE), ["mob-s"], ["fp32", "fp16"], target=deaf_while_timing)  # type: ignore[arg-type]
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    child = mlflow.get_run(children().iloc[0].run_id)
    assert child.info.status == "KILLED" and not tracking.process_alive(child.data.tags["ptq.process"])
    assert child.data.tags["ptq.error"] == "Terminated: SIGTERM (the run's process did not stop within 2 s and was killed)"
    runs = mlflow.search_runs(experiment_names=["ptq"])
    parent = runs[runs["tags.mlflow.parentRunId"].isna()].iloc[0]
    assert parent.status == "KILLED" and parent["metrics.sweep/finished"] == 0 and len(runs) == 2
