"""Quantizers as a choice beside backends: options routed to their owner, toolkits (NNCF, Quark, AIMET) run for real in
their own environments on EfficientNet-Lite0 and real images, each technique timed as its phase."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import onnx
import pytest

from ptq import data, sweep
from ptq.config import RunConfig
from ptq.errors import PtqError
from ptq.phases import Phases
from ptq.quantizers import parse_spec, toolkit


def _toolkit(name: str) -> None:
    """The toolkit's environment must be there in CI (.ci/run makes it); elsewhere its tests say how to get it."""
    try:
        toolkit.check(name)
    except PtqError as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def calibration(sample_dir: Path) -> np.ndarray:
    """Eight real ImageNet images as lite0 takes them."""
    from ptq import models

    dataset = data.scan(sample_dir)
    tensors = data.load_tensors(dataset, models.resolve("lite0").transform, progress=False, indices=list(range(8)))
    return tensors.batch(list(range(8)))


def _quantize(name: str, given: dict[str, str], model: Path, images: np.ndarray, work: Path) -> tuple[toolkit.Quantized, Phases, list[dict[str, int]]]:
    from ptq import quantizers

    phases, watched = Phases(), []
    made = toolkit.quantize(name, quantizers.options(name, given), model, iter([images]), work, phases, watched.append)
    return made, phases, watched


def test_options_go_to_their_owner_and_only_the_chosen_quantizers_are_logged() -> None:
    cfg = RunConfig(model="lite0", data=Path("."), quantizer="quark", options={"adaround": "true", "iterations": "7", "per_channel": "true"})
    cfg.validate()
    params = cfg.params()
    assert (params["quantizer"], params["adaround"], params["iterations"], params["per_channel"]) == ("quark", "true", "7", "true")
    assert "weight_type" not in params and "calib_bins" not in params and params["activation_type"] == "int8"  # ort's own INT8 settings did not run: quark's did
    assert "adaquant" in params and "seq_mse" not in params  # quark's own options, not aimet's
    own = RunConfig(model="lite0", data=Path(".")).params()
    assert own["quantizer"] == "ort" and own["activation_type"] == "uint8" and "adaround" not in own


