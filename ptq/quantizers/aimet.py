"""Qualcomm AIMET's ONNX quantization simulation (`aimet_onnx`): CLE, AdaRound or sequential MSE, then encodings,
exported as Q/DQ; the adapter `ptq.quantizers.child` runs, in AIMET's environment (it needs torch)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ptq.errors import PtqError
from ptq.options import option

NAME = "aimet"
DISTRIBUTION = "aimet-onnx"
TENSORRT = True  # lays Q/DQ out as TensorRT takes it on request (symmetric signed activations, float network outputs)
# (AIMET's percentile scheme is left out: aimet-onnx never sets a percentile, so it computes min-max, and it is deprecated)
CALIB_METHODS = {"minmax": "min_max", "tf_enhanced": "tf_enhanced"}


@dataclass(frozen=True)
class Options:
    """AIMET's techniques and settings; defaults are AIMET's own (min-max, its per-channel default config)."""

    per_channel: bool = option(True, "Per-channel weight scales: true/false")
    calib_method: str = option("minmax", "AIMET quant scheme (weights and activations): minmax or tf_enhanced (SQNR)")
    cle: bool = option(False, "Cross-layer equalization before quantizing; AIMET folds batch norms and makes ReLU6 between convs ReLU, which changes the float network: true/false")
    adaround: bool = option(False, "AdaRound: learned rounding of the weights, layer by layer: true/false")
    seq_mse: bool = option(False, "Sequential MSE: weight ranges searched layer by layer: true/false")
    iterations: int = option(10000, "AdaRound optimisation iterations per layer")

    def validate(self) -> None:
        """Refuse unknown values and combinations before any work."""
        if self.calib_method not in CALIB_METHODS:
            raise PtqError(f"unknown calib_method {self.calib_method!r} for quantizer aimet: use one of {', '.join(CALIB_METHODS)}")
        if self.adaround and self.seq_mse:
            raise PtqError("adaround and seq_mse both set the weights' encodings: choose one")
        if self.seq_mse and self.calib_method != "minmax":
            raise PtqError(f"AIMET's sequential MSE needs the minmax quant scheme, not {self.calib_method}: use calib_method=minmax")
        if self.iterations < 1:
            raise PtqError(f"iterations={self.iterations} must be at least 1")

    def techniques(self) -> list[str]:
        """What these options apply, in AIMET's order."""
        names = [("cle", self.cle), ("adaround", self.adaround), ("seq_mse", self.seq_mse), (self.calib_method, True)]
        return [name for name, on in names if on]


def quantize(model: Path, calibration: np.ndarray, out: Path, opts: Options, mark: Callable[[str], None], tensorrt: bool) -> dict[str, Any]:
    """CLE on the float graph, a QuantizationSimModel, AdaRound or sequential MSE on its weights, encodings from the
    calibration images, and its Q/DQ export: each step its own phase, as AIMET's API keeps them apart. For TensorRT
    (`tensorrt`): symmetric activations exported as signed int8, and no quantizer on the network's outputs."""
    import json
    import tempfile

    import onnx
    from aimet_onnx import QuantizationSimModel, apply_adaround, apply_seq_mse
    from aimet_onnx.common.quantsim_config import quantsim_config
    from aimet_onnx.cross_layer_equalization import equalize_model

    graph = onnx.load(str(model))
    name = graph.graph.input[0].name
    inputs = [{name: calibration[i : i + 1]} for i in range(len(calibration))]
    clips = sum(n.op_type == "Clip" for n in graph.graph.node)
    if opts.cle:
        mark("cle")
        equalize_model(graph)
    mark("quantize")
    config = json.loads((Path(quantsim_config.__file__).parent / ("default_config_per_channel.json" if opts.per_channel else "default_config.json")).read_text())
    if tensorrt:
        config["defaults"]["ops"]["is_symmetric"] = "True"
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=out.parent) as file:
        json.dump(config, file)
        file.flush()
        sim = QuantizationSimModel(graph, param_type="int8", activation_type="int8", quant_scheme=CALIB_METHODS[opts.calib_method], config_file=file.name)
    if tensorrt:
        for output in graph.graph.output:
            if output.name in sim.qc_quantize_op_dict:
                sim.qc_quantize_op_dict[output.name].enabled = False
    if opts.adaround:
        mark("adaround")
        apply_adaround(sim, inputs, num_iterations=opts.iterations)
    if opts.seq_mse:
        mark("seq_mse")
        apply_seq_mse(sim, inputs)
    mark("calibrate")
    sim.compute_encodings(inputs)
    mark("write")
    # int8 weights in the file, but float weights behind Q -> DQ for TensorRT (8.x takes no int8 weight initializers)
    qdq = sim.to_onnx_qdq(prequantize_constants=not tensorrt, force_activation_as="signed" if tensorrt else "unsigned")
    onnx.save(qdq, str(out))
    return {"calibration_images": len(calibration), "relu6_made_relu": clips - sum(n.op_type == "Clip" for n in graph.graph.node)}
