"""TensorRT's rules for an explicitly quantized (QDQ) ONNX, checked without TensorRT or a GPU.

What TensorRT accepts, from its own documentation and parser (cited per rule):
- DequantizeLinear takes int8 data only: TensorRT 8.5's dequantize layer takes INT8, 10.x INT8/FP8/INT4, and the
  parser refuses anything else with "only activation types allowed as input to this layer" (an INT32 bias behind a
  DQ, as ONNX Runtime's `QuantizeBias=True` writes, or uint8 data): onnx-tensorrt#850, onnxruntime#14229, TensorRT#3360.
- Zero points are 0: TensorRT quantization is symmetric (TensorRT developer guide, "Explicit Quantization";
  onnx-tensorrt's QuantizeLinear/DequantizeLinear importers reject a non-zero zero point).
- Activations have one scale per tensor; weights one per tensor or one per output channel on that channel's axis
  (developer guide, "Q/DQ Layer-Placement Recommendations" and IQuantizeLayer::setAxis).
- Nothing quantizes the network's outputs (no Q/DQ on the logits): NVIDIA ModelOpt's ORT settings exclude output
  quantization (modelopt/onnx/quantization/ort_utils.py, configure_ort: OpTypesToExcludeOutputQuantization).
- TensorRT 8.x: weights as float initializers behind Q -> DQ, not int8 initializers (ModelOpt's `AddQDQPairToWeight:
  True`; onnxruntime#11535, optimum#812). TensorRT 10 takes both, so this rule applies where `tensorrt_major` < 10.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import onnx
from onnx import numpy_helper

from ptq.errors import PtqError

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
WEIGHT_AXIS = {"Conv": 0, "ConvTranspose": 1}  # the output-channel axis of a weight, per consumer (Gemm: by transB)


def is_qdq(path: Path) -> bool:
    """Whether the ONNX model is already quantized (has Q/DQ nodes): an explicit-INT8 model, not an FP32 one. A file
    that is no ONNX model is not one either (the run's own model check then names it in one line)."""
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:  # protobuf's DecodeError and its kin: a corrupt or foreign file
        return False
    return any(n.op_type in QDQ_OPS for n in graph.node)


def _weight_axis(consumer: onnx.NodeProto, slot: int) -> Optional[int]:
    """The output-channel axis of the weight that `consumer` reads at input `slot`, or None if that input is no weight."""
    if consumer.op_type in ("Conv", "ConvTranspose", "Gemm") and slot == 2:  # a bias: one value per output channel
        return 0
    if consumer.op_type in WEIGHT_AXIS and slot == 1:
        return WEIGHT_AXIS[consumer.op_type]
    if consumer.op_type == "Gemm" and slot == 1:
        trans_b = next((a.i for a in consumer.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if consumer.op_type == "MatMul" and slot == 1:
        return 1
    return None


def violations(model: onnx.ModelProto, tensorrt_major: Optional[int] = None) -> List[str]:
    """Every place where `model` breaks TensorRT's Q/DQ rules (see the module's docstring), one line each."""
    graph = model.graph
    inits: Dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
    producer = {out: n for n in graph.node for out in n.output}
    consumers: Dict[str, List[tuple]] = {}
    for n in graph.node:
        for slot, name in enumerate(n.input):
            consumers.setdefault(name, []).append((n, slot))
    found: List[str] = []

    def elem_type(name: str) -> Optional[int]:
        if name in inits:
            return inits[name].data_type
        node = producer.get(name)
        if node is not None and node.op_type == "QuantizeLinear":
            zp = node.input[2] if len(node.input) > 2 else ""
            return inits[zp].data_type if zp in inits else onnx.TensorProto.UINT8  # ONNX: no zero point means uint8
        return None

    for node in graph.node:
        if node.op_type not in QDQ_OPS:
            continue
        where = f"{node.op_type} {node.name or node.output[0]}"
        if len(node.input) > 2 and node.input[2] in inits:
            zp = numpy_helper.to_array(inits[node.input[2]])
            if zp.any():
                found.append(f"{where}: zero point {zp.ravel()[:4].tolist()} is not 0 (TensorRT quantizes symmetrically)")
        elif node.op_type == "QuantizeLinear" and len(node.input) < 3:
            found.append(f"{where}: no zero point, so ONNX makes it uint8 (TensorRT takes int8)")
        if node.op_type == "DequantizeLinear":
            kind = elem_type(node.input[0])
            if kind is not None and kind != onnx.TensorProto.INT8:
                name = onnx.TensorProto.DataType.Name(kind)
                found.append(f"{where}: dequantizes {name} data (TensorRT's dequantize takes int8 only{'; an INT32 bias behind DQ' if kind == onnx.TensorProto.INT32 else ''})")
            if tensorrt_major is not None and tensorrt_major < 10 and node.input[0] in inits:
                found.append(f"{where}: int8 weight initializer feeding DQ (TensorRT {tensorrt_major} wants float weights behind Q -> DQ)")
        scale = inits.get(node.input[1])
        if scale is None:
            continue
        size = int(numpy_helper.to_array(scale).size)
        if size == 1:
            continue
        weight = node.input[0] in inits
        if not weight and node.op_type == "DequantizeLinear":  # a float weight behind Q -> DQ
            q = producer.get(node.input[0])
            weight = q is not None and q.op_type == "QuantizeLinear" and q.input[0] in inits
        if not weight:
            found.append(f"{where}: {size} scales on an activation (TensorRT takes one scale per activation tensor)")
        elif node.op_type == "DequantizeLinear":
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            axes = {_weight_axis(c, slot) for c, slot in consumers.get(node.output[0], [])}
            if axes != {axis}:
                found.append(f"{where}: per-channel scales on axis {axis}, not on the output channels of the weight's consumer")
    produced_by_qdq = {out for n in graph.node if n.op_type in QDQ_OPS for out in n.output}
    for output in graph.output:
        if output.name in produced_by_qdq:
            found.append(f"graph output {output.name}: quantized (TensorRT's Q/DQ placement leaves the network's outputs in float)")
    return found


def require(path: Path, tensorrt_major: Optional[int] = None) -> None:
    """Refuse, in one line, a QDQ ONNX that TensorRT would reject, naming the first problems and how many there are."""
    found = violations(onnx.load(str(path), load_external_data=False), tensorrt_major)
    if found:
        more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
        raise PtqError(
            f"{path.name} breaks TensorRT's Q/DQ rules: {'; '.join(found[:3])}{more}: "
            "make it with `ptq quantize --backend tensorrt` (ONNX Runtime set up as NVIDIA ModelOpt sets it up for TensorRT)"
        )
