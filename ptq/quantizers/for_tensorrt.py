"""Explicit INT8 for TensorRT: ONNX Runtime's static quantizer set up as NVIDIA ModelOpt sets it up for TensorRT.

The QDQ ONNX it writes passes `qdq_rules` (checked on every file), so TensorRT 8.5 to 11 can build it; it needs no
TensorRT or GPU, so a host can make it for a device (`ptq quantize --backend tensorrt`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ptq.quantizers import ort as ort_quantizer
from ptq.phases import Phases
from ptq.quantizers import qdq_rules


def options(calib_method: str, keep_float: tuple[str, ...] = (), per_channel: bool = True) -> ort_quantizer.QuantOptions:
    """The quantizer settings TensorRT takes: symmetric int8 activations and weights, per-channel weight scales,
    ModelOpt's layout of Q/DQ (`TENSORRT_EXTRA` in ptq/quantizers/ort.py); nodes in `keep_float` get no Q/DQ (TensorRT runs them in fp16)."""
    return ort_quantizer.QuantOptions(
        calib_method=calib_method,
        per_channel=per_channel,
        activation_type="int8",
        weight_type="int8",
        symmetric_activations=True,
        tensorrt_layout=True,
        keep_float=keep_float,
    )


def quantize(src: Path, dst: Path, batches: Iterator[np.ndarray], calib_method: str, keep_float: tuple[str, ...], phases: Phases, ranges: Path) -> str:
    """Write the TensorRT-ready QDQ model of `src` to `dst` (calibration ranges to `ranges`), check it against
    TensorRT's Q/DQ rules, and return what was quantized and how."""
    opts = options(calib_method, keep_float)
    graph = ort_quantizer.to_int8(src, dst, batches, opts, phases, ranges)
    qdq_rules.require(dst)
    return f"{describe(opts)}; {graph}"


def describe(opts: ort_quantizer.QuantOptions) -> str:
    """The scheme in words, for the numerics tag."""
    return ort_quantizer.describe(opts) + ", Q/DQ laid out for TensorRT (NVIDIA ModelOpt's ONNX Runtime settings)"
