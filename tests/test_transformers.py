"""Transformer classifiers: torchvision's attention exports to ONNX (its fused eval-mode fast path has no ONNX op),
quantizes statically (MatMul in int8, LayerNorm and Softmax left float, which the profile shows as float islands)
and dynamically (ONNX Runtime's quantize_dynamic), on a small real torchvision VisionTransformer."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import onnx
import pytest

from ptq import export
from ptq.backends import CompressJob, get_backend
from ptq.errors import PtqError
from ptq.phases import Phases
from ptq.quantizers import ort as quantize


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """torchvision's VisionTransformer, two layers of width 64 (vit_b_16's code, a fraction of its size), exported."""
    import torch
    import torchvision

    torch.manual_seed(0)
    module = torchvision.models.VisionTransformer(image_size=224, patch_size=32, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128).eval()
    torch.nn.init.normal_(module.heads.head.weight, std=0.5)  # torchvision zero-initializes the head: all logits would be 0
    path = export.to_onnx(module, 224, tmp_path_factory.mktemp("vit") / "tiny_vit.onnx")
    return path, module


def test_attention_exports_and_computes_what_torch_does(tiny_vit: tuple[Path, object]) -> None:
    import onnxruntime as ort
    import torch

    path, module = tiny_vit
    ops = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert ops["MatMul"] >= 8 and ops["Softmax"] == 2  # attention as MatMul and Softmax, two layers
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224), dtype=np.float32)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()  # type: ignore[operator]
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert torch.backends.mha.get_fastpath_enabled()  # the exporter put torch's fast path back


def _job(path: Path, tmp_path: Path, options: dict[str, str], images: np.ndarray) -> CompressJob:
    backend = get_backend("ort")
    return CompressJob(path, None, "int8", lambda size: iter([images]), backend.options(options), Phases(), tmp_path)


def test_static_int8_quantizes_the_matmuls(tiny_vit: tuple[Path, object], tmp_path: Path) -> None:
    images = np.random.default_rng(1).standard_normal((8, 3, 224, 224), dtype=np.float32)
    made = get_backend("ort").compress(_job(tiny_vit[0], tmp_path, {}, images))
    graph = onnx.load(str(made.path)).graph
    producer = {o: n for n in graph.node for o in n.output}
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    fed = [m for m in matmuls if all(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in m.input)]
    assert len(fed) == len(matmuls)  # every MatMul reads dequantized int8 on both inputs: it runs as an int8 MatMul
    assert made.numerics.startswith("int8 QDQ:")


def test_dynamic_int8_quantizes_weights_now_and_activations_at_run_time(tiny_vit: tuple[Path, object], tmp_path: Path) -> None:
    import onnxruntime as ort

    images = np.random.default_rng(2).standard_normal((2, 3, 224, 224), dtype=np.float32)
    phases = Phases()
    job = _job(tiny_vit[0], tmp_path, {"quant_mode": "dynamic"}, images)
    job.phases = phases
    made = get_backend("ort").compress(job)
    ops = collections.Counter(n.op_type for n in onnx.load(str(made.path)).graph.node)
    assert ops["DynamicQuantizeLinear"] > 0 and ops["MatMulInteger"] > 0 and ops["QuantizeLinear"] == 0
    assert set(phases.seconds) == {"quantize"}  # nothing calibrated
    assert made.numerics.startswith("int8 dynamic (quantize_dynamic")
    fp32 = ort.InferenceSession(str(tiny_vit[0]), providers=["CPUExecutionProvider"]).run(None, {"input": images})[0]
    int8 = ort.InferenceSession(str(made.path), providers=["CPUExecutionProvider"]).run(None, {"input": images})[0]
    cosine = (fp32 * int8).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(int8, axis=1)
    assert cosine.min() > 0.99


def test_dynamic_int8_refuses_int8_activations() -> None:
    with pytest.raises(PtqError, match="^quant_mode=dynamic quantizes activations to uint8 at run time"):
        quantize.QuantOptions(quant_mode="dynamic", activation_type="int8").validate()


@pytest.mark.slow  # vit_b_16: 86 M parameters, exported and quantized on two cores
def test_vit_b_16_runs_end_to_end_as_a_new_user_runs_it(small_dir: Path) -> None:
    args = ["--model", "vit_b_16", "--weights", "random", "--precision", "int8", "--quant-mode", "dynamic", "--data", str(small_dir),
            "--calib-size", "8", "--min-queries", "10", "--min-duration-s", "0", "--blocks", "2", "--warmup", "2", "--progress", "false"]
    done = subprocess.run([sys.executable, "-m", "ptq.cli", "run", *args], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert done.returncode == 0, done.stderr[-2000:]
    run = mlflow.get_run(done.stdout.strip())
    assert run.info.status == "FINISHED" and run.data.params["quant_mode"] == "dynamic"
    assert run.data.metrics["size/ratio"] > 3
