"""Per-op latency profile: the ORT profile parser on a hand-written trace, then real FP32 and INT8 MobileNetV3-Small
profiles on ONNX Runtime's CPU provider (op types, comparison table, float islands, Q/DQ time, plot)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest
from PIL import Image

from ptq import profile
from ptq.errors import PtqError
from ptq.profile import OpProfile

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(3, 1, 1)


def _event(name: str, ts: int, dur: int, cat: str = "Node", op: str = "", provider: str = "CPUExecutionProvider") -> Dict[str, Any]:
    args: Dict[str, Any] = {"op_name": op, "provider": provider, "input_type_shape": [{"float": [1, 3, 8, 8]}]} if op else {}
    return {"cat": cat, "pid": 1, "tid": 1, "ph": "X", "name": name, "ts": ts, "dur": dur, "args": args}


TRACE: List[Dict[str, Any]] = [
    _event("model_loading_uri", 0, 300, cat="Session"),
    _event("session_initialization", 310, 500, cat="Session"),
    # run 1 (warm-up): ts 1000..1500
    _event("model_run", 1000, 500, cat="Session"),
    _event("conv1_fence_before", 1009, 0, op="Conv"),  # not a kernel time: ignored
    _event("conv1_kernel_time", 1010, 200, op="Conv"),
    _event("relu1_kernel_time", 1215, 20, op="Relu"),
    _event("conv2_kernel_time", 1240, 100, op="Conv"),
    # run 2: ts 2000..2400
    _event("model_run", 2000, 400, cat="Session"),
    _event("conv1_kernel_time", 2010, 150, op="Conv"),
    _event("relu1_kernel_time", 2165, 10, op="Relu"),
    _event("conv2_kernel_time", 2180, 90, op="Conv"),
]


def _trace_file(tmp_path: Path) -> Path:
    path = tmp_path / "ort-profile.json"
    path.write_text(json.dumps(TRACE))
    return path


def test_parser_drops_warmup_runs_and_averages(tmp_path: Path) -> None:
    """warmup=1 keeps the second run alone; warmup=0 averages both; the fence event and session events are no kernels."""
    prof = profile.parse_profile(_trace_file(tmp_path), warmup=1)
    assert prof.queries == 1
    assert {r["node"]: r["us"] for r in prof.by_node()} == {"conv1": 150.0, "relu1": 10.0, "conv2": 90.0}
    assert [r["node"] for r in prof.by_node()] == ["conv1", "conv2", "relu1"]
    assert prof.by_node()[0]["op_type"] == "Conv" and prof.by_node()[0]["provider"] == "CPUExecutionProvider"
    assert prof.by_op() == [
        {"op_type": "Conv", "us": 240.0, "share": 240.0 / 250.0, "nodes": 2},
        {"op_type": "Relu", "us": 10.0, "share": 10.0 / 250.0, "nodes": 1},
    ]
    assert (prof.total_us, prof.run_us, prof.overhead_us) == (250.0, 400.0, 150.0)

    both = profile.parse_profile(_trace_file(tmp_path), warmup=0)
    assert both.queries == 2
    assert {r["node"]: r["us"] for r in both.by_node()} == {"conv1": 175.0, "relu1": 15.0, "conv2": 95.0}
    assert both.by_op()[0] == {"op_type": "Conv", "us": 270.0, "share": 270.0 / 285.0, "nodes": 2}
    assert (both.total_us, both.run_us) == (285.0, 450.0)

    assert both.table() == {"op_type": ["Conv", "Relu"], "us": [270.0, 15.0], "share": [270.0 / 285.0, 15.0 / 285.0], "nodes": [2, 1]}
    cmp = prof.table(both)
    assert cmp["op_type"] == ["Conv", "Relu"]
    assert cmp["fp32_us"] == [240.0, 10.0] and cmp["int8_us"] == [270.0, 15.0]
    assert cmp["int8_over_fp32"] == [270.0 / 240.0, 1.5]
    assert cmp["fp32_nodes"] == [2, 1] and cmp["int8_nodes"] == [2, 1]

    with pytest.raises(PtqError, match="nothing is left after 2 warm-up runs"):
        profile.parse_profile(_trace_file(tmp_path), warmup=2)


def test_import_needs_neither_onnxruntime_nor_torch() -> None:
    code = "import sys, ptq.profile; print(sorted(m for m in ('onnxruntime', 'torch', 'matplotlib') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _images(sample_dir: Path, n: int) -> np.ndarray:
    """`n` real ImageNet images, resized to 224x224 and normalized: NCHW float32."""
    out = []
    for f in sorted(sample_dir.iterdir())[:n]:
        with Image.open(f) as img:
            pixels = np.asarray(img.convert("RGB").resize((224, 224)), dtype=np.float32).transpose(2, 0, 1) / 255.0
        out.append((pixels - MEAN) / STD)
    return np.stack(out).astype(np.float32)


@pytest.fixture(scope="module")
def mob_s(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, OpProfile, OpProfile]:
    """MobileNetV3-Small (random weights) exported and INT8-quantized by ptq, profiled at batch 1 and 2 threads."""
    from ptq import pipeline
    from ptq.quantizers import ort as quantize
    from ptq.phases import Phases

    tmp = tmp_path_factory.mktemp("profile")
    images = _images(sample_dir, 8)
    fp32 = pipeline.export_model("mob-s", "random", tmp / "mob-s.onnx")
    int8 = tmp / "mob-s-int8.onnx"
    quantize.to_int8(fp32, int8, iter([images]), quantize.QuantOptions(), Phases(), tmp / "ranges.json")
    batch = images[:1]
    return (
        int8,
        profile.profile_onnx(fp32, batch, threads=2, queries=4, warmup=2),
        profile.profile_onnx(int8, batch, threads=2, queries=4, warmup=2),
    )


def test_real_profiles_and_table(mob_s: Tuple[Path, OpProfile, OpProfile]) -> None:
    _, fp32, int8 = mob_s
    for prof in (fp32, int8):
        assert prof.queries == 4 and prof.threads == 2 and not prof.notes
        assert prof.total_us == pytest.approx(sum(r["us"] for r in prof.by_node()))
        assert prof.total_us == pytest.approx(sum(r["us"] for r in prof.by_op()))
        assert sum(r["share"] for r in prof.by_op()) == pytest.approx(1.0)
        assert 0 < prof.total_us <= prof.run_us  # kernels run inside session.run
        assert {r["provider"] for r in prof.by_node()} == {"CPUExecutionProvider"}
    fp32_ops = {r["op_type"] for r in fp32.by_op()}
    int8_ops = {r["op_type"] for r in int8.by_op()}
    assert "Conv" in fp32_ops
    assert not {op for op in fp32_ops if op.startswith("QLinear") or op in ("QuantizeLinear", "DequantizeLinear")}
    assert {"QLinearConv", "QuantizeLinear", "DequantizeLinear"} <= int8_ops
    assert "Conv" not in int8_ops  # every conv runs as QLinearConv

    cols = fp32.table(int8)
    assert set(cols) == {"op_type", "fp32_us", "int8_us", "int8_over_fp32", "fp32_nodes", "int8_nodes"}
    assert sorted(cols["op_type"]) == sorted(fp32_ops | int8_ops)
    assert len(set(cols["op_type"])) == len(cols["op_type"])
    fp32_rows = {r["op_type"]: r for r in fp32.by_op()}
    int8_rows = {r["op_type"]: r for r in int8.by_op()}
    for op, f, i, ratio, fn, inn in zip(*(cols[k] for k in ("op_type", "fp32_us", "int8_us", "int8_over_fp32", "fp32_nodes", "int8_nodes"))):
        assert f == (fp32_rows[op]["us"] if op in fp32_rows else 0.0) and fn == (fp32_rows[op]["nodes"] if op in fp32_rows else 0)
        assert i == (int8_rows[op]["us"] if op in int8_rows else 0.0) and inn == (int8_rows[op]["nodes"] if op in int8_rows else 0)
        assert ratio == (pytest.approx(i / f) if f > 0 and i > 0 else None)
    biggest = [max(f, i) for f, i in zip(cols["fp32_us"], cols["int8_us"])]
    assert biggest == sorted(biggest, reverse=True)

    fam = fp32.table(int8, family=True)
    conv = fam["op_type"].index("Conv")
    assert fam["fp32_nodes"][conv] == fam["int8_nodes"][conv] == fp32_rows["Conv"]["nodes"]
    assert "Q/DQ" in fam["op_type"] and fam["fp32_us"][fam["op_type"].index("Q/DQ")] == 0.0


def test_float_islands_and_qdq_time(mob_s: Tuple[Path, OpProfile, OpProfile]) -> None:
    int8_path, _, int8 = mob_s
    islands = profile.float_islands(int8_path, int8)
    assert islands
    nodes = {r["node"]: r for r in int8.by_node()}
    for row in islands:
        op = row["op_type"]
        assert not op.startswith("QLinear") and op not in ("QGemm", "QuantizeLinear", "DequantizeLinear")
        assert nodes[row["node"]]["op_type"] == op and row["us"] == nodes[row["node"]]["us"]
        assert "float" in (nodes[row["node"]]["input_type"], nodes[row["node"]]["output_type"])
    # MobileNetV3's hard-swish and squeeze-excite gates: HardSigmoid has no integer kernel, so it runs in float
    # between a DequantizeLinear and a QuantizeLinear of the QDQ file.
    hard = [r for r in islands if r["op_type"] == "HardSigmoid"]
    assert hard and all(r["in_qdq_graph"] and r["between_qdq"] for r in hard)
    assert [r["us"] for r in islands] == sorted((r["us"] for r in islands), reverse=True)
    # the uint8 Transpose into NHWC moves data and is no float island
    assert "Transpose" not in {r["op_type"] for r in islands}

    qdq = profile.qdq_overhead(int8)
    by_op = {r["op_type"]: r for r in int8.by_op()}
    assert qdq["qdq_us"] == pytest.approx(by_op["QuantizeLinear"]["us"] + by_op["DequantizeLinear"]["us"])
    assert qdq["quantize_us"] == pytest.approx(by_op["QuantizeLinear"]["us"])
    assert (qdq["quantize_nodes"], qdq["dequantize_nodes"]) == (by_op["QuantizeLinear"]["nodes"], by_op["DequantizeLinear"]["nodes"])
    assert qdq["share"] == pytest.approx(qdq["qdq_us"] / int8.total_us)


def test_plot_writes_png(mob_s: Tuple[Path, OpProfile, OpProfile], tmp_path: Path) -> None:
    _, fp32, int8 = mob_s
    out = profile.plot(fp32, int8, tmp_path / "ops.png", top=8)
    assert out == tmp_path / "ops.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    grouped = profile.plot(fp32, int8, tmp_path / "families.png", family=True)
    assert grouped.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_with_profile_logs_where_the_time_goes_and_the_report_shows_it(mob_s: Tuple[Path, OpProfile, OpProfile], small_dir: Path, tmp_path: Path) -> None:
    """profile=true: per op family FP32 against INT8 (profile.json), per node, Q/DQ and float islands, in the run
    and in the report; a backend without a profiler is refused before any run."""
    import mlflow

    from ptq import pipeline, report
    from ptq.config import RunConfig

    fp32 = mob_s[0].parent / "mob-s.onnx"  # the fixture exported it beside the INT8 file it returns
    cfg = RunConfig(model=str(fp32), weights="random", data=small_dir, calib_size=8, eval_size=8, min_queries=20, min_duration_s=0, blocks=2, warmup=2,
                    monitor=False, progress=False, profile=True)
    run_id = pipeline.run(cfg)
    run = mlflow.get_run(run_id)
    names = {a.path for a in mlflow.artifacts.list_artifacts(run_id=run_id)}
    assert {"profile.json", "profile_nodes.json", "profile_int8.json", "profile.png"} <= names
    ops = json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/profile.json"))
    table = dict(zip(ops["columns"], zip(*ops["data"])))
    assert "Q/DQ" in table["op_type"] and sum(table["int8_us"]) == pytest.approx(run.data.metrics["profile/kernel_us"], rel=1e-6)
    assert sum(table["fp32_us"]) == pytest.approx(run.data.metrics["profile/fp32_kernel_us"], rel=1e-6)
    detail = json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/profile_int8.json"))
    assert detail["qdq"]["qdq_us"] == pytest.approx(run.data.metrics["profile/qdq_us"]) and {r["op_type"] for r in detail["float_islands"]} >= {"HardSigmoid"}
    built = report.build(["ptq"], tmp_path / "report", log_run=False)
    section = (built.folder / "report.md").read_text().split("## Per-op profiles")[1]
    assert f"{fp32} int8 ort: fp32 {sum(table['fp32_us']):.0f} µs → {sum(table['int8_us']):.0f} µs per query in kernels" in section
    with pytest.raises(PtqError, match="backend torch has no per-op profiler in ptq yet: use profile=false, or backend=ort"):
        pipeline.run(RunConfig(model="mob-s", backend="torch", precision="fp32", data=small_dir, profile=True))
    assert len(mlflow.search_runs(search_all_experiments=True)) == 1
