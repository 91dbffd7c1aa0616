"""Latency timed in lean worker processes (latency_process=worker): the same run, the same metrics, alternating
blocks; the workers' own CPU and memory; a worker that dies fails the run in one line and leaves nothing behind."""

from __future__ import annotations

import csv
import json
import os
import signal
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlflow
import numpy as np
import onnx
import psutil
import pytest
from onnx import TensorProto, helper, numpy_helper

from ptq import bench, pipeline, summary, tracking, worker
from ptq.backends import Compressed
from ptq.config import RunConfig
from ptq.errors import PtqError
from ptq.monitor import WORKER_CPU, WORKER_RSS, Monitor

SMALL = {"calib_size": 8, "eval_size": 8, "min_queries": 40, "min_duration_s": 0, "blocks": 2, "warmup": 2, "monitor_interval": 0.1, "progress": False}
BATCH = np.zeros((1, 3, 2, 2), np.float32)


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1000-class linear classifier on 3x2x2 inputs: a model ONNX Runtime opens in milliseconds."""
    weights = numpy_helper.from_array(np.random.default_rng(0).random((12, 1000), dtype=np.float32), "W")
    nodes = [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("MatMul", ["f", "W"], ["y"])]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 2, 2])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1000])], [weights]
    )
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _children() -> set[int]:
    return {c.pid for c in psutil.Process().children()}


def _new_children(before: set[int]) -> list[int]:
    """Child processes of this one that the test left behind."""
    return sorted(_children() - before)


def _run_dirs() -> list[str]:
    return [p for p in os.listdir(tempfile.gettempdir()) if p.startswith(tracking.temp_prefix())]


def _artifact(run_id: str, name: str, dst: Path) -> Path:
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name, dst_path=str(dst)))


def test_workers_hold_the_runtime_and_the_model_but_neither_torch_nor_mlflow(tiny_onnx: Path) -> None:
    before = _children()  # processes an earlier test started (e.g. multiprocessing's resource tracker) are not this test's
    import torch  # noqa: F401  (this process holds both: a worker must not inherit or re-import them)

    assert {"torch", "mlflow"} <= {m.partition(".")[0] for m in __import__("sys").modules}
    with worker.workers("ort", {"": Compressed(tiny_onnx)}, {"": "int8"}, 1, BATCH) as timers:
        modules = timers[""].modules  # type: ignore[attr-defined]
        block = timers[""].block(5)
    assert "onnxruntime" in modules and "numpy" in modules
    assert not {"torch", "mlflow", "scipy", "PIL"} & set(modules)
    assert len(block.seconds) == 5 and block.gpu_ms is None and (block.seconds > 0).all() and block.wall_s >= block.seconds.sum()
    assert _new_children(before) == []


def test_a_worker_that_cannot_open_its_model_says_why_and_is_gone(tmp_path: Path) -> None:
    before = _children()  # processes an earlier test started (e.g. multiprocessing's resource tracker) are not this test's
    with pytest.raises(PtqError, match=r"^the latency worker of the int8 model failed: .*missing\.onnx"):
        with worker.workers("ort", {"": Compressed(tmp_path / "missing.onnx")}, {"": "int8"}, 1, BATCH):
            pass
    assert _new_children(before) == []


def test_workers_are_stopped_on_ctrl_c(tiny_onnx: Path) -> None:
    before = _children()  # processes an earlier test started (e.g. multiprocessing's resource tracker) are not this test's
    with pytest.raises(KeyboardInterrupt):
        with worker.workers("ort", {"": Compressed(tiny_onnx), "fp32_": Compressed(tiny_onnx)}, {"": "int8", "fp32_": "fp32"}, 1, BATCH) as timers:
            pids = [t.pid for t in timers.values()]
            raise KeyboardInterrupt
    assert _new_children(before) == [] and not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids if p)


def test_monitor_samples_each_worker_apart_from_the_run(tiny_onnx: Path) -> None:
    mon = Monitor(0.05, sources=[])
    mon.start()
    with worker.workers("ort", {"": Compressed(tiny_onnx), "fp32_": Compressed(tiny_onnx)}, {"": "int8", "fp32_": "fp32"}, 1, BATCH) as timers:
        mon.watch({k: t.pid for k, t in timers.items() if t.pid})
        rss = {k: psutil.Process(t.pid).memory_info().rss / 1e6 for k, t in timers.items() if t.pid}
        mon.on_phase("latency")
        timers[""].block(50000)  # about half a second
        mon.on_phase(None)
        mon.watch({})
    mon.stop()
    row = next(r for r in mon.phase_rows() if r["phase"] == "latency")
    for prefix in ("", "fp32_"):
        assert row[f"{prefix}worker_peak_rss_mb"] == pytest.approx(rss[prefix], rel=0.5)  # a worker, not this process (hundreds of MB)
    assert row["worker_cpu_pct_mean"] > row.get("fp32_worker_cpu_pct_mean", 0.0)  # the one that ran, not the one that waited
    last = mon.samples[-1].values  # after watch({}): no worker series
    assert WORKER_RSS.format("") not in last and WORKER_CPU.format("") not in last


def test_worker_run_logs_what_an_inprocess_run_logs_and_the_workers_resources(lite0_onnx: Path, small_dir: Path, tmp_path: Path) -> None:
    runs = {how: pipeline.run(RunConfig(model=str(lite0_onnx), weights="random", data=small_dir, latency_process=how, **SMALL)) for how in ("worker", "inprocess")}  # type: ignore[arg-type]
    stored = {how: mlflow.get_run(rid) for how, rid in runs.items()}
    assert {r.info.status for r in stored.values()} == {"FINISHED"}
    assert stored["worker"].data.params["latency_process"] == "worker" and stored["inprocess"].data.params["latency_process"] == "inprocess"
    names = {how: {k for k in r.data.metrics if not k.startswith("system/")} for how, r in stored.items()}
    assert names["worker"] == names["inprocess"]
    series = {k for k in stored["worker"].data.metrics if k.startswith("system/")}
    workers = {WORKER_RSS.format(""), WORKER_RSS.format("fp32_"), WORKER_CPU.format(""), WORKER_CPU.format("fp32_")}
    assert workers <= series and not workers & set(stored["inprocess"].data.metrics)
    with _artifact(runs["worker"], "latency.csv", tmp_path / "w").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["precision", "block", "ms"]
    assert [(r["precision"], r["block"]) for r in rows] == [(p, str(b)) for p in ("int8", "fp32") for b in (0, 1) for _ in range(20)]
    table = json.loads(_artifact(runs["worker"], "phases.json", tmp_path / "p").read_text())
    by_phase = {row[table["columns"].index("phase")]: dict(zip(table["columns"], row)) for row in table["data"]}
    assert by_phase["latency"]["worker_peak_rss_mb"] > 0 and by_phase["fp32_latency"]["fp32_worker_peak_rss_mb"] > 0
    assert by_phase["latency"]["worker_peak_rss_mb"] < by_phase["latency"]["peak_rss_mb"]  # lean: no torch, no mlflow, no images
    assert by_phase["evaluate" if "evaluate" in by_phase else "export"].get("worker_peak_rss_mb") is None  # workers exist for latency only
    data = stored["worker"].data
    assert summary.rows(data.params, data.tags, data.metrics)[[k for k, _ in summary.rows(data.params, data.tags, data.metrics)].index("latency p50 / p99")][1].endswith(
        "threads, a worker process per model)"
    )


def test_a_worker_killed_mid_run_fails_the_run_naming_the_signal(lite0_onnx: Path, small_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = _children()  # processes an earlier test started (e.g. multiprocessing's resource tracker) are not this test's
    real = worker.Worker.block

    def killed(self: worker.Worker, queries: int) -> Any:
        if self.name == "fp32":  # the FP32 worker's first block: out of memory, say
            assert self.pid is not None
            os.kill(self.pid, signal.SIGKILL)
        return real(self, queries)

    monkeypatch.setattr(worker.Worker, "block", killed)
    with pytest.raises(PtqError) as err:
        pipeline.run(RunConfig(model=str(lite0_onnx), weights="random", data=small_dir, latency_process="worker", **SMALL))  # type: ignore[arg-type]
    message = str(err.value)
    assert "\n" not in message and message.startswith("the latency worker of the fp32 model (pid ") and " died of SIGKILL " in message
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FAILED"
    assert _new_children(before) == [] and _run_dirs() == []


def test_latency_process_is_checked_and_torch_times_in_process(small_dir: Path) -> None:
    with pytest.raises(PtqError, match="unknown latency_process 'thread': use one of inprocess, worker"):
        RunConfig(model="lite0", data=small_dir, latency_process="thread").validate()
    assert RunConfig(model="lite0", data=small_dir, latency_process="worker").latency_in_worker
    assert not RunConfig(model="lite0", data=small_dir, backend="torch", precision="fp32", latency_process="worker").latency_in_worker
    assert not RunConfig(model="lite0", data=small_dir).latency_in_worker  # the default, for now


def test_gpu_compute_time_is_logged_beside_end_to_end_latency(tmp_path: Path) -> None:
    logged: dict[str, Any] = {}
    rec = SimpleNamespace(metrics=logged.update, tags=logged.update, artifact=lambda path: logged.update(csv=Path(path).read_text()))
    block = np.array([0, 0, 1, 1])
    model = bench.Latency(np.array([3.0, 3.5, 3.0, 3.5]), block, 1.0, 1, np.array([1.0, 2.0, 1.0, 2.0]))
    reference = bench.Latency(np.array([9.0, 9.0, 9.0, 9.0]), block, 1.0, 1, np.array([6.0, 6.0, 6.0, 6.0]))
    pipeline._log_speedup(rec, RunConfig(model="lite0"), reference, model)  # type: ignore[arg-type]
    assert logged["speedup/gpu_compute_p50"] == 4.0 and logged["speedup/p50"] == pytest.approx(9.0 / 3.25)
    pipeline._log_latency_samples(rec, tmp_path, "int8", {"": model, "fp32_": reference})  # type: ignore[arg-type]
    assert logged["csv"].splitlines()[:2] == ["precision,block,ms,gpu_ms", "int8,0,3.0000,1.0000"] and logged["csv"].splitlines()[-1] == "fp32,1,9.0000,6.0000"
    plain = {"": bench.Latency(model.ms, block, 1.0, 1), "fp32_": bench.Latency(reference.ms, block, 1.0, 1)}
    pipeline._log_latency_samples(rec, tmp_path, "int8", plain)  # type: ignore[arg-type]
    assert logged["csv"].splitlines()[0] == "precision,block,ms"
