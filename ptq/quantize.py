"""ONNX-level compression with the field's tools: FP16 by graph conversion, INT8 by ONNX Runtime static PTQ."""

from __future__ import annotations

import itertools
import logging
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    create_calibrator,
    quant_pre_process,
    quantize_static,
    save_tensors_data,
)

from ptq.errors import PtqError
from ptq.export import input_name
from ptq.phases import Phases

log = logging.getLogger(__name__)

CALIB_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
QUANT_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
QUANT_FORMATS = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}


@dataclass(frozen=True)
class QuantOptions:
    """The INT8 technique knobs the study compares. Defaults are the best measured on lite0/r50 here (BENCHMARKS.md)."""

    calib_method: str = "minmax"
    per_channel: bool = True
    activation_type: str = "uint8"  # int8 activations made r50 slower than FP32 on an AVX-512 VNNI CPU
    weight_type: str = "int8"
    quant_format: str = "qdq"
    percentile: float = 99.999
    # Histogram bins for entropy/percentile. ONNX Runtime's entropy default (128 bins, 128 quantized bins)
    # leaves a single candidate threshold, the full range, which makes it identical to minmax; 2048 is TensorRT's.
    calib_bins: int = 2048
    symmetric_activations: bool = False  # TensorRT's explicit quantization needs symmetric int8 activations
    calib_batch: int = 8

    def validate(self) -> None:
        """Refuse unknown values before any work is done."""
        for name, value, allowed in (
            ("calib_method", self.calib_method, CALIB_METHODS),
            ("activation_type", self.activation_type, QUANT_TYPES),
            ("weight_type", self.weight_type, QUANT_TYPES),
            ("quant_format", self.quant_format, QUANT_FORMATS),
        ):
            if value not in allowed:
                raise PtqError(f"unknown {name} {value!r}: use one of {', '.join(allowed)}")
        if not 0 < self.percentile <= 100:
            raise PtqError(f"percentile={self.percentile} must be in (0, 100]")
        if self.calib_bins < 256:
            raise PtqError(f"calib_bins={self.calib_bins} must be at least 256 (entropy needs more bins than its 128 quantized bins)")


def even_batch(images: int, preferred: int) -> int:
    """The largest batch size up to `preferred` that divides `images`: ONNX Runtime's histogram calibrators
    (entropy, percentile) fail on a short last batch, so every calibration batch has the same size."""
    return max(d for d in range(1, max(1, min(preferred, images)) + 1) if images % d == 0) if images else 1


class BatchReader(CalibrationDataReader):
    """Feeds calibration images to ONNX Runtime's calibrator in batches."""

    def __init__(self, input_name: str, batches: Iterator[np.ndarray]) -> None:
        self.input_name = input_name
        self.batches = batches

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {self.input_name: batch}


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


def to_int8(
    src: Path,
    dst: Path,
    batches: Iterator[np.ndarray],
    options: QuantOptions,
    phases: Phases,
    calib_cache: Path,
) -> str:
    """Static PTQ: ORT pre-processing, calibration (ranges saved to `calib_cache`), then QDQ quantization.
    Returns what was quantized: the pre-processed graph, or the raw one where pre-processing failed.

    ONNX Runtime's calibrators keep every intermediate tensor of the images of one `collect_data` call
    (about 60 MB per image for lite0: 300 entropy images took 19 GB), so images go in chunks of
    CALIB_CHUNK_IMAGES; ranges and histograms merge across calls."""
    options.validate()
    method = CALIB_METHODS[options.calib_method]
    calib_extra: dict[str, object] = {"symmetric": options.symmetric_activations}
    if method is not CalibrationMethod.MinMax:
        calib_extra["num_bins"] = options.calib_bins
    if method is CalibrationMethod.Percentile:
        calib_extra["percentile"] = options.percentile
    with tempfile.TemporaryDirectory(prefix="ptq-quant-") as tmp:
        pre = Path(tmp) / "preprocessed.onnx"
        with phases("preprocess"):
            graph = "pre-processed (quant_pre_process)"
            try:
                quant_pre_process(str(src), str(pre))
            except Exception as exc:  # symbolic shape inference fails on some graphs; quantize the plain one
                log.warning("ONNX Runtime pre-processing failed (%s); quantizing the un-preprocessed model", exc)
                graph = f"raw graph: quant_pre_process failed ({str(exc).splitlines()[0][:150]})"
                pre = src
        with phases("calibrate"):
            calibrator = create_calibrator(
                pre,
                None,
                augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                calibrate_method=method,
                extra_options=calib_extra,
            )
            name = input_name(src)
            while chunk := list(itertools.islice(batches, max(1, CALIB_CHUNK_IMAGES // options.calib_batch))):
                calibrator.collect_data(BatchReader(name, iter(chunk)))
            save_tensors_data(calibrator.compute_data(), calib_cache)
            del calibrator
        with phases("quantize"), _quiet_root_logger():
            quantize_static(
                str(pre),
                str(dst),
                None,
                quant_format=QUANT_FORMATS[options.quant_format],
                per_channel=options.per_channel,
                activation_type=QUANT_TYPES[options.activation_type],
                weight_type=QUANT_TYPES[options.weight_type],
                calibrate_method=method,
                calibration_cache_path=calib_cache,
                extra_options={"ActivationSymmetric": options.symmetric_activations},
            )
    return graph


def describe(options: QuantOptions) -> str:
    """The INT8 scheme in words, for the run's numerics tag."""
    scales = "per-channel" if options.per_channel else "per-tensor"
    symmetry = "symmetric" if options.symmetric_activations else "asymmetric"
    return (
        f"int8 {options.quant_format.upper()}: {options.weight_type} {scales} weights, "
        f"{options.activation_type} {symmetry} activations, {options.calib_method} calibration"
    )
