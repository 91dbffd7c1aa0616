"""Quantize on a host, run on a device: `ptq quantize` writes the QDQ model for TensorRT with its FP32 source and
record; `ptq run --model <qdq>.onnx` measures it against that source without calibrating, and refuses what would
mislead (evaluation images that calibrated it, an FP32 file that is not its source, a QDQ model from elsewhere)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import onnx
import pytest

from ptq import pipeline, prequantize
from ptq.config import RunConfig
from ptq.errors import PtqError
from ptq.quantizers import qdq_rules

pytestmark = pytest.mark.device  # the device side runs without torch (lanes 3.8 and 3.10 too)

FAST = {"eval_size": 120, "min_queries": 30, "min_duration_s": 0, "blocks": 2, "warmup": 2, "monitor": False, "progress": False}


@pytest.fixture(scope="module")
def qdq(lite0_onnx: Path, small_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("qdq") / "lite0_int8_qdq.onnx"
    return prequantize.write(str(lite0_onnx), "tensorrt", small_dir, out, calib_size=40)


def test_quantize_writes_qdq_fp32_and_record(qdq: Path, lite0_onnx: Path) -> None:
    assert sorted(p.name for p in qdq.parent.iterdir()) == ["lite0_int8_qdq.fp32.onnx", "lite0_int8_qdq.json", "lite0_int8_qdq.onnx", "lite0_int8_qdq.ranges.json"]
    assert qdq_rules.violations(onnx.load(str(qdq)), tensorrt_major=8) == []
    record = json.loads(qdq.with_suffix(".json").read_text())
    assert record["quantizer"] == "ort-for-tensorrt" and record["calib_size"] == 40 and len(record["calib_images"]) == 40
    assert set(record["seconds"]) == {"export", "load_data", "preprocess", "calibrate", "quantize"}
    assert (qdq.parent / record["fp32"]).read_bytes() == lite0_onnx.read_bytes()


def test_run_of_a_qdq_model_calibrates_nothing_and_measures_against_its_fp32(qdq: Path, small_dir: Path) -> None:
    run = mlflow.get_run(pipeline.run(RunConfig(model=str(qdq), precision="int8", data=small_dir, calib_size=40, **FAST)))  # type: ignore[arg-type]
    m, tags = run.data.metrics, run.data.tags
    assert run.info.status == "FINISHED" and run.info.run_name == "lite0-int8-ort"
    assert not [k for k in m if k.startswith("compress/") and k.split("/")[1] in ("calibrate_s", "quantize_s", "preprocess_s")]
    assert tags["ptq.qdq_model"] == "lite0_int8_qdq.onnx, made by ptq quantize (ort-for-tensorrt) from lite0_int8_qdq.fp32.onnx"
    assert "laid out for TensorRT" in tags["numerics.qdq"] and tags["numerics.fp32"] == "fp32"
    assert m["size/model_bytes"] == qdq.stat().st_size and m["size/fp32_bytes"] == (qdq.parent / "lite0_int8_qdq.fp32.onnx").stat().st_size
    assert m["acc/fp32_top1"] > 0.7 and abs(m["acc/top1_drop_pt"]) < 5  # real weights, real INT8


def test_qdq_model_refusals(qdq: Path, small_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(PtqError, match=r"evaluation images calibrated lite0_int8_qdq.onnx: run with calib_size=40 and split_seed=0"):
        pipeline.run(RunConfig(model=str(qdq), precision="int8", data=small_dir, calib_size=40, split_seed=1, **FAST))  # type: ignore[arg-type]
    with pytest.raises(PtqError, match=r"is an INT8 \(QDQ\) model: run it with precision=int8, or give lite0_int8_qdq.fp32.onnx"):
        pipeline.run(RunConfig(model=str(qdq), precision="fp16", data=small_dir, **FAST))  # type: ignore[arg-type]
    with pytest.raises(PtqError, match="keep_float does not apply"):
        pipeline.run(RunConfig(model=str(qdq), precision="int8", data=small_dir, calib_size=40, options={"keep_float": "x"}, **FAST))  # type: ignore[arg-type]
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(qdq, alone / qdq.name)
    with pytest.raises(PtqError, match="FP32 model lite0_int8_qdq.fp32.onnx, which is not beside it"):
        prequantize.read(alone / qdq.name)
    (alone / "lite0_int8_qdq.fp32.onnx").write_bytes(b"another model")
    with pytest.raises(PtqError, match="not the FP32 model lite0_int8_qdq.onnx was quantized from"):
        prequantize.read(alone / qdq.name)
    foreign = onnx.load(str(qdq))
    del foreign.metadata_props[:]
    onnx.save(foreign, str(alone / "foreign.onnx"))
    with pytest.raises(PtqError, match="QDQ model without an FP32 reference: make it with `ptq quantize`"):
        prequantize.read(alone / "foreign.onnx")
    with pytest.raises(PtqError, match="is quantized already: give its FP32 model"):
        prequantize.write(str(qdq), "tensorrt", small_dir, tmp_path / "again.onnx")
    assert mlflow.search_runs(search_all_experiments=True).empty
