"""Quantize on a host, run on a device: `ptq quantize` writes a QDQ ONNX, its FP32 source and its record; a run
given that QDQ file builds it as it is (no calibration on the device) and measures it against that FP32 source.

The QDQ file's metadata (`ptq.qdq`) names the FP32 file beside it (by name and SHA-256) and the images it was
calibrated on, so the device's run can refuse evaluation images that were used to calibrate.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import onnx

from ptq import data, export, models, quantizers
from ptq.backends import backend_class
from ptq.errors import PtqError
from ptq.phases import Phases
from ptq.quantizers import for_tensorrt, qdq_rules, toolkit
from ptq.quantizers import ort as quantize

QDQ_KEY = "ptq.qdq"  # metadata key of a QDQ model made by `ptq quantize` (JSON: fp32 file, its hash, calibration)
QUANTIZERS = ("tensorrt", "ort")  # the backend a QDQ file is made for


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class QdqModel:
    """A QDQ ONNX made by `ptq quantize`: the file, the FP32 model it came from, and its record."""

    path: Path
    fp32: Path
    record: Dict[str, Any]

    def numerics(self) -> str:
        """What the QDQ model computes in, as the quantizer described it."""
        return str(self.record["numerics"])

    def check_split(self, eval_names: List[str]) -> None:
        """Refuse evaluation images that calibrated this model (a different calib_size or split_seed than `ptq quantize`'s)."""
        seen = set(self.record["calib_images"]) & set(eval_names)
        if seen:
            r = self.record
            raise PtqError(
                f"{len(seen)} evaluation images calibrated {self.path.name}: run with calib_size={r['calib_size']} and "
                f"split_seed={r['split_seed']}, as `ptq quantize` did, so evaluation stays unseen"
            )


def write(
    model: str, backend: str, data_dir: Path, out: Path, calib_size: int = 100, split_seed: int = 0, weights: str = "pretrained", calib_method: str = "minmax",
    technique: str = "ort",
) -> Path:
    """Quantize `model` for `backend` on `calib_size` images of `data_dir` (the run's seeded split) into `out`, with
    the FP32 model (`<out>.fp32.onnx`) and the record (`<out>.json`) beside it; returns `out`. `technique` is a
    quantizer spec (`ort`, or a toolkit's such as `quark+adaround+iterations=50`), so a host with the toolkit makes
    the file a device without it runs."""
    name, given = quantizers.parse_spec(technique)
    toolkit_options = quantizers.options(name, given) if name != quantizers.BUILT_IN else None
    if backend not in QUANTIZERS:
        raise PtqError(f"ptq quantize makes QDQ models for backend {' or '.join(QUANTIZERS)}, not {backend!r}")
    target = backend_class(backend).qdq_target  # the Q/DQ layout the device's backend needs
    if toolkit_options is not None:
        toolkit.check(name, target, toolkit_options)
    if out.suffix != ".onnx":
        raise PtqError(f"out={out} must end in .onnx")
    if calib_size < 1:
        raise PtqError(f"calib_size={calib_size}: quantizing needs at least one calibration image")
    quantize.QuantOptions(calib_method=calib_method).validate()
    spec = models.resolve(model)
    if spec.onnx_path is not None and qdq_rules.is_qdq(spec.onnx_path):
        raise PtqError(f"{spec.onnx_path.name} is quantized already: give its FP32 model")
    dataset = data.scan(data_dir)
    split = data.split(len(dataset.files), calib_size, None, split_seed)
    split = replace(split, eval=())  # the images a run with this calib_size and split_seed calibrates on; nothing is evaluated here
    data.require_readable(dataset, split, dataset.readable, calibrate=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    fp32 = out.with_name(out.stem + ".fp32.onnx")
    phases = Phases()
    with phases("export"):
        if spec.onnx_path is not None:
            shutil.copyfile(spec.onnx_path, fp32)
        else:
            from ptq import pipeline

            pipeline.export_model(model, weights, fp32)
    with phases("load_data"):
        tensors = data.load_tensors(dataset, spec.transform, progress=False, indices=split.calib)
    calib_idx, _ = data.usable(dataset, split, tensors, calibrate=True)

    def batches(size: int) -> Any:
        size = quantize.even_batch(len(calib_idx), size)
        return (tensors.batch(calib_idx[s : s + size]) for s in range(0, len(calib_idx), size))

    ranges = out.with_name(out.stem + ".ranges.json")
    made = None
    if toolkit_options is not None:
        with tempfile.TemporaryDirectory(prefix="ptq-quantize-") as work:
            made = toolkit.quantize(name, toolkit_options, fp32, batches(1), Path(work), phases, target=target)
            shutil.move(str(made.path), out)
        if backend == "tensorrt":
            qdq_rules.require(out)
        numerics = toolkit.describe(made.record)
    elif backend == "tensorrt":
        numerics = for_tensorrt.quantize(fp32, out, batches(8), calib_method, (), phases, ranges)
    else:
        opts = quantize.QuantOptions(calib_method=calib_method)
        numerics = f"{quantize.describe(opts)}; {quantize.to_int8(fp32, out, batches(opts.calib_batch), opts, phases, ranges)}"
    how: Dict[str, Any] = {"technique": made.record} if made else {"calib_method": calib_method}
    record: Dict[str, Any] = {
        "quantizer": name if made else "ort-for-tensorrt" if backend == "tensorrt" else "ort",
        "backend": backend,
        "numerics": numerics,
        "fp32": fp32.name,
        "fp32_sha256": _sha256(fp32),
        **how,
        "calib_size": calib_size,
        "split_seed": split_seed,
        "calib_images": [dataset.files[i].name for i in calib_idx],
        "data_hash": dataset.content_hash,
        "seconds": dict(phases.seconds),
        "qdq_rules": "TensorRT's Q/DQ rules: pass" if backend == "tensorrt" else "not checked (made for ONNX Runtime)",
        "versions": {"python": platform.python_version(), "onnx": onnx.__version__, **_ort_version()},
    }
    reference = {k: record[k] for k in ("fp32", "fp32_sha256", "numerics", "calib_size", "split_seed", "calib_images", "quantizer")}
    export.stamp(out, {"model": spec.name, **spec.transform.as_dict()}, {QDQ_KEY: json.dumps(reference)})
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    return out


def _ort_version() -> Dict[str, str]:
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__}


def read(path: Path) -> Optional[QdqModel]:
    """The QDQ model at `path` with its FP32 source, or None where `path` is no QDQ model (an FP32 ONNX). A QDQ
    model that `ptq quantize` did not make, or whose FP32 file is missing or changed, is refused in one line."""
    if not qdq_rules.is_qdq(path):
        return None
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    if QDQ_KEY not in meta:
        raise PtqError(f"{path.name} is a QDQ model without an FP32 reference: make it with `ptq quantize`, which writes its FP32 model beside it, or give the FP32 ONNX")
    record = json.loads(meta[QDQ_KEY])
    fp32 = path.with_name(record["fp32"])
    if not fp32.is_file():
        raise PtqError(f"{path.name} is measured against its FP32 model {fp32.name}, which is not beside it: copy both files from where `ptq quantize` wrote them")
    if _sha256(fp32) != record["fp32_sha256"]:
        raise PtqError(f"{fp32.name} is not the FP32 model {path.name} was quantized from (its SHA-256 differs): copy both files again")
    return QdqModel(path, fp32, record)


def resolve(spec: models.ModelSpec, precision: str) -> Tuple[models.ModelSpec, Optional[QdqModel]]:
    """For a QDQ model: the spec of its FP32 source (what the run exports and measures as FP32) and the QDQ model;
    for any other model: the spec as it is and None."""
    qdq = read(spec.onnx_path) if spec.onnx_path is not None else None
    if qdq is None:
        return spec, None
    if precision != "int8":
        raise PtqError(f"{qdq.path.name} is an INT8 (QDQ) model: run it with precision=int8, or give {qdq.fp32.name} for fp32/fp16")
    return replace(spec, onnx_path=qdq.fp32), qdq