@pytest.mark.parametrize(
    ("quantizer", "precision", "backend", "options", "message"),
    [
        ("nncf", "int8", "ort", {"calib_method": "entropy"}, "calib_method sets backend ort's own INT8 quantization (quantizer=ort), not quantizer nncf's"),
        ("nncf", "int8", "ort", {"adaround": "true"}, "adaround is an option of quantizer quark or quantizer aimet, not of ort .*; quantizer nncf takes bias_correction, nncf_preset, per_channel, smoothquant_alpha"),
        ("quark", "fp16", "ort", {}, "quantizer quark makes INT8 models: use precision=int8, or quantizer=ort for fp16"),
        ("aimet", "int8", "torch", {}, "quantizer aimet writes a QDQ ONNX, which backend torch cannot run"),
        ("quark", "int8", "ort", {"adaround": "true", "adaquant": "true"}, "adaround and adaquant both fine-tune the weights after quantizing: choose one"),
        ("nncf", "int8", "ort", {"bias_correction": "slow"}, "unknown bias_correction 'slow': use one of fast, full, none"),
        ("quark", "int8", "ort", {"bias_correction": "true", "calib_method": "entropy"}, "Quark's bias correction works with calib_method minmax or percentile, not entropy"),
        ("aimet", "int8", "ort", {"seq_mse": "true", "calib_method": "tf_enhanced"}, "AIMET's sequential MSE needs the minmax quant scheme"),
        ("openvino", "int8", "ort", {}, "unknown quantizer 'openvino': use one of ort, nncf, quark, aimet"),
    ],
)
def test_bad_quantizer_input_is_one_line_before_work(quantizer: str, precision: str, backend: str, options: dict[str, str], message: str) -> None:
    with pytest.raises(PtqError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        RunConfig(model="lite0", data=Path("."), quantizer=quantizer, precision=precision, backend=backend, options=options).validate()


def test_sweep_specs_vary_quantizers_for_int8_only() -> None:
    assert parse_spec("quark+adaround+iterations=50") == ("quark", {"adaround": "true", "iterations": "50"})
    with pytest.raises(PtqError, match="quantizer nncf has no option 'adaround'"):
        parse_spec("nncf+adaround")
    grid = sweep.combinations(["lite0"], ["fp32", "int8"], ["ort"], ["minmax", "entropy"], ["ort", "nncf+bias_correction=full"])
    assert grid == [
        {"model": "lite0", "precision": "fp32", "backend": "ort", "calib_method": ""},
        {"model": "lite0", "precision": "int8", "backend": "ort", "quantizer": "ort", "calib_method": "minmax"},
        {"model": "lite0", "precision": "int8", "backend": "ort", "quantizer": "ort", "calib_method": "entropy"},
        {"model": "lite0", "precision": "int8", "backend": "ort", "quantizer": "nncf+bias_correction=full", "calib_method": ""},
    ]
    # without quantizers the grid (and so every resume key) is what it always was
    assert sweep.combinations(["lite0"], ["int8"], ["ort"], [""]) == [{"model": "lite0", "precision": "int8", "backend": "ort", "calib_method": ""}]
    base = RunConfig(model="lite0", data=Path("."), options={"calib_method": "entropy"})
    configured = sweep._configure(base, grid[3])
    assert (configured.quantizer, configured.options) == ("nncf", {"bias_correction": "full"})  # ort's calibration stays ort's
    configured.validate()


def test_a_toolkit_missing_everywhere_is_named_with_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PTQ_QUARK_PYTHON", raising=False)
    monkeypatch.setenv("PTQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(toolkit, "_importable", lambda module: False)
    with pytest.raises(PtqError, match=r"^quantizer quark needs amd-quark, which this environment lacks: run `ptq env quark` once"):
        toolkit.check("quark")
    monkeypatch.setenv("PTQ_QUARK_PYTHON", str(tmp_path / "nope"))
    with pytest.raises(PtqError, match="is not a file"):
        toolkit.check("quark")


def test_nncf_full_bias_correction_times_its_techniques(lite0_onnx: Path, calibration: np.ndarray, tmp_path: Path) -> None:
    _toolkit("nncf")
    made, phases, watched = _quantize("nncf", {"bias_correction": "full", "per_channel": "false"}, lite0_onnx, calibration, tmp_path)
    assert made.record["quantizer"] == "nncf" and made.record["techniques"] == ["minmax", "full_bias_correction"]
    assert made.record["versions"]["nncf"] == "3.4.0" and made.record["calibration_images"] == 8
    assert {"toolkit_start", "quantize", "calibrate", "bias_correction", "write"} <= set(phases.seconds)
    assert watched[0].keys() == {"quantizer_"} and watched[-1] == {}  # the monitor sampled the child, then stopped
    ops = [n.op_type for n in onnx.load(str(made.path)).graph.node]
    assert ops.count("QuantizeLinear") > 40 and ops.count("Conv") == 49
    assert toolkit.describe(made.record) == "int8 QDQ by nncf 3.4.0: minmax, full_bias_correction; per-tensor weights"


def test_quark_cle_bias_correction_and_adaround_are_each_a_phase(lite0_onnx: Path, calibration: np.ndarray, tmp_path: Path) -> None:
    _toolkit("quark")
    given = {"cle": "true", "bias_correction": "true", "adaround": "true", "iterations": "2", "calib_method": "minmax"}
    made, phases, _ = _quantize("quark", given, lite0_onnx, calibration[:4], tmp_path)
    assert made.record["techniques"] == ["cle", "minmax", "bias_correction", "adaround"]
    assert made.record["versions"]["amd-quark"] == "0.13" and made.record["versions"]["onnx"] == "1.22.0"  # its own pin, not ptq's
    assert {"toolkit_start", "cle", "calibrate", "bias_correction", "adaround"} <= set(phases.seconds)
    assert toolkit.qdq_nodes(made.path) > 100


def test_aimet_cle_then_min_max_writes_int8_weights(lite0_onnx: Path, calibration: np.ndarray, tmp_path: Path) -> None:
    _toolkit("aimet")
    made, phases, _ = _quantize("aimet", {"cle": "true", "per_channel": "false"}, lite0_onnx, calibration[:4], tmp_path)
    assert made.record["techniques"] == ["cle", "minmax"] and made.record["versions"]["aimet-onnx"] == "2.42.0"
    assert made.record["relu6_made_relu"] > 0 and "ReLU6 into ReLU: the float network changed" in toolkit.describe(made.record)  # lite0's ReLU6 between convs
    assert {"toolkit_start", "cle", "quantize", "calibrate", "write"} <= set(phases.seconds)
    weights = [i for i in onnx.load(str(made.path)).graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(weights) >= 49  # the weights are stored as int8, so the file is smaller than FP32's
    assert made.path.stat().st_size < lite0_onnx.stat().st_size / 2


def test_a_failing_toolkit_fails_with_its_last_lines_and_leaves_no_process(lite0_onnx: Path, tmp_path: Path) -> None:
    _toolkit("nncf")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx file")
    with pytest.raises(PtqError, match=r"^quantizer nncf failed \(exit 1; .*\): .*the whole log is quantizer.log in the run"):
        _quantize("nncf", {}, broken, np.zeros((2, 3, 224, 224), np.float32), tmp_path)
    leftover = subprocess.run(["pgrep", "-f", f"ptq.quantizers.child {tmp_path}"], capture_output=True, text=True).stdout
    assert leftover == ""


def test_ptq_run_with_nncf_logs_the_technique_its_phases_and_its_process(small_dir: Path, store: Path) -> None:
    _toolkit("nncf")
    args = ["--model", "lite0", "--quantizer", "nncf", "--bias-correction", "fast", "--data", str(small_dir), "--calib-size", "16",
            "--eval-size", "32", "--min-queries", "20", "--min-duration-s", "0", "--blocks", "2", "--warmup", "2", "--monitor-interval", "0.2"]
    done = subprocess.run([sys.executable, "-m", "ptq.cli", "run", *args], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert done.returncode == 0, done.stderr[-2000:]
    run = mlflow.get_run(done.stdout.strip())
    assert run.info.status == "FINISHED"
    p, t, m = run.data.params, run.data.tags, run.data.metrics
    assert (p["quantizer"], p["bias_correction"], p["per_channel"]) == ("nncf", "fast", "true") and "calib_method" not in p
    assert t["numerics.qdq"] == "int8 QDQ by nncf 3.4.0: minmax, fast_bias_correction; per-channel weights" and t["version.nncf"] == "3.4.0"
    assert "ptq.quantizer_env" in t and "lite0 int8 by nncf on ort" in t["mlflow.note.content"]
    assert m["compress/calibrate_s"] > 0 and m["compress/bias_correction_s"] > 0 and m["compress/toolkit_start_s"] > 0
    assert m["compress/quantizer_worker_peak_rss_mb"] > 100  # the child's own memory, apart from ptq's process
    client = mlflow.MlflowClient()
    assert [h.value for h in client.get_metric_history(run.info.run_id, "system/ptq_quantizer_worker_rss_megabytes")]
    files = {f.path for f in client.list_artifacts(run.info.run_id, "quantizer")}
    assert files == {"quantizer/quantizer.log", "quantizer/record.json"}
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "phases.json", str(store))).read_text())
    rows = {row[table["columns"].index("phase")]: dict(zip(table["columns"], row)) for row in table["data"]}
    assert {"toolkit_start", "calibrate", "bias_correction", "write"} <= rows.keys()
    assert rows["bias_correction"]["quantizer_worker_peak_rss_mb"] > 100


def test_ptq_quantize_makes_a_toolkits_qdq_file_a_device_runs(lite0_onnx: Path, small_dir: Path, tmp_path: Path) -> None:
    _toolkit("nncf")
    from ptq import prequantize

    out = prequantize.write(str(lite0_onnx), "ort", small_dir, tmp_path / "lite0_nncf_qdq.onnx", calib_size=8, technique="nncf+per_channel=false")
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["quantizer"] == "nncf" and record["technique"]["techniques"] == ["minmax", "fast_bias_correction"]
    assert "calib_method" not in record and len(record["calib_images"]) == 8
    qdq = prequantize.read(out)
    assert qdq is not None and qdq.fp32 == tmp_path / "lite0_nncf_qdq.fp32.onnx"
    assert qdq.numerics() == "int8 QDQ by nncf 3.4.0: minmax, fast_bias_correction; per-tensor weights"


@pytest.mark.parametrize("name", [pytest.param("quark", marks=pytest.mark.slow), "aimet"])  # CI's time: aimet by default
def test_for_tensorrt_quark_and_aimet_lay_out_qdq_that_passes_tensorrts_rules(name: str, lite0_onnx: Path, calibration: np.ndarray, tmp_path: Path) -> None:
    from ptq import quantizers
    from ptq.quantizers import qdq_rules

    _toolkit(name)
    (tmp_path / "plain").mkdir()
    (tmp_path / "trt").mkdir()
    plain = toolkit.quantize(name, quantizers.options(name, {}), lite0_onnx, iter([calibration[:4]]), tmp_path / "plain", Phases())
    assert qdq_rules.violations(onnx.load(str(plain.path)))  # the toolkit's own layout: TensorRT refuses it
    made = toolkit.quantize(name, quantizers.options(name, {}), lite0_onnx, iter([calibration[:4]]), tmp_path / "trt", Phases(), target="tensorrt")
    assert qdq_rules.violations(onnx.load(str(made.path))) == [] and made.record["tensorrt"] is True
    assert toolkit.describe(made.record).endswith("laid out for TensorRT")


def test_nncf_for_tensorrt_is_refused_before_work() -> None:
    with pytest.raises(PtqError, match="^quantizer nncf writes Q/DQ that TensorRT's rules refuse .*: use quantizer quark, aimet or ort with backend tensorrt"):
        toolkit.check("nncf", "tensorrt")


@pytest.mark.slow  # four more Quark runs; the option's routing is tested above
def test_quark_uint8_activations_are_asymmetric_uint8(lite0_onnx: Path, calibration: np.ndarray, tmp_path: Path) -> None:
    _toolkit("quark")
    made, _, _ = _quantize("quark", {"activation_type": "uint8", "calib_method": "minmax"}, lite0_onnx, calibration[:4], tmp_path)
    graph = onnx.load(str(made.path)).graph
    inits = {i.name: i for i in graph.initializer}
    kinds = {inits[n.input[2]].data_type for n in graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits}
    assert onnx.TensorProto.UINT8 in kinds  # activations: what ONNX Runtime's x86 kernels run as u8s8
    from ptq import quantizers

    (tmp_path / "trt").mkdir()
    with pytest.raises(PtqError, match="TensorRT takes symmetric int8 activations only"):
        toolkit.quantize("quark", quantizers.options("quark", {"activation_type": "uint8"}), lite0_onnx, iter([calibration[:2]]), tmp_path / "trt", Phases(), target="tensorrt")
