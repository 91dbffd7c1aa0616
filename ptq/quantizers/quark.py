"""AMD Quark's ONNX quantizer (`quark.onnx.ModelQuantizer`): int8 Q/DQ with CLE, bias correction, AdaRound or
AdaQuant; the adapter `ptq.quantizers.child` runs, in Quark's environment (it pins onnx <= 1.22)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ptq.errors import PtqError
from ptq.options import option

NAME = "quark"
DISTRIBUTION = "amd-quark"
TENSORRT = True  # lays Q/DQ out as TensorRT takes it on request (no INT32 biases, float network outputs)
# (Quark's MinMSE is left out: it switches scales to powers of two, a different scheme, quark/onnx/quant_utils warns)
CALIB_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}
# Quark's algorithm names (its pre- and post-quantization hooks' `algorithm` argument) -> ptq's phase names
ALGORITHMS = {"CLE": "cle", "SmoothQuant": "smoothquant", "BiasCorrection": "bias_correction"}


@dataclass(frozen=True)
class Options:
    """Quark's techniques and their settings; defaults are Quark's own (Int8Spec: symmetric, per-tensor, percentile)."""

    per_channel: bool = option(False, "Per-channel weight scales: true/false")
    calib_method: str = option("percentile", "Activation calibration: minmax, percentile or entropy")
    # int8: Quark's Int8Spec (symmetric); uint8: UInt8Spec (asymmetric), what ONNX Runtime's x86 kernels run fastest (u8s8)
    activation_type: str = option("int8", "Quark activations: int8 (symmetric, its Int8Spec) or uint8 (asymmetric, UInt8Spec)")
    cle: bool = option(False, "Cross-layer equalization before quantizing: true/false")
    bias_correction: bool = option(False, "Bias correction after quantizing: true/false")
    adaround: bool = option(False, "AdaRound: learned rounding of the weights, layer by layer: true/false")
    adaquant: bool = option(False, "AdaQuant: learned weights (and rounding), layer by layer: true/false")
    iterations: int = option(1000, "AdaRound/AdaQuant optimisation iterations per layer (Quark's AdaRound default; its AdaQuant's is 3000)")

    def validate(self) -> None:
        """Refuse unknown values and combinations before any work."""
        if self.calib_method not in CALIB_METHODS:
            raise PtqError(f"unknown calib_method {self.calib_method!r} for quantizer quark: use one of {', '.join(CALIB_METHODS)}")
        if self.activation_type not in ("int8", "uint8"):
            raise PtqError(f"unknown activation_type {self.activation_type!r} for quantizer quark: use int8 or uint8")
        if self.adaround and self.adaquant:
            raise PtqError("adaround and adaquant both fine-tune the weights after quantizing: choose one")
        if self.bias_correction and self.calib_method not in ("minmax", "percentile"):  # Quark's bias correction re-calibrates
            raise PtqError(f"Quark's bias correction works with calib_method minmax or percentile, not {self.calib_method}: change one")
        if self.iterations < 1:
            raise PtqError(f"iterations={self.iterations} must be at least 1")

    def check_target(self, tensorrt: bool) -> None:
        """Refuse, before work, what Quark cannot lay out for TensorRT."""
        if tensorrt and self.activation_type != "int8":
            raise PtqError(f"activation_type={self.activation_type}: TensorRT takes symmetric int8 activations only: use activation_type=int8 for backend tensorrt")
        if tensorrt and self.bias_correction:  # it looks the float bias up among node outputs, where QuantizeBias=False leaves it
            raise PtqError("Quark's bias correction needs quantized biases, which TensorRT does not take: drop bias_correction for backend tensorrt")

    def techniques(self) -> list[str]:
        """What these options apply, in Quark's order."""
        names = [("cle", self.cle), (self.calib_method, True), ("bias_correction", self.bias_correction), ("adaround", self.adaround), ("adaquant", self.adaquant)]
        return [name for name, on in names if on]


class _Reader:
    """Calibration images one at a time, as Quark's CalibrationDataReader protocol reads them."""

    def __init__(self, name: str, images: np.ndarray) -> None:
        self.name, self.images, self.index = name, images, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.index >= len(self.images):
            return None
        self.index += 1
        return {self.name: self.images[self.index - 1 : self.index]}

    def rewind(self) -> None:
        self.index = 0


def quantize(model: Path, calibration: np.ndarray, out: Path, opts: Options, mark: Callable[[str], None], tensorrt: bool) -> dict[str, Any]:
    """`ModelQuantizer.quantize_model` with these techniques; Quark's calibration and its pre/post algorithm hooks
    are wrapped, so each marks its own phase. For TensorRT (`tensorrt`): biases stay float and the ops that make the
    network's outputs are not output-quantized (Int8Spec is symmetric int8 already), which TensorRT's rules want."""
    import onnx
    import quark.onnx.postprocess.postproc as post
    import quark.onnx.preprocess.preproc as pre
    import quark.onnx.quantization.quantize as quark_quantize
    from quark.onnx import ModelQuantizer
    from quark.onnx.quantization.config import QConfig, algorithm, spec

    finetune = "adaround" if opts.adaround else "adaquant"

    def phased(function: Callable[..., Any], phase: Callable[[dict[str, Any]], str]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            mark(phase(kwargs))
            try:
                return function(*args, **kwargs)
            finally:
                mark("quantize")

        return wrapper

    quark_quantize.run_calibration = phased(quark_quantize.run_calibration, lambda _: "calibrate")
    pre.apply_pre_quant_algorithms = phased(pre.apply_pre_quant_algorithms, lambda kw: ALGORITHMS.get(kw.get("algorithm", ""), "preprocess"))
    post.apply_post_quant_algorithms = phased(post.apply_post_quant_algorithms, lambda kw: finetune if kw.get("algorithm") == "FastFinetune" else ALGORITHMS.get(kw.get("algorithm", ""), "quantize"))
    mark("quantize")
    method = getattr(spec.CalibMethod, CALIB_METHODS[opts.calib_method])
    granularity = spec.QuantGranularity.Channel if opts.per_channel else spec.QuantGranularity.Tensor
    activation = (spec.Int8Spec if opts.activation_type == "int8" else spec.UInt8Spec)(calibration_method=method)
    layer = spec.QLayerConfig(activation=activation, weight=spec.Int8Spec(calibration_method=spec.CalibMethod.MinMax, quant_granularity=granularity))
    algos: list[Any] = []
    if opts.cle:
        algos.append(algorithm.CLEConfig())
    if opts.bias_correction:
        algos.append(algorithm.BiasCorrectionConfig())
    if opts.adaround:
        algos.append(algorithm.AdaRoundConfig(num_iterations=opts.iterations, batch_size=1, num_batches=1))
    if opts.adaquant:
        algos.append(algorithm.AdaQuantConfig(num_iterations=opts.iterations, batch_size=1, num_batches=1))
    graph = onnx.load(str(model), load_external_data=False).graph
    outputs = {o.name for o in graph.output}
    # for TensorRT: float biases, float weights behind Q -> DQ (TensorRT 8.x), no output Q/DQ on the op types that make the
    # network's outputs (Quark excludes by op type: every Gemm of the network, here its one classifier)
    extra = {"QuantizeBias": False, "AddQDQPairToWeight": True, "OpTypesToExcludeOutputQuantization": sorted({n.op_type for n in graph.node if outputs & set(n.output)})} if tensorrt else {}
    ModelQuantizer(QConfig(global_config=layer, algo_config=algos, **extra)).quantize_model(str(model), str(out), _Reader(graph.input[0].name, calibration))
    return {"calibration_images": len(calibration)}
