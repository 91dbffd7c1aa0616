"""End-to-end runs on real models, real images, real ONNX Runtime quantization and a real MLflow store."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from ptq import bench, pipeline, tracking
from ptq.config import RunConfig
from ptq.errors import PtqError
from ptq.monitor import NvmlSource

BIN = Path(sys.executable).parent


def only_run() -> pd.Series:
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 1
    return runs.iloc[0]


def artifacts(run_id: str, path: str = "") -> set[str]:
    return {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, path)}


@pytest.fixture(scope="module")
def lite0_int8(small_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One real lite0 INT8 run, shared by the assertions below (it is the expensive part)."""
    folder = tmp_path_factory.mktemp("store-lite0")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    old_cwd, old_uri = os.getcwd(), os.environ.get("MLFLOW_TRACKING_URI")
    os.chdir(folder)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ["PTQ_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "ptq-cache")
    mlflow.set_tracking_uri(uri)
    try:
        run_id = pipeline.run(RunConfig(model="lite0", data=small_dir, calib_size=60, min_queries=30, min_duration_s=0, blocks=3, warmup=5, progress=False))
    finally:
        os.chdir(old_cwd)
        if old_uri is not None:
            os.environ["MLFLOW_TRACKING_URI"] = old_uri
    return folder, run_id


@pytest.fixture
def lite0_store(lite0_int8: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> str:
    folder, run_id = lite0_int8
    monkeypatch.chdir(folder)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    return run_id


def test_lite0_int8_run_is_complete(lite0_store: str) -> None:
    run = only_run()
    assert run.run_id == lite0_store and run.status == "FINISHED"
    assert run["params.model"] == "lite0" and run["params.precision"] == "int8" and run["params.calib_size"] == "60"
    assert run["params.per_channel"] == "true" and run["params.activation_type"] == "uint8"
    assert len(run["params.data_hash"]) == 16 and run["tags.ptq.accuracy"] == "measured"
    for tag in ("device.host", "device.cpu", "device.cores", "device.os", "version.onnxruntime", "version.torch"):
        assert run[f"tags.{tag}"]
    for phase in ("export", "preprocess", "calibrate", "quantize", "build", "total"):
        assert run[f"metrics.compress/{phase}_s"] > 0
    assert run["metrics.size/model_bytes"] < run["metrics.size/fp32_bytes"] / 3  # int8 weights
    assert run["metrics.model/params"] > 4e6
    assert run["metrics.data/calib_images"] == 60 and run["metrics.data/eval_images"] == 240
    assert run["tags.numerics.model"] == "int8 QDQ: int8 per-channel weights, uint8 asymmetric activations, minmax calibration"
    assert run["tags.numerics.fp32"] == "fp32" and run["tags.numerics.int8_graph"] == "pre-processed (quant_pre_process)"


def test_lite0_int8_latency_alternates_blocks_and_logs_its_interval(lite0_store: str, tmp_path: Path) -> None:
    run = only_run()
    assert (run["params.min_queries"], run["params.min_duration_s"], run["params.blocks"], run["params.warmup"]) == ("30", "0", "3", "5")
    assert run["metrics.latency/queries"] == 30 and run["metrics.latency/blocks"] == 3  # 3 blocks of 10: duration 0 adds none
    path = mlflow.artifacts.download_artifacts(run_id=lite0_store, artifact_path="latency.csv", dst_path=str(tmp_path))
    table = pd.read_csv(path)
    assert list(table.columns) == ["precision", "block", "ms"]
    assert table.groupby(["precision", "block"]).size().to_dict() == {(p, b): 10 for p in ("fp32", "int8") for b in range(3)}
    lat = {p: bench.Latency(g["ms"].to_numpy(), g["block"].to_numpy(), 1.0, 1) for p, g in table.groupby("precision")}
    assert run["metrics.latency/p50_ms"] == pytest.approx(lat["int8"].percentiles()[0], abs=1e-3)
    assert run["metrics.latency/fp32_p99_ms"] == pytest.approx(lat["fp32"].percentiles()[2], abs=1e-3)
    assert run["metrics.speedup/p50"] == pytest.approx(lat["fp32"].percentiles()[0] / lat["int8"].percentiles()[0], rel=1e-3)
    low, high = bench.speedup_ci(lat["fp32"], lat["int8"])  # the logged interval is the block bootstrap of the logged queries
    assert (run["metrics.speedup/p50_ci95_low"], run["metrics.speedup/p50_ci95_high"]) == (pytest.approx(low, rel=1e-3), pytest.approx(high, rel=1e-3))
    assert run["metrics.latency/block_p50_spread_pct"] == pytest.approx(lat["int8"].block_p50_spread_pct(), rel=1e-3)


def test_lite0_int8_resources_per_second_and_per_phase(lite0_store: str) -> None:
    run = only_run()
    history = mlflow.MlflowClient().get_metric_history(lite0_store, "system/ptq_process_rss_megabytes")
    assert len(history) >= 5 and sorted(m.step for m in history) == list(range(len(history)))  # one step per sample
    table = mlflow.artifacts.load_dict(f"runs:/{lite0_store}/phases.json")
    phases = pd.DataFrame(table["data"], columns=table["columns"]).set_index("phase")
    for phase in ("export", "calibrate", "quantize", "latency", "evaluate", "fp32_evaluate"):
        assert phases.loc[phase, "seconds"] > 0
        assert phases.loc[phase, "peak_rss_mb"] > 100
    assert phases.loc["calibrate", "cpu_pct_mean"] > 0
    assert run["metrics.compress/peak_rss_mb"] > 100 and run["metrics.compress/cpu_pct_mean"] > 0
    assert run["tags.monitor.psutil"] == "on"
    try:  # NVML is on exactly where it opens on this machine
        NvmlSource().open()
        assert run["tags.monitor.nvml"] == "on"
    except Exception as exc:
        assert run["tags.monitor.nvml"].startswith(f"absent ({type(exc).__name__}")


def test_lite0_int8_accuracy_and_drop(lite0_store: str) -> None:
    run = only_run()
    assert run["metrics.acc/fp32_top1"] > 0.75  # real pretrained weights on real images
    assert run["metrics.acc/top1"] > 0.70
    assert run["metrics.acc/top1_drop_pt"] == pytest.approx(100 * (run["metrics.acc/fp32_top1"] - run["metrics.acc/top1"]))
    assert abs(run["metrics.acc/top1_drop_pt"]) < 3.0  # per-channel PTQ keeps lite0 accurate


def test_lite0_int8_artifacts_and_predictions(lite0_store: str, tmp_path: Path) -> None:
    assert {"monitor", "predictions.csv", "split.json", "summary.md"} <= artifacts(lite0_store) and "model" not in artifacts(lite0_store)
    models = tracking.download_models(lite0_store, tmp_path / "models")  # the models, once each: models:/<id>
    assert {p.name for p in models["int8-onnx"].rglob("*")} >= {"model.onnx", "calibration_ranges.json"} and set(models) == {"fp32-onnx", "int8-onnx"}
    path = mlflow.artifacts.download_artifacts(run_id=lite0_store, artifact_path="predictions.csv", dst_path=str(tmp_path))
    rows = list(csv.DictReader(open(path)))
    run = only_run()
    assert len(rows) == 240
    assert sum(int(r["correct"]) for r in rows) / len(rows) == pytest.approx(run["metrics.acc/top1"])
    assert sum(int(r["fp32_correct"]) for r in rows) / len(rows) == pytest.approx(run["metrics.acc/fp32_top1"])
    split = mlflow.artifacts.load_dict(f"runs:/{lite0_store}/split.json")
    assert not set(split["calib"]) & set(split["eval"])


def test_seed_model_random_weights(small_dir: Path) -> None:
    run_id = pipeline.run(
        RunConfig(model="mob-s", weights="random", data=small_dir, calib_size=16, min_queries=10, min_duration_s=0, blocks=2, warmup=2, monitor=False, progress=False)
    )
    run = only_run()
    assert run.run_id == run_id and run.status == "FINISHED"
    assert run["tags.ptq.accuracy"] == "none (weights=random)"
    assert "metrics.acc/top1" not in run or pd.isna(run["metrics.acc/top1"])
    assert run["metrics.size/ratio"] > 2 and run["metrics.latency/p50_ms"] > 0 and run["metrics.speedup/p50"] > 0
    assert not any(c.startswith("metrics.system/") or c == "metrics.compress/peak_rss_mb" for c in run.index if not pd.isna(run[c]))  # monitor=false
    assert "phases.json" not in artifacts(run_id)


def test_entropy_calibration_with_uneven_image_count(small_dir: Path) -> None:
    """ORT's histogram calibrators break on a short last batch; 10 images calibrate in 2 batches of 5."""
    from ptq.quantizers.ort import even_batch

    assert (even_batch(10, 8), even_batch(300, 8), even_batch(97, 8), even_batch(3, 8)) == (5, 6, 1, 3)
    cfg = RunConfig(model="mob-s", weights="random", data=small_dir, calib_size=10, eval_size=8, min_queries=4, min_duration_s=0, blocks=2, warmup=1,
                    options={"calib_method": "entropy", "calib_bins": "256"}, monitor=False, progress=False)
    assert mlflow.get_run(pipeline.run(cfg)).info.status == "FINISHED"


def test_failure_mid_run_is_marked_failed_and_keeps_what_was_logged(small_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("evaluation exploded")

    monkeypatch.setattr(bench, "evaluate", broken)
    with pytest.raises(RuntimeError, match="exploded"):
        pipeline.run(RunConfig(model="lite0", precision="fp32", data=small_dir, calib_size=10, min_queries=4, min_duration_s=0, blocks=2, warmup=1, progress=False))
    run = only_run()
    assert run.status == "FAILED"
    assert "evaluation exploded" in run["tags.ptq.error"]
    assert run["metrics.size/fp32_bytes"] > 0 and run["metrics.latency/p50_ms"] > 0
    assert "error.txt" in artifacts(run.run_id)
    logged = mlflow.search_logged_models(experiment_ids=[run.experiment_id], filter_string=f"source_run_id = '{run.run_id}'", output_format="list")
    assert [m.name for m in logged] == ["fp32-onnx"]  # the model logged before the failure stays
    assert not [t for t in threading.enumerate() if t.name == "ptq-monitor"]  # the sampler died with its run


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model": "resnet9000"}, "unknown model 'resnet9000': use one of mob-s, mob-l"),
        ({"precision": "int4"}, "unknown precision 'int4'"),
        ({"backend": "openvino"}, "unknown backend 'openvino'"),
        ({"data": Path("/nonexistent/images")}, "does not exist"),
        ({"options": {"calib_method": "magic"}}, "unknown calib_method 'magic'"),
        ({"options": {"workspace_mb": "2048"}}, "workspace_mb is an option of backend tensorrt, not of ort"),
        ({"options": {"calib_bins": "many"}}, "calib_bins='many' is not a whole number"),
    ],
)
def test_bad_input_fails_before_any_run(small_dir: Path, changes: dict[str, object], message: str) -> None:
    cfg = RunConfig(**{"model": "lite0", "data": small_dir, **changes})  # type: ignore[arg-type]
    with pytest.raises(PtqError, match=message):
        pipeline.run(cfg)
    assert mlflow.search_runs(search_all_experiments=True).empty


def test_own_onnx_file_and_a_corrupt_one(small_dir: Path, tmp_path: Path) -> None:
    from ptq import export, models

    path = export.to_onnx(models.resolve("mob-s").build("random"), 224, tmp_path / "mine.onnx")  # type: ignore[misc]
    run_id = pipeline.run(RunConfig(model=str(path), weights="random", precision="int8", data=small_dir, calib_size=8, eval_size=8, min_queries=4, min_duration_s=0, blocks=2, warmup=1, monitor=False, progress=False))
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["ptq.model_source"] == "onnx" and run.data.metrics["size/ratio"] > 3
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07garbage that is not a protobuf")
    with pytest.raises(PtqError, match="broken.onnx is not a valid ONNX model.*re-export"):
        pipeline.run(RunConfig(model=str(broken), data=small_dir))
    assert len(mlflow.search_runs(search_all_experiments=True)) == 1  # refused before a run was opened


def test_pretrained_torchvision_offline_names_file_and_remedies(small_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")  # guarantee no download, even on a machine with internet
    with pytest.raises(PtqError) as err:
        pipeline.run(RunConfig(model="r18", data=small_dir))
    text = str(err.value)
    assert "resnet18-" in text and str(tmp_path / "torch-home") in text and "weights=random" in text
    assert "\n" not in text


def test_unreachable_tracking_server_records_the_run_offline(small_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from ptq import tracking

    monkeypatch.setenv("PTQ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tracking, "_sync_target", None)
    mlflow.set_tracking_uri("http://127.0.0.1:9")
    run_id = pipeline.run(RunConfig(model="mob-s", weights="random", precision="fp32", data=small_dir, calib_size=4, min_queries=4, min_duration_s=0, blocks=2, warmup=1, monitor=False, progress=False))
    assert mlflow.get_tracking_uri() == tracking.offline_uri()
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["ptq.sync_target"] == "http://127.0.0.1:9"
    assert str(tmp_path / "cache" / "offline" / "artifacts") in run.info.artifact_uri


def test_cli_prints_one_line_error(small_dir: Path) -> None:
    out = subprocess.run(
        [str(BIN / "ptq"), "run", "--model", "nope", "--data", str(small_dir)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: unknown model 'nope'")


def test_cli_models_lists_sources() -> None:
    out = subprocess.run([str(BIN / "ptq"), "models"], capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    for name in ("mob-s", "d201", "lite0", "lite2"):
        assert name in out.stdout


def test_mlflow_run_entry_point(small_dir: Path, store: Path) -> None:
    """The design card's command, with the local environment manager (no conda here)."""
    project = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    out = subprocess.run(
        [str(BIN / "mlflow"), "run", str(project), "--env-manager", "local", "--experiment-name", "entry",
         "-P", "model=lite0", "-P", "precision=fp16", "-P", f"data={small_dir}", "-P", "calib_size=10",
         "-P", "eval_size=50", "-P", "min_queries=4", "-P", "min_duration_s=0", "-P", "blocks=2", "-P", "warmup=1", "-P", "monitor=false"],
        capture_output=True, text=True, timeout=600, env=env, cwd=store,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run = mlflow.search_runs(experiment_names=["entry"]).iloc[0]
    assert run.status == "FINISHED" and run["params.precision"] == "fp16"
    assert run["metrics.size/ratio"] > 1.9 and run["metrics.acc/top1"] > 0.6
