"""ONNX-level compression with the field's tools: FP16 by graph conversion, INT8 by ONNX Runtime static PTQ."""

from __future__ import annotations

import importlib
import inspect
import itertools
import json
import logging
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Tuple
from unittest import mock

import numpy as np
import onnx

from ptq.options import option
from ptq.errors import PtqError
from ptq.export import input_name
from ptq.phases import Phases

log = logging.getLogger(__name__)

# Names ptq takes -> ONNX Runtime's enum members; ONNX Runtime itself is imported only where a model is quantized,
# so a device that runs TensorRT alone needs none of it.
CALIB_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
QUANT_TYPES = {"uint8": "QUInt8", "int8": "QInt8"}
QUANT_FORMATS = {"qdq": "QDQ", "qoperator": "QOperator"}
QUANT_MODES = ("static", "dynamic")


def ort_enums(options: QuantOptions) -> dict[str, Any]:
    """`quantize_static`'s keyword arguments for these options, as ONNX Runtime's enums."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

    return {
        "quant_format": getattr(QuantFormat, QUANT_FORMATS[options.quant_format]),
        "per_channel": options.per_channel,
        "activation_type": getattr(QuantType, QUANT_TYPES[options.activation_type]),
        "weight_type": getattr(QuantType, QUANT_TYPES[options.weight_type]),
        "calibrate_method": getattr(CalibrationMethod, CALIB_METHODS[options.calib_method]),
    }


@dataclass(frozen=True)
class QuantOptions:
    """ONNX Runtime's INT8 technique knobs, the ones the study compares: the ort backend's options. Defaults are the
    best measured on lite0/r50 here (BENCHMARKS.md)."""

    calib_method: str = option("minmax", "minmax, entropy or percentile", quantizes=True)
    per_channel: bool = option(True, "Per-channel weight scales: true/false", quantizes=True)
    # int8 made r50 slower than FP32 on an AVX-512 VNNI CPU; auto: quantize with both, time both briefly, keep the faster
    activation_type: str = option("uint8", "uint8, int8 or auto (both timed here, the faster kept)", quantizes=True)
    weight_type: str = option("int8", "int8 or uint8 weights", quantizes=True)
    quant_format: str = option("qdq", "qdq or qoperator", quantizes=True)
    percentile: float = option(99.999, "Percentile kept by calib_method=percentile", quantizes=True)
    # Histogram bins for entropy/percentile. ONNX Runtime's entropy default (128 bins, 128 quantized bins)
    # leaves a single candidate threshold, the full range, which makes it identical to minmax; 2048 is TensorRT's.
    calib_bins: int = option(2048, "Histogram bins of entropy/percentile calibration", quantizes=True)
    keep_float: Tuple[str, ...] = option((), "ONNX node names kept in float, comma-separated, or a count k: the k that sensitivity ranks first (mixed precision)", quantizes=True)
    # dynamic: int8 weights, activations' ranges found per batch at run time (quantize_dynamic): no calibration, the
    # usual CPU choice for transformers; static: ranges calibrated beforehand (quantize_static)
    quant_mode: str = option("static", "INT8 by ONNX Runtime: static (calibrated) or dynamic (activations quantized at run time)", quantizes=True)
    symmetric_activations: bool = option(False, "", user=False, quantizes=True)  # TensorRT's explicit quantization needs symmetric int8 activations
    tensorrt_layout: bool = option(False, "", user=False, quantizes=True)  # Q/DQ laid out for TensorRT (TENSORRT_EXTRA), see ptq.quantizers.for_tensorrt
    calib_batch: int = option(8, "", user=False, quantizes=True)

    def keep_count(self) -> int | None:
        """k where `keep_float` asks for the k nodes sensitivity ranks first (a single number), else None."""
        return int(self.keep_float[0]) if len(self.keep_float) == 1 and self.keep_float[0].isdigit() else None

    def validate(self) -> None:
        """Refuse unknown values before any work is done."""
        for name, value, allowed in (
            ("calib_method", self.calib_method, CALIB_METHODS),
            ("activation_type", self.activation_type, [*QUANT_TYPES, "auto"]),
            ("weight_type", self.weight_type, QUANT_TYPES),
            ("quant_format", self.quant_format, QUANT_FORMATS),
            ("quant_mode", self.quant_mode, QUANT_MODES),
        ):
            if value not in allowed:
                raise PtqError(f"unknown {name} {value!r}: use one of {', '.join(allowed)}")
        if not 0 < self.percentile <= 100:
            raise PtqError(f"percentile={self.percentile} must be in (0, 100]")
        if self.quant_mode == "dynamic" and self.activation_type != "uint8":
            raise PtqError(f"quant_mode=dynamic quantizes activations to uint8 at run time (DynamicQuantizeLinear): drop activation_type={self.activation_type}")
        if self.calib_bins < 256:
            raise PtqError(f"calib_bins={self.calib_bins} must be at least 256 (entropy needs more bins than its 128 quantized bins)")


def even_batch(images: int, preferred: int) -> int:
    """The largest batch size up to `preferred` that divides `images`: ONNX Runtime's histogram calibrators
    (entropy, percentile) fail on a short last batch, so every calibration batch has the same size."""
    return max(d for d in range(1, max(1, min(preferred, images)) + 1) if images % d == 0) if images else 1


def batch_reader(input_name: str, batches: Iterator[np.ndarray]) -> Any:
    """An ONNX Runtime CalibrationDataReader that feeds calibration images in batches."""
    from onnxruntime.quantization import CalibrationDataReader

    class BatchReader(CalibrationDataReader):  # type: ignore[misc]
        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(batches, None)
            return None if batch is None else {input_name: batch}

    return BatchReader()


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """ONNX Runtime's quantizer logs one root-logger line per tensor it adjusts (hundreds on DenseNet);
    keep errors, drop that chatter."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def to_fp16(src: Path, dst: Path) -> Path:
    """Convert weights and arithmetic to float16, keeping float32 inputs/outputs so callers need not change."""
    from onnxconverter_common import float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one UserWarning per weight clipped to fp16's range
        model = float16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))
    return dst


