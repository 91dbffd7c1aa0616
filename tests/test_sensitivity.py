"""Sensitivity and mixed precision: real ONNX Runtime quantization of a small real ONNX CNN (fast, exact), the
ranking's arithmetic, keep_float=k, and the bad inputs of the commands."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ptq import sensitivity
from ptq.quantizers import ort as quantize
from ptq.backends.ort import open_session
from ptq.errors import PtqError

pytestmark = pytest.mark.device  # torch-free


def small_cnn(path: Path, with_weights: bool = True) -> Path:
    """A 3x16x16 -> 10 CNN: a 3x3 conv, a depthwise conv, a 1x1 conv and a Gemm, seeded weights (or, without
    weights, only pooling: nothing to quantize)."""
    rng = np.random.default_rng(0)

    def init(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    if with_weights:
        nodes = [
            helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="stem", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["a"], ["ar"], name="relu1"),
            helper.make_node("Conv", ["ar", "w2"], ["b"], name="dw", group=8, pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["b"], ["br"], name="relu2"),
            helper.make_node("Conv", ["br", "w3"], ["c"], name="pw"),
            helper.make_node("GlobalAveragePool", ["c"], ["p"], name="pool"),
            helper.make_node("Flatten", ["p"], ["f"], name="flat"),
            helper.make_node("Gemm", ["f", "w4", "b4"], ["y"], name="fc", transB=1),
        ]
        inits = [init("w1", 8, 3, 3, 3), init("b1", 8), init("w2", 8, 1, 3, 3), init("w3", 16, 8, 1, 1), init("w4", 10, 16), init("b4", 10)]
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])
    else:
        nodes = [helper.make_node("GlobalAveragePool", ["x"], ["p"], name="pool"), helper.make_node("Flatten", ["p"], ["y"], name="flat")]
        inits, out = [], helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])], [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what opset 17 needs; onnx 1.2x writes newer IR versions than ONNX Runtime 1.19-1.23 read
    onnx.save(model, str(path))
    return path


def run(model: Path, x: np.ndarray) -> np.ndarray:
    return open_session(str(model), 1).run(x)


def test_nodes_are_ranked_by_the_kl_their_float_saves(tmp_path: Path) -> None:
    model = small_cnn(tmp_path / "small.onnx")
    assert sensitivity.node_kinds(model) == {"stem": "Conv kxk", "dw": "Conv depthwise", "pw": "Conv 1x1", "fc": "Gemm"}
    rng = np.random.default_rng(1)
    calib = [rng.standard_normal((8, 3, 16, 16)).astype(np.float32) for _ in range(2)]
    heldout = rng.standard_normal((16, 3, 16, 16)).astype(np.float32)
    seen = []
    ranking = sensitivity.rank(model, iter(calib), heldout, quantize.QuantOptions(per_channel=False), run, progress=lambda d, t: seen.append((d, t)))
    assert sorted(d.node for d in ranking.nodes) == ["dw", "fc", "pw", "stem"]
    assert [d.node for d in ranking.kinds] == ["all Conv 1x1", "all Conv depthwise", "all Conv kxk", "all Gemm"]
    assert ranking.quantizations == 1 + 4 + 4 and seen[-1] == (9, 9) and ranking.images == 16
    recovered = [d.recovered for d in ranking.nodes]
    assert recovered == sorted(recovered, reverse=True)  # worst first
    for d in ranking.nodes + ranking.kinds:  # what keeping it in float saves, in the ranking's own terms
        assert d.recovered == pytest.approx(ranking.whole.kl - d.kl)
    assert ranking.whole.kl > 0 and ranking.top(2) == [d.node for d in ranking.nodes[:2]]
    table = ranking.table()
    assert table["kept_in_float"] == [*(d.node for d in ranking.nodes), *(d.node for d in ranking.kinds), "none"]
    assert table["kl_recovered"] == [float(f"{d.recovered:.4g}") for d in [*ranking.nodes, *ranking.kinds, ranking.whole]]
    by_cosine = sensitivity.rank(model, iter(calib), heldout, quantize.QuantOptions(per_channel=False), run, metric="cosine")
    assert [d.recovered for d in by_cosine.nodes] == sorted((ranking.whole.cosine - d.cosine for d in ranking.nodes), reverse=True)
    assert table["rank"][:4] == [1, 2, 3, 4] and table["top1_drop_pt"] == [None] * 9  # no labels, no drop


def test_divergence_measures() -> None:
    ref = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    same = sensitivity.divergence(ref, ref)
    assert same == (pytest.approx(0.0), pytest.approx(0.0), 1.0)
    kl, cos, agree = sensitivity.divergence(ref, np.array([[0.0, 2.0, 0.0], [0.0, 1.0, 0.0]]))
    p = np.exp([2.0, 0, 0]) / np.exp([2.0, 0, 0]).sum()
    assert kl == pytest.approx(np.sum(p * (np.log(p) - np.log(p[[1, 0, 2]]))) / 2) and cos == pytest.approx(0.5) and agree == 0.5


def test_keep_float_k_keeps_the_k_nodes_the_ranking_puts_first(tmp_path: Path) -> None:
    from ptq.backends import CompressJob
    from ptq.backends.ort import OrtBackend
    from ptq.phases import Phases

    model = small_cnn(tmp_path / "small.onnx")
    rng = np.random.default_rng(2)
    batches = [rng.standard_normal((8, 3, 16, 16)).astype(np.float32) for _ in range(2)]
    opts = OrtBackend.options({"keep_float": "2", "per_channel": "false"})
    assert opts.keep_float == ("2",) and opts.keep_count() == 2
    phases = Phases()
    job = CompressJob(model, None, "int8", lambda b: iter(batches), opts, phases, tmp_path)
    done = OrtBackend().compress(job)
    kept = done.tags["numerics.keep_float"].split(",")
    ranking = sensitivity.rank(model, iter(batches), np.concatenate(batches), quantize.QuantOptions(per_channel=False), lambda m, x: open_session(str(m), 0).run(x))
    assert kept == ranking.top(2) and "the 2 of 4 nodes whose float saves the most KL on 16 calibration images (ranked in" in done.tags["numerics.keep_float_by"]
    again = OrtBackend().compress(CompressJob(model, None, "int8", lambda b: iter(batches), opts, Phases(), tmp_path))  # same model, options, images
    assert again.tags["numerics.keep_float"] == done.tags["numerics.keep_float"] and "(cached ranking " in again.tags["numerics.keep_float_by"]
    assert done.numerics.endswith("; 2 nodes kept in float") and "sensitivity" in phases.seconds
    graph = onnx.load(str(done.path)).graph
    float_weights = {i.name for i in graph.initializer if i.data_type == TensorProto.FLOAT}
    assert {n.name for n in graph.node if n.op_type in ("Conv", "Gemm") and n.input[1] in float_weights} == set(kept)  # the rest read int8 weights


def test_bad_inputs_fail_before_work(tmp_path: Path, small_dir: Path) -> None:
    empty = small_cnn(tmp_path / "pool.onnx", with_weights=False)
    with pytest.raises(PtqError, match="pool.onnx has no Conv, Gemm or MatMul node: nothing to quantize"):
        sensitivity.rank(empty, iter([]), np.zeros((1, 3, 16, 16), np.float32), quantize.QuantOptions(), run)
    from ptq import tune
    from ptq.config import RunConfig

    for command in (lambda cfg: sensitivity.analyze(cfg), lambda cfg: tune.search(cfg, 0.3, tune.space(["minmax"], [True], ["uint8"], [0]))):
        with pytest.raises(PtqError, match="pool.onnx has no Conv, Gemm or MatMul node"):
            command(RunConfig(model=str(empty), data=small_dir))
    assert mlflow.search_runs(search_all_experiments=True).empty  # refused before any run
    model = small_cnn(tmp_path / "small.onnx")
    with pytest.raises(PtqError, match="keep_float=9: small.onnx has 4 Conv/Gemm/MatMul nodes: keep between 1 and 4"):
        quantize.check_keep_float(model, ("9",))
    with pytest.raises(PtqError, match="keep_float names nodes small.onnx does not have: nope: use ONNX node names such as stem, dw, pw"):
        quantize.check_keep_float(model, ("stem", "nope"))
