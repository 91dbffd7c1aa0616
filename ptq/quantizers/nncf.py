"""Intel NNCF's post-training quantization of an ONNX model (`nncf.quantize`): min-max ranges, then fast or full bias
correction, optionally SmoothQuant; the adapter `ptq.quantizers.child` runs, in NNCF's environment."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ptq.errors import PtqError
from ptq.options import option

NAME = "nncf"
DISTRIBUTION = "nncf"
# NNCF writes uint8 activations and per-channel activation scales (67 of TensorRT's Q/DQ rules broken on lite0), and its
# hardware config refuses forcing signed activations: its files are for ONNX Runtime, not TensorRT
TENSORRT = False
BIAS_CORRECTIONS = ("fast", "full", "none")
PRESETS = ("performance", "mixed")
# NNCF's algorithms by class -> ptq's phase while each applies (MinMaxQuantization inserts the Q/DQ: quantize). A
# pipeline step collects its algorithms' statistics in one pass first: MinMax's with bias correction's (calibrate),
# SmoothQuant's apart (smoothquant).
APPLIES = {"SmoothQuant": "smoothquant", "MinMaxQuantization": "quantize", "FastBiasCorrection": "bias_correction", "BiasCorrection": "bias_correction"}

@dataclass(frozen=True)
class Options:
    """NNCF's techniques and settings, as `nncf.quantize` takes them; defaults are NNCF's own."""

    bias_correction: str = option("fast", "NNCF bias correction: fast (its default), full (fast_bias_correction=False) or none")
    per_channel: bool = option(True, "Per-channel weight scales: true/false")
    nncf_preset: str = option("performance", "NNCF preset: performance (symmetric activations) or mixed (asymmetric)")
    smoothquant_alpha: float = option(0.0, "SmoothQuant's alpha for MatMul/Gemm, 0 = off; NNCF applies it with model_type=transformer, which also leaves Add, pools and norms float")

    def validate(self) -> None:
        """Refuse unknown values before any work."""
        if self.bias_correction not in BIAS_CORRECTIONS:
            raise PtqError(f"unknown bias_correction {self.bias_correction!r}: use one of {', '.join(BIAS_CORRECTIONS)}")
        if self.nncf_preset not in PRESETS:
            raise PtqError(f"unknown nncf_preset {self.nncf_preset!r}: use one of {', '.join(PRESETS)}")
        if not 0 <= self.smoothquant_alpha <= 1:
            raise PtqError(f"smoothquant_alpha={self.smoothquant_alpha} must be in [0, 1] (0 = off)")

    def techniques(self) -> list[str]:
        """What these options apply, in NNCF's order."""
        smooth = [f"smoothquant (alpha {self.smoothquant_alpha:g}, model_type=transformer)"] if self.smoothquant_alpha else []
        return [*smooth, "minmax", *([f"{self.bias_correction}_bias_correction"] if self.bias_correction != "none" else [])]


def quantize(model: Path, calibration: np.ndarray, out: Path, opts: Options, mark: Callable[[str], None], tensorrt: bool) -> dict[str, Any]:
    """`nncf.quantize` on every calibration image (batch 1); each step of NNCF's pipeline marks its phase, from the
    statistics it collects to its apply."""
    import nncf
    import onnx
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters, QuantizationParameters
    from nncf.quantization.algorithms.bias_correction.algorithm import BiasCorrection
    from nncf.quantization.algorithms.fast_bias_correction.algorithm import FastBiasCorrection
    from nncf.quantization.algorithms.min_max.algorithm import MinMaxQuantization
    from nncf.quantization.algorithms.pipeline import Pipeline, get_backend
    from nncf.quantization.algorithms.smooth_quant.algorithm import SmoothQuant

    def applying(cls: Any) -> None:
        original = cls.apply

        def apply(self: Any, *args: Any, **kwargs: Any) -> Any:
            mark(APPLIES[cls.__name__])
            return original(self, *args, **kwargs)

        cls.apply = apply

    for cls in (SmoothQuant, MinMaxQuantization, FastBiasCorrection, BiasCorrection):
        applying(cls)
    statistics = Pipeline.get_statistic_points_for_step

    def collect(self: Any, step_index: int, model: Any, graph: Any) -> Any:
        step = self._remove_unsupported_algorithms(get_backend(model))[step_index]
        mark("smoothquant" if any(isinstance(a, SmoothQuant) for a in step) else "calibrate")
        return statistics(self, step_index, model, graph)

    Pipeline.get_statistic_points_for_step = collect  # type: ignore[method-assign]
    mark("quantize")
    graph = onnx.load(str(model))
    name = graph.graph.input[0].name
    dataset = nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))], lambda x: {name: x})
    advanced = AdvancedQuantizationParameters(
        weights_quantization_params=QuantizationParameters(per_channel=opts.per_channel),
        disable_bias_correction=opts.bias_correction == "none",
        **({"smooth_quant_alphas": AdvancedSmoothQuantParameters(matmul=opts.smoothquant_alpha)} if opts.smoothquant_alpha else {}),
    )
    quantized = nncf.quantize(
        graph,
        dataset,
        preset=getattr(nncf.QuantizationPreset, opts.nncf_preset.upper()),
        subset_size=len(calibration),
        fast_bias_correction=opts.bias_correction != "full",
        model_type=nncf.ModelType.TRANSFORMER if opts.smoothquant_alpha else None,
        advanced_parameters=advanced,
    )
    mark("write")
    onnx.save(quantized, str(out))
    record: dict[str, Any] = {"calibration_images": len(calibration)}
    if opts.bias_correction == "full":  # nncf/quantization/algorithms/post_training/pipeline.py: a fifth of the subset
        record["bias_correction_images"] = max(int(len(calibration) * 0.2), 1)
    if opts.smoothquant_alpha:
        record["model_type"] = "transformer"
    return record
