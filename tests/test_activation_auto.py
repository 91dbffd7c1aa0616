"""activation_type=auto: both activation types quantized from one calibration, timed side by side, the faster kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from test_sensitivity import small_cnn

from ptq.backends import CompressJob
from ptq.backends.ort import OrtBackend
from ptq.phases import Phases

pytestmark = pytest.mark.device  # torch-free


def test_auto_keeps_the_faster_activation_type_and_logs_both(tmp_path: Path) -> None:
    model = small_cnn(tmp_path / "small.onnx")
    rng = np.random.default_rng(3)
    batches = [rng.standard_normal((8, 3, 16, 16)).astype(np.float32) for _ in range(2)]
    phases = Phases()
    done = OrtBackend().compress(CompressJob(model, None, "int8", lambda b: iter(batches), OrtBackend.options({"activation_type": "auto"}), phases, tmp_path, (1, 8), 1))
    uint8, int8 = done.metrics["compress/auto_uint8_p50_ms"], done.metrics["compress/auto_int8_p50_ms"]
    chosen = "uint8" if uint8 <= int8 else "int8"
    assert done.tags["numerics.activation_auto"].startswith(f"{chosen}: p50 uint8 {uint8:.3f} ms, int8 {int8:.3f} ms (6 alternating blocks of 10 queries at batch 1)")
    assert f"{chosen} asymmetric activations" in done.numerics and {"preprocess", "calibrate", "quantize", "select"} <= set(phases.seconds)
    zero_points = [i for i in onnx.load(str(done.path)).graph.initializer if i.name.endswith("_zero_point") and i.dims == []]
    types = {onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.INT8: "int8"}
    assert types[zero_points[0].data_type] == chosen  # the kept model is the chosen one (its activations' zero points)
