"""torch -> ONNX with a dynamic batch axis, checked with onnx.checker; foreign ONNX models checked for what ptq feeds them."""

from __future__ import annotations

import inspect
import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from ptq.errors import PtqError

if TYPE_CHECKING:
    from torch import nn

INPUT_NAME, OUTPUT_NAME = "input", "logits"
IMAGENET_CLASSES = 1000
OPSET = 17  # parsed by TensorRT 8.5 (JetPack 5) and 10 (JetPack 6) alike


def to_onnx(module: nn.Module, crop: int, path: Path) -> Path:
    """Export `module` in eval mode for NCHW float32 input of side `crop`; batch stays dynamic."""
    import torch

    module = module.eval()
    dummy = torch.zeros(1, 3, crop, crop)
    # The TorchScript exporter: torch 2.9+ defaults to the dynamo one, which `dynamo=False` (2.4+) declines.
    legacy: dict[str, Any] = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    with warnings.catch_warnings(), torch.inference_mode(), _attention_unfused():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(
            module,
            (dummy,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
            **legacy,
        )
    check(path)
    return path


@contextmanager
def _attention_unfused() -> Iterator[None]:
    """In eval mode torch's nn.MultiheadAttention takes a fused fast path (aten::_native_multi_head_attention) that
    no ONNX opset has, so ViT, Swin and MaxViT fail to export; without it attention exports as MatMul and Softmax,
    the same numbers."""
    import torch

    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):  # torch before 2.1 decides per call
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


PREPROCESSING = "ptq.preprocessing"  # metadata key: how images must be prepared for this model (JSON)


def stamp(path: Path, preprocessing: dict[str, Any], extra: dict[str, str] | None = None) -> None:
    """Write the model's eval preprocessing (and name) into the ONNX file's metadata, so a device that runs the file
    alone (`model=path.onnx`, no torch) prepares images exactly as torchvision did on the host; `extra` metadata
    (key -> text) goes in with it, in the same write."""
    values = {PREPROCESSING: json.dumps(preprocessing, sort_keys=True), **(extra or {})}
    model = onnx.load(str(path))
    kept = [p for p in model.metadata_props if p.key not in values]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in values.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def preprocessing(path: Path) -> dict[str, Any] | None:
    """The preprocessing `stamp` wrote into an ONNX file, or None for a file exported elsewhere (or unreadable:
    `check` names that problem)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return None
    for prop in model.metadata_props:
        if prop.key == PREPROCESSING:
            value: dict[str, Any] = json.loads(prop.value)
            return value
    return None


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


def _dims(value: onnx.ValueInfoProto) -> list[int | None] | None:
    """A tensor's static dim sizes (None where symbolic or unknown), or None where its rank is not declared."""
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]


def _shape_text(value: onnx.ValueInfoProto) -> str:
    """A tensor's declared shape as text, symbolic dims by name: (batch, 3, 224, 224)."""
    dims = value.type.tensor_type.shape.dim
    return "(" + ", ".join(str(d.dim_value) if d.HasField("dim_value") else d.dim_param or "?" for d in dims) + ")"


def check_classifier(path: Path, crop: int, accuracy: bool) -> None:
    """Refuse, before any work, an ONNX model ptq cannot feed (its declared input must be float32 (N, 3, crop, crop)
    with a dynamic batch) or, when `accuracy` is measured, cannot score (its declared output must be (N, 1000))."""
    model = check(path)
    inp, out = model.graph.input[0], model.graph.output[0]
    where = f"{path.name}'s input {inp.name!r}"
    if inp.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        elem = onnx.TensorProto.DataType.Name(inp.type.tensor_type.elem_type)
        raise PtqError(f"{where} is {elem}, but ptq feeds float32 images: re-export it with a float32 input")
    dims = _dims(inp)
    if dims is not None:
        if len(dims) != 4 or dims[1] not in (None, 3):
            raise PtqError(
                f"{where} has shape {_shape_text(inp)}, but ptq feeds RGB images as NCHW (N, 3, {crop}, {crop}): "
                "re-export it with one float32 (N, 3, H, W) image input"
            )
        if dims[0] is not None:
            raise PtqError(
                f"{where} has a fixed batch size of {dims[0]}, but ptq runs batches of several sizes (calibration, latency, evaluation): "
                "re-export it with a dynamic batch axis"
            )
        sides = {d for d in dims[2:] if d is not None}
        if len(sides) > 1:
            raise PtqError(f"{where} has shape {_shape_text(inp)}, but ptq feeds square center crops: re-export it for a square input")
        if sides - {crop}:
            raise PtqError(
                f"{where} has shape {_shape_text(inp)}, but input_size={crop} makes {crop}x{crop} crops: pass input_size={sides.pop()}"
            )
    outs = _dims(out)
    if accuracy and outs is not None and (len(outs) != 2 or outs[1] not in (None, IMAGENET_CLASSES)):
        raise PtqError(
            f"{path.name} outputs shape {_shape_text(out)}, not scores for the {IMAGENET_CLASSES} ImageNet classes (N, {IMAGENET_CLASSES}), "
            "so its accuracy cannot be measured: run it with weights=random (size, compression and latency only)"
        )


def input_name(path: Path) -> str:
    """Name of the model's single input."""
    return onnx.load(str(path), load_external_data=False).graph.input[0].name
