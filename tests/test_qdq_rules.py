"""TensorRT's Q/DQ rules, checked GPU-free: each rule on a small graph that breaks it, ONNX Runtime's default QDQ
(which TensorRT cannot parse) refused, and the QDQ that ptq writes for TensorRT passing every rule."""

from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ptq.quantizers import ort as quantize
from ptq.errors import PtqError
from ptq.phases import Phases
from ptq.quantizers import for_tensorrt, qdq_rules

pytestmark = pytest.mark.device  # no torch: it runs on the Jetson lanes too


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array, name)


def small_cnn(path: Path) -> Path:
    """Conv -> Clip (ReLU6) -> Conv + residual Add -> GlobalAveragePool -> Flatten -> Gemm (logits): lite0's op mix."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c1", "lo", "hi"], ["r1"], name="relu6"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["a"], name="residual"),
        helper.make_node("GlobalAveragePool", ["a"], ["g"], name="pool"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], name="fc", transB=1),
    ]
    inits = [
        _init("w1", rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32)), _init("b1", rng.normal(0, 0.1, 8).astype(np.float32)),
        _init("w2", rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32)), _init("b2", rng.normal(0, 0.1, 8).astype(np.float32)),
        _init("wf", rng.normal(0, 0.3, (10, 8)).astype(np.float32)), _init("bf", rng.normal(0, 0.1, 10).astype(np.float32)),
        _init("lo", np.array(0.0, np.float32)), _init("hi", np.array(6.0, np.float32)),
    ]
    graph = helper.make_graph(
        nodes, "small", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def batches(n: int = 4) -> List[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.normal(0, 1, (4, 3, 16, 16)).astype(np.float32) for _ in range(n)]


def test_onnx_runtimes_default_qdq_breaks_tensorrts_rules(tmp_path: Path) -> None:
    """What backend=tensorrt's explicit INT8 used to build from: symmetric int8, but INT32 biases behind DQ (ORT's
    QuantizeBias default), which TensorRT's parser refuses."""
    src = small_cnn(tmp_path / "small.onnx")
    old = quantize.QuantOptions(activation_type="int8", weight_type="int8", symmetric_activations=True)
    quantize.to_int8(src, tmp_path / "old.onnx", iter(batches()), old, Phases(), tmp_path / "r.json")
    found = qdq_rules.violations(onnx.load(str(tmp_path / "old.onnx")))
    assert sorted(f.split(":")[0] for f in found if "INT32" in f) == ["DequantizeLinear b1_DequantizeLinear", "DequantizeLinear b2_DequantizeLinear", "DequantizeLinear bf_DequantizeLinear"]
    with pytest.raises(PtqError, match=r"old.onnx breaks TensorRT's Q/DQ rules: .*INT32.*ptq quantize --backend tensorrt"):
        qdq_rules.require(tmp_path / "old.onnx")
    asym = quantize.QuantOptions()  # ORT's CPU default: uint8 asymmetric activations
    quantize.to_int8(src, tmp_path / "asym.onnx", iter(batches()), asym, Phases(), tmp_path / "r2.json")
    text = " | ".join(qdq_rules.violations(onnx.load(str(tmp_path / "asym.onnx"))))
    assert "dequantizes UINT8 data" in text and "is not 0" in text


def test_qdq_for_tensorrt_passes_every_rule_and_keeps_the_logits_float(tmp_path: Path) -> None:
    src = small_cnn(tmp_path / "small.onnx")
    dst = tmp_path / "trt.onnx"
    described = for_tensorrt.quantize(src, dst, iter(batches()), "minmax", (), Phases(), tmp_path / "r.json")
    model = onnx.load(str(dst))
    assert qdq_rules.violations(model, tensorrt_major=8) == []  # TensorRT 8.5's stricter weight rule included
    inits = {t.name: t for t in model.graph.initializer}
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert all(n.input[0] not in inits for n in dqs)  # float weights behind Q -> DQ, no int8 initializers
    assert {n.input[2] for n in model.graph.node if n.op_type == "Conv"} == {"b1", "b2"}  # biases stay float
    producer = {o: n for n in model.graph.node for o in n.output}
    assert producer["logits"].op_type == "Gemm"  # no Q/DQ on the network's output
    weight_scales = {n.input[0]: numpy_helper.to_array(inits[n.input[1]]).shape for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in inits}
    assert weight_scales == {"w1": (8,), "w2": (8,), "wf": (10,)}  # per output channel
    assert "int8 symmetric activations" in described and "laid out for TensorRT" in described
    import onnxruntime as ort

    x = batches(1)[0]
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    got = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()  # a real INT8 model of the same network


