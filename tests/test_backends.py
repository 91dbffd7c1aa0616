"""Backends: the torch baseline for real on this CPU; TensorRT's GPU-free logic for real, its GPU path where TensorRT imports."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest

from ptq import pipeline, tracking
from ptq.backends import get_backend
from ptq.backends import tensorrt as trt_backend
from ptq.backends.tensorrt import CalibrationFeed, Capabilities, TensorRTOptions, check_capabilities, check_version, engine_mismatch, resolve_int8_mode
from ptq.config import RunConfig
from ptq.errors import PtqError
from ptq.phases import Phases

HAS_TENSORRT = trt_backend.trt is not None and hasattr(trt_backend.trt, "Builder")


def test_torch_backend_fp32_run(small_dir: Path, tmp_path: Path) -> None:
    run_id = pipeline.run(
        RunConfig(model="lite0", backend="torch", precision="fp32", data=small_dir, calib_size=10, eval_size=64, min_queries=10, min_duration_s=0, blocks=2, warmup=2, monitor=False, progress=False)
    )
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["acc/top1"] > 0.7 and run.data.metrics["latency/p50_ms"] > 0
    assert run.data.tags["version.torch"] and run.data.tags["ptq.backend_device"]
    models = tracking.download_models(run_id, tmp_path)  # the state dict as it is, a model of its own beside the FP32 ONNX
    assert set(models) == {"fp32-onnx", "fp32-torch"} and (models["fp32-torch"] / "model_fp32.pt").is_file()


def test_torch_backend_refuses_int8_before_work(small_dir: Path) -> None:
    with pytest.raises(PtqError, match="fp32 and fp16 only"):
        pipeline.run(RunConfig(model="lite0", backend="torch", precision="int8", data=small_dir))
    assert mlflow.search_runs(search_all_experiments=True).empty


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_tensorrt_missing_fails_at_once_with_install_hint(small_dir: Path) -> None:
    with pytest.raises(PtqError) as err:
        pipeline.run(RunConfig(model="lite0", backend="tensorrt", precision="fp16", data=small_dir))
    assert "JetPack" in str(err.value) and "pip install tensorrt" in str(err.value) and "\n" not in str(err.value)
    assert mlflow.search_runs(search_all_experiments=True).empty


def test_int8_mode_follows_tensorrt_version() -> None:
    assert resolve_int8_mode("auto", "8.5.2.2") == "implicit"  # JetPack 5 / Xavier
    assert resolve_int8_mode("auto", "8.6.2") == "implicit"
    assert resolve_int8_mode("auto", "10.3.0") == "explicit"  # JetPack 6 / Orin
    assert resolve_int8_mode("implicit", "10.3.0") == "implicit"


def test_tensorrt_versions_outside_8_5_to_11_are_refused() -> None:
    for ok in ("8.5.2.2", "8.6.2.3", "10.3.0", "10.13.0.35", "11.0.0", "11.4.0.2"):  # 11: strongly typed builds
        check_version(ok)
    for old_or_new in ("8.4.1.5", "7.1.3", "12.0.0"):
        with pytest.raises(PtqError, match=f"TensorRT {old_or_new} is not supported.*8.5 to 11"):
            check_version(old_or_new)


def test_unsupported_precision_or_dla_is_refused() -> None:
    no_int8 = Capabilities(fast_fp16=True, fast_int8=False, dla_cores=0)
    with pytest.raises(PtqError, match="no fast INT8"):
        check_capabilities("int8", TensorRTOptions(), no_int8)
    check_capabilities("fp16", TensorRTOptions(), no_int8)
    with pytest.raises(PtqError, match="dla_core=1 but this device has 0 DLA"):
        check_capabilities("fp16", TensorRTOptions(dla_core=1), no_int8)
    check_capabilities("int8", TensorRTOptions(dla_core=1), Capabilities(True, True, 2))  # Xavier/Orin AGX: 2 DLAs


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (TensorRTOptions(workspace_mb=0), "workspace_mb"),
        (TensorRTOptions(int8_mode="fancy"), "unknown int8_mode"),
        (TensorRTOptions(dla_core=-2), "dla_core"),
        (TensorRTOptions(calib_method="magic"), "unknown calib_method"),
        (TensorRTOptions(keep_float=("4",)), "backend=tensorrt keeps named nodes in float: give their ONNX names"),
    ],
)
def test_engine_options_are_validated(options: TensorRTOptions, message: str) -> None:
    with pytest.raises(PtqError, match=message):
        options.validate()


def test_calibration_feed_rechunks_to_fixed_batches_and_keeps_cache(tmp_path: Path) -> None:
    batches = iter([np.full((3, 3, 4, 4), i, np.float32) for i in range(5)])  # 15 images in batches of 3
    feed = CalibrationFeed(batches, 4, tmp_path / "calibration.cache")
    out = []
    while (b := feed.next_batch()) is not None:
        out.append(b)
    assert [len(b) for b in out] == [4, 4, 4] and feed.fed == 12 and feed.dropped == 3
    assert all(b.flags["C_CONTIGUOUS"] and b.dtype == np.float32 for b in out)
    assert out[1][0, 0, 0, 0] == 1 and out[1][-1, 0, 0, 0] == 2  # order preserved across chunk borders
    assert feed.seconds() >= 0 and feed.read_cache() is None
    feed.write_cache(memoryview(b"TRT-8502-EntropyCalibration2\ninput: 3c010a14\n"))
    assert feed.read_cache() == b"TRT-8502-EntropyCalibration2\ninput: 3c010a14\n"


def test_engine_metadata_mismatch_is_explained() -> None:
    built = {"tensorrt": "8.5.2.2", "gpu": "NVIDIA Jetson AGX Xavier", "precision": "int8"}
    assert engine_mismatch(built, {"tensorrt": "8.5.2.2", "gpu": "NVIDIA Jetson AGX Xavier"}) is None
    why = engine_mismatch(built, {"tensorrt": "10.3.0", "gpu": "NVIDIA Jetson AGX Orin"})
    assert why is not None and "8.5.2.2" in why and "10.3.0" in why


def test_phase_carving_keeps_totals() -> None:
    phases = Phases()
    phases.seconds["build"] = 10.0
    phases.carve("build", "calibrate", 4.0)
    assert phases.seconds == {"build": 6.0, "calibrate": 4.0}
    phases.carve("build", "calibrate", 99.0)  # never more than the phase had
    assert phases.seconds == {"build": 0.0, "calibrate": 10.0}


@pytest.mark.skipif(not HAS_TENSORRT, reason="TensorRT is not installed on this machine (it needs an NVIDIA GPU)")
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tensorrt_end_to_end(small_dir: Path, precision: str, tmp_path: Path) -> None:
    run_id = pipeline.run(
        RunConfig(model="lite0", backend="tensorrt", precision=precision, data=small_dir, calib_size=64, eval_size=128, min_queries=50, min_duration_s=0, progress=False)
    )
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["compress/build_s"] > 0
    assert abs(run.data.metrics["acc/top1_drop_pt"]) < 3
    engine = tracking.download_models(run_id, tmp_path)[f"{precision}-tensorrt"]  # the engine is a model of its own, with its metadata
    assert (engine / f"model_{precision}.engine").is_file()
    meta = json.loads((engine / f"model_{precision}.json").read_text())
    assert meta["tensorrt"] == run.data.tags["version.tensorrt"]


def test_backend_registry() -> None:
    assert get_backend("ort").name == "ort" and get_backend("torch").name == "torch" and get_backend("tensorrt").name == "tensorrt"


def test_numerics_say_what_each_backend_really_computes() -> None:
    from ptq.backends import tensorrt
    from ptq.backends.torch import TorchBackend
    from ptq.quantizers.ort import QuantOptions, describe

    assert tensorrt.numerics("fp32", "", -1) == "fp32 (TF32 off)"
    assert tensorrt.numerics("int8", "explicit", -1) == "int8 with fp16 fallback (explicit quantization, TF32 off)"
    assert tensorrt.numerics("fp16", "", 1) == "fp16 with fp32 fallback (TF32 off) on DLA core 1 with GPU fallback"
    torch_backend = TorchBackend()
    torch_backend.dev = __import__("torch").device("cuda:0")  # the label only; nothing runs on it
    assert torch_backend.numerics("fp32") == "fp32 (TF32 off)" and torch_backend.numerics("fp16") == "fp16"
    assert describe(QuantOptions(per_channel=False, calib_method="entropy", activation_type="int8", symmetric_activations=True)) == (
        "int8 QDQ: int8 per-tensor weights, int8 symmetric activations, entropy calibration"
    )


def test_tensorrt_layer_times_become_a_profile() -> None:
    """IProfiler reports (layer, ms) over 2 queries: mean µs per query per layer, op type from the fused node name."""
    reports = [("/a/Conv + /a/Relu", 0.5), ("/b/MatMul", 0.1), ("Reformat 1", 0.02), ("/a/Conv + /a/Relu", 0.7), ("/b/MatMul", 0.1), ("Reformat 1", 0.04)]
    prof = trt_backend.layer_profile(reports, 2, 3.0)
    assert [(n.name, n.op_type, round(n.us, 6)) for n in prof.nodes] == [("/a/Conv + /a/Relu", "Conv", 600.0), ("/b/MatMul", "MatMul", 100.0), ("Reformat 1", "layer", 30.0)]
    assert prof.queries == 2 and prof.run_us == 1500.0 and round(prof.total_us, 6) == 730.0
