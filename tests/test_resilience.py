"""Nothing lost, never left RUNNING: concurrent first use of a store, a server lost mid-run, SIGTERM, SIGKILL,
errors while logging, and what stdout carries. Real stores, real `mlflow server`s, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from ptq import bench, pipeline, sync, tracking
from ptq.config import RunConfig
from ptq.monitor import Monitor
from test_server import kill_server, mlflow_server

BIN = Path(sys.executable).parent
TINY = ["--model", "mob-s", "--weights", "random", "--calib-size", "8", "--eval-size", "8", "--min-queries", "4",
        "--min-duration-s", "0", "--blocks", "2", "--warmup", "1", "--progress", "false"]


def ptq(args: list[str], env: dict[str, str], **kwargs: object) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "ptq"), *args], env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)  # type: ignore[call-overload]


def wait_for(condition, timeout: float = 300.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


def test_four_concurrent_first_runs_on_a_fresh_store(small_dir: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    procs = [ptq(["run", *TINY, "--precision", "fp32", "--monitor", "false", "--data", str(small_dir)], {"MLFLOW_TRACKING_URI": uri}, cwd=tmp_path)
             for _ in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ptq").experiment_id])  # type: ignore[union-attr]
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}


def test_sigterm_ends_the_run_killed_with_its_data_and_no_temp_files(small_dir: Path, tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    args = ["run", *TINY, "--precision", "int8", "--min-duration-s", "120", "--monitor-interval", "0.2", "--data", str(small_dir)]
    proc = ptq(args, {"TMPDIR": str(tmp), "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}, cwd=tmp_path)
    client = MlflowClient()

    def timing() -> bool:  # the models (and then the model's size) are logged just before latency is timed
        runs = mlflow.search_runs(search_all_experiments=True)
        return len(runs) == 1 and "size/model_bytes" in client.get_run(runs.iloc[0].run_id).data.metrics

    wait_for(timing)
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    run = client.get_run(mlflow.search_runs(search_all_experiments=True).iloc[0].run_id)
    assert run.info.status == "KILLED" and run.data.tags["ptq.error"] == "Terminated: SIGTERM"
    assert len(client.get_metric_history(run.info.run_id, "system/ptq_process_rss_megabytes")) >= 5  # the monitor's series were written
    phases = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/phases.json")  # and its table, up to the phase it was killed in
    assert "fp32_latency" in [row[0] for row in phases["data"]] and "error.txt" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert not list(tmp.glob("ptq-*"))  # no ptq-run-* (or ptq-quant-*) directory left behind
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert run.info.run_id in last and "KILLED" in last
    assert out == ""


def test_run_left_running_by_a_dead_process_is_closed_killed_by_the_next_run(small_dir: Path, tmp_path: Path) -> None:
    """... and its work folder, which nothing in the killed process could remove, goes with it."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    args = ["run", *TINY, "--precision", "fp32", "--min-duration-s", "120", "--monitor", "false", "--data", str(small_dir)]
    proc = ptq(args, {"MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(), "TMPDIR": str(tmp)}, cwd=tmp_path)
    wait_for(lambda: len(mlflow.search_runs(search_all_experiments=True)) == 1)
    time.sleep(3)
    proc.kill()  # SIGKILL: nothing in the process can react, as in a power loss
    proc.communicate(timeout=60)
    stale = mlflow.search_runs(search_all_experiments=True).iloc[0]
    assert stale.status == "RUNNING"
    (work,) = tmp.glob("ptq-run-*")
    assert work.name.startswith(f"ptq-run-{proc.pid}-") and stale[f"tags.{tracking.TEMP_TAG}"] == str(work)
    pipeline.run(RunConfig(model="mob-s", weights="random", precision="fp32", data=small_dir, calib_size=4, eval_size=4, min_queries=2,
                           min_duration_s=0, blocks=2, warmup=0, monitor=False, progress=False))
    closed = mlflow.get_run(stale.run_id)
    assert closed.info.status == "KILLED" and "ended without closing the run" in closed.data.tags["ptq.error"]
    assert not list(tmp.glob("ptq-*"))


def test_server_lost_mid_run_goes_offline_and_sync_completes_it(small_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PTQ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tracking, "_sync_target", None)
    backend = f"sqlite:///{tmp_path / 'server.db'}"
    with mlflow_server(backend, tmp_path) as uri:
        port = int(uri.rsplit(":", 1)[1])
        mlflow.set_tracking_uri(uri)
        real = bench.time_blocks

        def lose_server_then_time(*args, **kwargs):  # type: ignore[no-untyped-def]
            kill_server(uri)
            return real(*args, **kwargs)

        monkeypatch.setattr(bench, "time_blocks", lose_server_then_time)
        started = time.monotonic()
        run_id = pipeline.run(RunConfig(model="lite0", precision="int8", data=small_dir, calib_size=8, eval_size=40, min_queries=6,
                                        min_duration_s=0, blocks=2, warmup=1, monitor_interval=0.2, progress=False))
        waited = time.monotonic() - started
    assert mlflow.get_tracking_uri() == tracking.offline_uri()
    offline = MlflowClient(tracking.offline_uri()).get_run(run_id)
    server_run = offline.data.tags["ptq.partial_of"]
    assert offline.info.status == "FINISHED" and offline.data.tags["ptq.sync_target"] == uri
    assert {"acc/top1", "speedup/p50", "size/fp32_bytes", "compress/peak_rss_mb"} <= set(offline.data.metrics)
    assert "phases.json" in {a.path for a in MlflowClient(tracking.offline_uri()).list_artifacts(run_id)}
    assert waited < 120, f"the run waited {waited:.0f} s on the lost server"
    with mlflow_server(backend, tmp_path, port) as uri:
        result = sync.sync()
        assert result.uploaded == [run_id]
        server = MlflowClient(uri)
        completed = server.get_run(server_run)  # the same run on the server, completed: never left RUNNING
        assert completed.info.status == "FINISHED" and completed.data.metrics["acc/top1"] == offline.data.metrics["acc/top1"]
        assert len(server.get_metric_history(server_run, "size/fp32_bytes")) == 1  # logged before the loss, not twice
        assert {"latency.csv", "predictions.csv"} <= {a.path for a in server.list_artifacts(server_run)}
        assert {m.name for m in server.search_logged_models([completed.info.experiment_id], f"source_run_id = '{server_run}'")} == {"fp32-onnx", "int8-onnx"}
        assert len(server.search_runs([completed.info.experiment_id])) == 1
        assert sync.sync().uploaded == []


def test_an_error_while_logging_the_monitor_keeps_the_runs_own_error(small_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("evaluation exploded")

    def no_points(self: Monitor) -> list[object]:
        raise ValueError("monitor broke too")

    monkeypatch.setattr(bench, "evaluate", broken)
    monkeypatch.setattr(Monitor, "points", no_points)
    with pytest.raises(RuntimeError, match="evaluation exploded"):
        pipeline.run(RunConfig(model="lite0", precision="fp32", data=small_dir, calib_size=4, eval_size=8, min_queries=2, min_duration_s=0,
                               blocks=2, warmup=0, progress=False))
    run = mlflow.search_runs(search_all_experiments=True).iloc[0]
    assert run.status == "FAILED" and run["tags.ptq.error"] == "RuntimeError: evaluation exploded"


def test_stdout_carries_only_the_run_id(small_dir: Path, tmp_path: Path) -> None:
    args = ["run", "--model", "lite0", "--precision", "fp32", "--calib-size", "4", "--eval-size", "8", "--min-queries", "2",
            "--min-duration-s", "0", "--blocks", "2", "--warmup", "0", "--monitor", "false", "--progress", "false", "--data", str(small_dir)]
    proc = ptq(args, {"MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}, cwd=tmp_path)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert out.splitlines() == [mlflow.search_runs(search_all_experiments=True).iloc[0].run_id]
    assert "Loaded pretrained weights" in err  # the model package's own print went to stderr


def test_read_only_user_is_refused_in_one_line_before_work(small_dir: Path, tmp_path: Path) -> None:
    from mlflow.server import get_app_client

    with mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path, auth=True, default_permission="READ") as uri:
        admin = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "right-password"}
        os.environ.update(admin)
        try:
            auth = get_app_client("basic-auth", tracking_uri=uri)
            auth.create_user("reader", "reader-password-123")
            experiment_id = MlflowClient(uri).create_experiment("ptq")
        finally:
            for key in admin:
                os.environ.pop(key)
        reader = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_TRACKING_USERNAME": "reader", "MLFLOW_TRACKING_PASSWORD": "reader-password-123"}
        proc = ptq(["run", *TINY, "--precision", "fp32", "--data", str(small_dir)], {**reader, "PTQ_CACHE_DIR": str(tmp_path / "cache")}, cwd=tmp_path)
        out, err = proc.communicate(timeout=300)
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1, err[-2000:]
        assert lines[0].startswith("error: tracking server") and "does not let reader write runs in experiment 'ptq'" in lines[0]
        os.environ.update(admin)
        try:
            assert MlflowClient(uri).search_runs([experiment_id]) == []
        finally:
            for key in admin:
                os.environ.pop(key)


def test_a_disk_without_room_for_the_run_is_refused_before_work(small_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil as real_shutil

    from ptq import disk
    from ptq.errors import PtqError

    usage = real_shutil.disk_usage("/")
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda _path: usage._replace(free=30 << 20))
    with pytest.raises(PtqError, match=r"not enough free disk space for this run in .*: 30 MB free, about \d+ MB needed: free some space, or set TMPDIR"):
        pipeline.run(RunConfig(model="mob-s", weights="random", precision="int8", data=small_dir, progress=False))
    assert mlflow.search_runs(search_all_experiments=True).empty


def test_a_cache_that_cannot_be_written_is_skipped(small_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from ptq import data

    def full(path: object, _array: object) -> None:
        Path(str(path)).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setenv("PTQ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(data.np, "save", full)
    run_id = pipeline.run(RunConfig(model="mob-s", weights="random", precision="fp32", data=small_dir, calib_size=4, eval_size=4, min_queries=2,
                                    min_duration_s=0, blocks=2, warmup=0, monitor=False, progress=False))
    assert mlflow.get_run(run_id).info.status == "FINISHED"
    assert "not caching decoded images" in caplog.text and "No space left on device" in caplog.text
    assert not list((tmp_path / "cache" / "tensors").iterdir())  # no partial file left


def test_error_txt_is_written_even_where_the_temp_dir_is_full(small_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("evaluation exploded")

    def temp_full(self: MlflowClient, run_id: str, text: str, artifact_file: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bench, "evaluate", broken)
    monkeypatch.setattr(MlflowClient, "log_text", temp_full)
    with pytest.raises(RuntimeError, match="evaluation exploded"):
        pipeline.run(RunConfig(model="lite0", precision="fp32", data=small_dir, calib_size=4, eval_size=8, min_queries=2, min_duration_s=0,
                               blocks=2, warmup=0, monitor=False, progress=False))
    run = mlflow.search_runs(search_all_experiments=True).iloc[0]
    assert run.status == "FAILED"
    text = Path(mlflow.artifacts.download_artifacts(run_id=run.run_id, artifact_path="error.txt")).read_text()
    assert "RuntimeError: evaluation exploded" in text


def test_an_offline_run_left_running_by_a_dead_process_is_uploaded_killed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PTQ_CACHE_DIR", str(tmp_path / "cache"))
    dead = subprocess.run([sys.executable, "-c", "from ptq import tracking; print(tracking.process_id())"], capture_output=True, text=True, check=True).stdout.strip()
    with mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path) as uri:
        tracking.ready_store(tracking.offline_uri())
        offline = MlflowClient(tracking.offline_uri())
        stale = offline.create_run(offline.create_experiment("ptq", artifact_location=(tmp_path / "art").as_uri()), tags={
            "ptq.process": dead, "device.machine_id": tracking.machine_id(), "ptq.sync_target": uri}).info.run_id
        offline.log_metric(stale, "size/fp32_bytes", 1.0)
        assert sync.sync().uploaded == [stale]
        server = MlflowClient(uri)
        uploaded = server.search_runs([server.get_experiment_by_name("ptq").experiment_id])[0]  # type: ignore[union-attr]
        assert uploaded.info.status == "KILLED" and "ended without closing the run" in uploaded.data.tags["ptq.error"]
        assert uploaded.data.metrics["size/fp32_bytes"] == 1.0


def test_sync_with_wrong_credentials_fails_even_with_nothing_to_upload(tmp_path: Path) -> None:
    with mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path, auth=True) as uri:
        env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "wrong-password",
               "PTQ_CACHE_DIR": str(tmp_path / "empty-cache")}
        proc = ptq(["sync"], env, cwd=tmp_path)
        _, err = proc.communicate(timeout=300)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "refused the credentials" in lines[0], err[-2000:]