def _qdq_graph(zero_point: np.ndarray, scale: np.ndarray, axis: int = 1, on_output: bool = False) -> onnx.ModelProto:
    """input -> Q -> DQ -> Relu (-> Q -> DQ as the output): one activation Q/DQ pair with the given parameters."""
    nodes = [
        helper.make_node("QuantizeLinear", ["input", "s", "zp"], ["q"], name="q", axis=axis),
        helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["dq"], name="dq", axis=axis),
        helper.make_node("Relu", ["dq"], ["out" if not on_output else "r"], name="relu"),
    ]
    if on_output:
        nodes += [helper.make_node("QuantizeLinear", ["r", "s", "zp"], ["q2"], name="q2"), helper.make_node("DequantizeLinear", ["q2", "s", "zp"], ["out"], name="dq2")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 2, 4, 4])], [_init("s", scale), _init("zp", zero_point)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (_qdq_graph(np.array(3, np.int8), np.array(0.1, np.float32)), ["QuantizeLinear q: zero point [3] is not 0 (TensorRT quantizes symmetrically)", "DequantizeLinear dq: zero point [3] is not 0 (TensorRT quantizes symmetrically)"]),
        (_qdq_graph(np.array(0, np.uint8), np.array(0.1, np.float32)), ["DequantizeLinear dq: dequantizes UINT8 data (TensorRT's dequantize takes int8 only)"]),
        (_qdq_graph(np.zeros(2, np.int8), np.array([0.1, 0.2], np.float32)), ["QuantizeLinear q: 2 scales on an activation (TensorRT takes one scale per activation tensor)", "DequantizeLinear dq: 2 scales on an activation (TensorRT takes one scale per activation tensor)"]),
        (_qdq_graph(np.array(0, np.int8), np.array(0.1, np.float32), on_output=True), ["graph output out: quantized (TensorRT's Q/DQ placement leaves the network's outputs in float)"]),
        (_qdq_graph(np.array(0, np.int8), np.array(0.1, np.float32)), []),
    ],
    ids=["zero-point", "uint8", "per-channel-activation", "quantized-output", "valid"],
)
def test_each_rule(model: onnx.ModelProto, expected: List[str]) -> None:
    assert qdq_rules.violations(model) == expected


def test_weight_rules_axis_and_tensorrt8_initializers() -> None:
    """A Conv weight stored as int8 behind DQ: fine for TensorRT 10, not for 8.x; its scales must lie on axis 0."""
    w = np.ones((4, 2, 1, 1), np.int8)

    def model(axis: int) -> onnx.ModelProto:
        nodes = [
            helper.make_node("DequantizeLinear", ["w", "s", "zp"], ["wd"], name="wdq", axis=axis),
            helper.make_node("Conv", ["input", "wd"], ["out"], name="conv"),
        ]
        graph = helper.make_graph(
            nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 2, 4, 4])],
            [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 4, 4])],
            [_init("w", w), _init("s", np.full(4 if axis == 0 else 2, 0.1, np.float32)), _init("zp", np.zeros(4 if axis == 0 else 2, np.int8))],
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)

    assert qdq_rules.violations(model(0), tensorrt_major=10) == []
    assert qdq_rules.violations(model(0), tensorrt_major=8) == ["DequantizeLinear wdq: int8 weight initializer feeding DQ (TensorRT 8 wants float weights behind Q -> DQ)"]
    assert qdq_rules.violations(model(1)) == ["DequantizeLinear wdq: per-channel scales on axis 1, not on the output channels of the weight's consumer"]