CALIB_CHUNK_IMAGES = 32


WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")  # the nodes with weights: what INT8 compresses and keep_float keeps


def check_keep_float(model: Path, names: tuple[str, ...]) -> None:
    """Refuse node names (`keep_float`) that the ONNX model does not have, before any work, naming a few it has
    (a count k is checked against the number of weighted nodes)."""
    nodes = onnx.load(str(model), load_external_data=False).graph.node
    weighted = [n.name for n in nodes if n.op_type in WEIGHTED_OPS]
    if len(names) == 1 and names[0].isdigit():
        if not 0 < int(names[0]) <= len(weighted):
            raise PtqError(f"keep_float={names[0]}: {model.name} has {len(weighted)} Conv/Gemm/MatMul nodes: keep between 1 and {len(weighted)}")
        return
    unknown = [n for n in names if n not in {n.name for n in nodes}]
    if unknown:
        raise PtqError(f"keep_float names nodes {model.name} does not have: {', '.join(unknown[:5])}: use ONNX node names such as {', '.join(weighted[:3])}")


def to_int8(
    src: Path,
    dst: Path,
    batches: Iterator[np.ndarray],
    options: QuantOptions,
    phases: Phases,
    calib_cache: Path,
) -> str:
    """Static PTQ: ORT pre-processing, calibration (ranges saved to `calib_cache`), then QDQ quantization.
    Returns what was quantized: the pre-processed graph, or the raw one where pre-processing failed."""
    options.validate()
    check_keep_float(src, options.keep_float)
    with tempfile.TemporaryDirectory(prefix="ptq-quant-") as tmp:
        with phases("preprocess"):
            pre, graph = preprocess(src, Path(tmp) / "preprocessed.onnx")
        with phases("calibrate"):
            ranges = calibrate(pre, batches, options, Path(tmp))
            save_ranges(ranges, calib_cache)
        with phases("quantize"):
            quantize_from_ranges(pre, dst, ranges, calib_cache, options)
    return graph


def preprocess(src: Path, dst: Path) -> tuple[Path, str]:
    """ONNX Runtime's quantization pre-processing into `dst`; where it fails (symbolic shape inference does on some
    graphs) the raw graph is quantized instead. Returns the graph to quantize and what it is."""
    from onnxruntime.quantization import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst))
    except Exception as exc:
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:150]  # some of its errors carry no message
        log.warning("ONNX Runtime pre-processing failed (%s); quantizing the un-preprocessed model", why)
        return src, f"raw graph: quant_pre_process failed ({why})"
    return dst, "pre-processed (quant_pre_process)"


