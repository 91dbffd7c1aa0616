"""torch -> ONNX with a dynamic batch axis, checked with onnx.checker."""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from ptq.errors import PtqError

INPUT_NAME, OUTPUT_NAME = "input", "logits"
OPSET = 17  # parsed by TensorRT 8.5 (JetPack 5) and 10 (JetPack 6) alike


def to_onnx(module: nn.Module, crop: int, path: Path) -> Path:
    """Export `module` in eval mode for NCHW float32 input of side `crop`; batch stays dynamic."""
    module = module.eval()
    dummy = torch.zeros(1, 3, crop, crop)
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(
            module,
            (dummy,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    check(path)
    return path


def check(path: Path) -> onnx.ModelProto:
    """Load and validate an ONNX file; a corrupt or foreign file becomes a one-line error."""
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:
        raise PtqError(f"{path} is not a valid ONNX model ({str(exc).splitlines()[0][:200]}): re-export it") from None
    if len(model.graph.input) != 1:
        raise PtqError(f"{path} has {len(model.graph.input)} inputs; ptq expects one NCHW image input")
    return model


def input_name(path: Path) -> str:
    """Name of the model's single input."""
    return onnx.load(str(path), load_external_data=False).graph.input[0].name
