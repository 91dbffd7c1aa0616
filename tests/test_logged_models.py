"""The FP32 and the compressed model as MLflow LoggedModels: listed by the run, loadable by pyfunc, carrying the
run's metrics; also for a model that is not ONNX, after a failover to the offline store, and after `ptq sync`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import mlflow
import numpy as np
import onnx
import pytest
from mlflow.entities import LoggedModel, LoggedModelStatus
from mlflow.tracking import MlflowClient
from onnx import TensorProto, helper

from ptq import data, models, pipeline, sync, tracking
from ptq.backends import Compressed
from ptq.config import RunConfig
from ptq.phases import Phases
from test_server import kill_server, mlflow_server


def run_models(client: MlflowClient, run_id: str) -> dict[str, LoggedModel]:
    """The logged models run `run_id` produced, by name."""
    experiment_id = client.get_run(run_id).info.experiment_id
    found = client.search_logged_models([experiment_id], f"source_run_id = '{run_id}'")
    return {m.name: m for m in found}


def output_ids(client: MlflowClient, run_id: str) -> set[str]:
    """The models the run lists as its outputs (its "Logged models" tab)."""
    outputs = client.get_run(run_id).outputs
    return {o.model_id for o in outputs.model_outputs} if outputs else set()


def linked(model: LoggedModel) -> dict[str, float]:
    """The metrics linked to a model, latest value per key."""
    return {m.key: m.value for m in sorted(model.metrics or [], key=lambda m: m.timestamp)}


def tiny_onnx(path: Path) -> Path:
    """A 4-class classifier of 3x8x8 images (average pool, then a linear layer) with a symbolic batch dimension."""
    weights = helper.make_tensor("w", TensorProto.FLOAT, [3, 4], np.arange(12, dtype=np.float32).tolist())
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]), helper.make_node("Flatten", ["pooled"], ["flat"]),
         helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])], [weights],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def test_int8_run_logs_both_models_and_the_int8_one_classifies_like_the_run(small_dir: Path, tmp_path: Path) -> None:
    run_id = pipeline.run(RunConfig(model="lite0", precision="int8", data=small_dir, calib_size=8, eval_size=16, min_queries=4,
                                    min_duration_s=0, blocks=2, warmup=1, monitor=False, progress=False))
    assert mlflow.active_run() is None
    client = MlflowClient()
    run = client.get_run(run_id)
    found = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert {(m.name, m.params["precision"], m.source_run_id) for m in found} == {("fp32-onnx", "fp32", run_id), ("int8-onnx", "int8", run_id)}
    by_name = {m.name: m for m in found}
    int8, fp32 = by_name["int8-onnx"], by_name["fp32-onnx"]
    assert output_ids(client, run_id) == {int8.model_id, fp32.model_id}
    assert all(m.status == LoggedModelStatus.READY for m in found)
    assert int8.params["backend"] == "ort" and int8.params["calib_size"] == "8"  # the run's params, as log_model copies them
    assert int8.tags["numerics"] == run.data.tags["numerics.model"] and int8.tags["ptq.role"] == "measured"
    assert fp32.tags["numerics"] == "fp32" and fp32.tags["ptq.role"] == "fp32 reference"

    metrics = linked(int8)  # the run's metrics from compression on carry the INT8 model's id; none are the FP32 model's
    for key in ("acc/top1", "latency/p50_ms", "speedup/p50", "size/model_bytes"):
        assert metrics[key] == run.data.metrics[key]
    assert not fp32.metrics
    assert "model" not in {a.path for a in client.list_artifacts(run_id)}  # each model file once: as its LoggedModel

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{int8.model_id}", dst_path=str(tmp_path / "int8")))
    assert json.loads((local / "extra_files" / "calibration_ranges.json").read_text())
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(str(local / "model.onnx")).graph.node}  # the int8 graph, not a copy of fp32

    predictions = Path(client.download_artifacts(run_id, "predictions.csv", str(tmp_path)))
    row = next(csv.DictReader(predictions.open()))
    dataset = data.scan(small_dir)
    index = [f.name for f in dataset.files].index(row["image"])
    batch = data.load_tensors(dataset, models.resolve("lite0").transform, progress=False).batch([index])
    loaded = mlflow.pyfunc.load_model(f"models:/{int8.model_id}", dst_path=str(tmp_path))
    logits = loaded.predict(batch)["logits"]
    assert logits.shape == (1, 1000) and int(np.argmax(logits[0])) == int(row["top5"].split()[0])


def test_an_engine_is_a_model_of_its_own_beside_the_fp32_onnx(tmp_path: Path) -> None:
    """A TensorRT engine (a fake one: no GPU here) is stored as it is with its metadata JSON, not as ONNX."""
    fp32 = tiny_onnx(tmp_path / "model_fp32.onnx")
    engine = tmp_path / "model_int8.engine"
    engine.write_bytes(b"not really a TensorRT engine")
    meta = engine.with_suffix(".json")
    meta.write_text(json.dumps({"tensorrt": "10.3", "gpu": "Orin"}))
    qdq = tiny_onnx(tmp_path / "model_int8_qdq.onnx")  # the intermediate QDQ graph stays a run artifact only
    compressed = Compressed(engine, [qdq, meta], numerics="int8 with fp16 fallback")
    phases = Phases()
    with phases("build"):
        pass
    with mlflow.start_run(run_name="sweep parent") as parent:  # a fluent run is active, as in a sweep
        active_experiment = mlflow.tracking.fluent._get_experiment_id()
        with tracking.run("ptq", "trt-int8", {"precision": "int8", "backend": "tensorrt"}, {}, parent.info.run_id) as rec:
            pipeline._log_compression(rec, phases, fp32, compressed)
            rec.metrics({"acc/top1": 0.5})
            rec.series([("proc/rss_mb", 100.0, 1, 0), ("proc/rss_mb", 101.0, 2, 1)])  # time series are never linked
        assert mlflow.tracking.fluent._get_experiment_id() == active_experiment
        assert mlflow.active_run().info.run_id == parent.info.run_id  # type: ignore[union-attr]
    client = MlflowClient()
    assert not output_ids(client, parent.info.run_id)
    found = run_models(client, rec.run_id)
    assert set(found) == {"fp32-onnx", "int8-tensorrt"}
    trt = found["int8-tensorrt"]
    assert trt.model_type == "tensorrt" and trt.params["precision"] == "int8" and trt.tags["numerics"] == "int8 with fp16 fallback"
    assert found["fp32-onnx"].model_type == "onnx" and found["fp32-onnx"].params["backend"] == "tensorrt"
    assert set(linked(trt)) == {"compress/build_s", "compress/total_s", "size/model_bytes", "size/ratio", "acc/top1"}
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{trt.model_id}", dst_path=str(tmp_path / "trt")))
    assert {p.name for p in local.iterdir()} - {"registered_model_meta"} == {"MLmodel", "model_int8.engine", "model_int8.json"}  # that one: download's own
    assert (local / "model_int8.engine").read_bytes() == engine.read_bytes()
    assert mlflow.models.Model.load(str(local)).flavors == {"tensorrt": {"data": "model_int8.engine"}}
    assert {a.path for a in client.list_artifacts(rec.run_id, "model")} == {"model/model_int8_qdq.onnx"}  # no model's file twice


def test_models_survive_a_lost_server_and_sync_uploads_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run A loses the server after logging its models (failover replays them offline); run B is offline from the
    start. `ptq sync` completes A on the server without duplicating its models and uploads B's; pyfunc loads them there."""
    monkeypatch.setenv("PTQ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tracking, "_sync_target", None)
    for key, value in tracking.RETRY_LIMITS.items():
        monkeypatch.setenv(key, value)
    onnx_file = tiny_onnx(tmp_path / "model_fp32.onnx")
    backend = f"sqlite:///{tmp_path / 'server.db'}"

    def log(rec: tracking.Recorder) -> str:
        rec.model(onnx_file, "fp32-onnx", "onnx", {"precision": "fp32"}, {})
        int8 = rec.model(onnx_file, "int8-onnx", "onnx", {"precision": "int8"}, {})
        rec.link_metrics(int8)
        rec.metrics({"acc/top1": 0.5})
        return int8

    with mlflow_server(backend, tmp_path) as uri:
        port = int(uri.rsplit(":", 1)[1])
        mlflow.set_tracking_uri(uri)
        with tracking.run("ptq", "a", {"precision": "int8"}, {}) as rec:
            server_int8 = log(rec)
            server_run = rec.run_id
            kill_server(uri)
            rec.metrics({"acc/top5": 0.75})  # fails over: the journal, models and links included, is replayed offline
        assert rec.run_id != server_run and mlflow.get_tracking_uri() == tracking.offline_uri()
    offline = MlflowClient(tracking.offline_uri())
    replayed = run_models(offline, rec.run_id)
    assert set(replayed) == {"fp32-onnx", "int8-onnx"} and rec.model_ids["int8-onnx"] == replayed["int8-onnx"].model_id
    assert linked(offline.get_logged_model(rec.model_ids["int8-onnx"])) == {"acc/top1": 0.5, "acc/top5": 0.75}
    with tracking.run("ptq", "b", {"precision": "int8"}, {}) as offline_rec:
        log(offline_rec)

    with mlflow_server(backend, tmp_path, port) as uri:
        assert sorted(sync.sync().uploaded) == sorted([rec.run_id, offline_rec.run_id])
        server = MlflowClient(uri)
        completed = run_models(server, server_run)
        assert set(completed) == {"fp32-onnx", "int8-onnx"} and completed["int8-onnx"].model_id == server_int8
        assert output_ids(server, server_run) == {m.model_id for m in completed.values()}
        assert linked(server.get_logged_model(server_int8)) == {"acc/top1": 0.5, "acc/top5": 0.75}
        (uploaded_run,) = server.search_runs([server.get_run(server_run).info.experiment_id], f"tags.`ptq.source_run` = '{offline_rec.run_id}'")
        uploaded = run_models(server, uploaded_run.info.run_id)
        assert {n: m.params["precision"] for n, m in uploaded.items()} == {"fp32-onnx": "fp32", "int8-onnx": "int8"}
        assert output_ids(server, uploaded_run.info.run_id) == {m.model_id for m in uploaded.values()}
        assert linked(uploaded["int8-onnx"]) == {"acc/top1": 0.5}
        mlflow.set_tracking_uri(uri)
        loaded = mlflow.pyfunc.load_model(f"models:/{uploaded['int8-onnx'].model_id}", dst_path=str(tmp_path))
        logits = loaded.predict(np.ones((2, 3, 8, 8), dtype=np.float32))["logits"]
        assert np.allclose(logits, np.ones((2, 3)) @ np.arange(12, dtype=np.float32).reshape(3, 4))
        assert sync.sync().uploaded == []
        assert len(run_models(server, uploaded_run.info.run_id)) == 2 and len(run_models(server, server_run)) == 2