def calibrate(model: Path, batches: Iterator[np.ndarray], options: QuantOptions, workdir: Path) -> Any:
    """Activation ranges (ONNX Runtime's TensorsData) from the calibration images.

    ONNX Runtime's calibrators keep every intermediate tensor of the images of one `collect_data` call
    (about 60 MB per image for lite0: 300 entropy images took 19 GB), so images go in chunks of
    CALIB_CHUNK_IMAGES; ranges and histograms merge across calls."""
    from onnxruntime.quantization import CalibrationMethod, create_calibrator

    calib_extra: dict[str, object] = {"symmetric": options.symmetric_activations}
    if options.calib_method != "minmax":
        calib_extra["num_bins"] = options.calib_bins
    if options.calib_method == "percentile":
        calib_extra["percentile"] = options.percentile
    method = getattr(CalibrationMethod, CALIB_METHODS[options.calib_method])
    calibrator = create_calibrator(model, None, augmented_model_path=str(workdir / "augmented.onnx"), calibrate_method=method, extra_options=calib_extra)
    name = input_name(model)
    while True:
        chunk = list(itertools.islice(batches, max(1, CALIB_CHUNK_IMAGES // options.calib_batch)))
        if not chunk:
            break
        calibrator.collect_data(batch_reader(name, iter(chunk)))
    return calibrator.compute_data()


def save_ranges(ranges: Any, path: Path) -> None:
    """Write calibration ranges as ONNX Runtime's JSON calibration cache where it has one (1.27+), else as
    {tensor: [low, high]}, which says the same for the record."""
    try:
        from onnxruntime.quantization import save_tensors_data
    except ImportError:
        path.write_text(json.dumps({k: [float(np.asarray(v.range_value[0]).ravel()[0]), float(np.asarray(v.range_value[1]).ravel()[0])] for k, v in ranges.data.items()}))
        return
    save_tensors_data(ranges, path)


# NVIDIA ModelOpt's ONNX Runtime settings for TensorRT (modelopt/onnx/quantization/ort_utils.py, configure_ort's
# trt_guided_options): no INT32 bias behind a DequantizeLinear (TensorRT dequantizes int8 only), float weights behind
# Q -> DQ (TensorRT 8.x), per-channel weight scales on Conv's output axis, no quantized outputs of any op (so not the
# logits), and Q/DQ before ops whose input is not quantized yet. ModelOpt also asks for symmetric activations.
TENSORRT_EXTRA: dict[str, Any] = {
    "QuantizeBias": False,
    "AddQDQPairToWeight": True,
    "QDQOpTypePerChannelSupportToAxis": {"Conv": 0, "ConvTranspose": 1},
    "DedicatedQDQPair": False,
    "ForceQuantizeNoInputCheck": True,
}
# Which inputs get Q/DQ: those of the weighted ops, residual adds and pools, as TensorRT's developer guide places them
# ("Q/DQ Layer-Placement Recommendations"); activations (Relu, Clip, Sigmoid...) and data movement stay float, where
# TensorRT fuses them into the quantized op before them. The outputs of every op stay float.
TENSORRT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "AveragePool", "MaxPool", "GlobalAveragePool")


def quantize_from_ranges(src: Path, dst: Path, ranges: Any, calib_cache: Path, options: QuantOptions, only: list[str] | None = None) -> None:
    """`quantize_static` from ranges computed beforehand (all nodes but `keep_float`, or `only` these), so calibration
    and quantization are timed apart. ONNX Runtime 1.27+ loads them from its calibration cache; older releases (the
    only ones for Python 3.8 and 3.10, so JetPack) always calibrate inside, so there the calibrator it creates hands
    back these ranges and reads no image."""
    from onnxruntime.quantization import quantize_static

    kwargs: dict[str, Any] = {**ort_enums(options), "extra_options": {"ActivationSymmetric": options.symmetric_activations}}
    if options.tensorrt_layout:
        ops = sorted({n.op_type for n in onnx.load(str(src), load_external_data=False).graph.node})
        kwargs["extra_options"].update({**TENSORRT_EXTRA, "OpTypesToExcludeOutputQuantization": ops})
        kwargs["op_types_to_quantize"] = list(TENSORRT_OPS)
    if options.keep_float:
        kwargs["nodes_to_exclude"] = list(options.keep_float)
    if only is not None:
        kwargs["nodes_to_quantize"] = only
    if "calibration_cache_path" in inspect.signature(quantize_static).parameters:
        with _quiet_root_logger():
            quantize_static(str(src), str(dst), None, calibration_cache_path=calib_cache, **kwargs)
        return

    class Precomputed:
        def collect_data(self, _reader: Any) -> None:
            pass

        def compute_data(self) -> Any:
            return ranges

    module = importlib.import_module("onnxruntime.quantization.quantize")  # the package exports a function of that name
    with mock.patch.object(module, "create_calibrator", lambda *a, **k: Precomputed()), _quiet_root_logger():
        quantize_static(str(src), str(dst), batch_reader(input_name(src), iter(())), **kwargs)


def to_int8_dynamic(src: Path, dst: Path, options: QuantOptions, phases: Phases) -> None:
    """Dynamic INT8 (ONNX Runtime's quantize_dynamic): int8 weights of MatMul/Gemm/Conv..., each activation's range
    taken per batch at run time, so nothing is calibrated; nodes in `keep_float` stay float."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    options.validate()
    check_keep_float(src, options.keep_float)
    kwargs: dict[str, Any] = {"per_channel": options.per_channel, "weight_type": getattr(QuantType, QUANT_TYPES[options.weight_type])}
    if options.keep_float:
        kwargs["nodes_to_exclude"] = list(options.keep_float)
    with phases("quantize"), _quiet_root_logger():
        quantize_dynamic(str(src), str(dst), **kwargs)


def describe(options: QuantOptions) -> str:
    """The INT8 scheme in words, for the run's numerics tag."""
    scales = "per-channel" if options.per_channel else "per-tensor"
    if options.quant_mode == "dynamic":
        return f"int8 dynamic (quantize_dynamic: DynamicQuantizeLinear, MatMulInteger/ConvInteger): {options.weight_type} {scales} weights, uint8 activations quantized per batch at run time" + (
            f"; {len(options.keep_float)} nodes kept in float" if options.keep_float else ""
        )
    symmetry = "symmetric" if options.symmetric_activations else "asymmetric"
    return (
        f"int8 {options.quant_format.upper()}: {options.weight_type} {scales} weights, "
        f"{options.activation_type} {symmetry} activations, {options.calib_method} calibration"
        + (f"; {len(options.keep_float)} nodes kept in float" if options.keep_float else "")
    )
