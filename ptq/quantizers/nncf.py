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
# NNCF's progress bars (nncf.common.logging.track_progress.track) by description -> the technique each belongs to
TRACKED = {
    "Statistics collection": "calibrate",
    "Applying Fast Bias correction": "bias_correction",
    "Applying Bias correction": "bias_correction",
    "Applying Smooth Quant": "smoothquant",
    "Channel alignment": "channel_alignment",
}


@dataclass(frozen=True)
class Options:
    """NNCF's techniques and settings, as `nncf.quantize` takes them; defaults are NNCF's own."""

    bias_correction: str = option("fast", "NNCF bias correction: fast (its default), full (fast_bias_correction=False) or none")
    per_channel: bool = option(True, "Per-channel weight scales: true/false")
    nncf_preset: str = option("performance", "NNCF preset: performance (symmetric activations) or mixed (asymmetric)")
    smoothquant_alpha: float = option(0.0, "SmoothQuant's alpha for MatMul (NNCF applies it with model_type=transformer); 0 = off")

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
        return [*(["smoothquant"] if self.smoothquant_alpha else []), "minmax", *([f"{self.bias_correction}_bias_correction"] if self.bias_correction != "none" else [])]


def quantize(model: Path, calibration: np.ndarray, out: Path, opts: Options, mark: Callable[[str], None], tensorrt: bool) -> dict[str, Any]:
    """`nncf.quantize` on every calibration image (batch 1), its progress bars marking the techniques' phases."""
    import nncf
    import onnx
    from nncf.common.logging import track_progress
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters, QuantizationParameters

    original = track_progress.track.__iter__

    def tracked(self: Any) -> Any:
        mark(TRACKED.get(self.description, "quantize"))
        yield from original(self)
        mark("quantize")

    track_progress.track.__iter__ = tracked  # type: ignore[method-assign]
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
    return {"calibration_images": len(calibration)}
