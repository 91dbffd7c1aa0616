"""Shared set-up for the benchmark scripts: the sample data, a lite0 FP32/INT8 pair, ratio printing."""

from __future__ import annotations

import atexit
import os
import shutil
import statistics
import warnings
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ptq import bench, data, export, models
from ptq.backends import Session
from ptq.phases import Phases
from ptq.quantizers import ort as quantize

DATA = Path(os.environ.get("PTQ_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample-1k"))
WORK = Path(tempfile.mkdtemp(prefix="ptq-bench-"))
atexit.register(shutil.rmtree, WORK, ignore_errors=True)  # every script (and process) that imports this leaves nothing behind
warnings.filterwarnings("ignore")  # exporter and quantizer deprecation notices would bury the numbers


def tensors_for(spec: models.ModelSpec) -> tuple[data.Dataset, data.Tensors]:
    """The 1000 sample images decoded for this model's transform (cached after the first time)."""
    ds = data.scan(DATA)
    return ds, data.load_tensors(ds, spec.transform, progress=False)


def calib_batches(tensors: data.Tensors, n: int, batch: int = 8) -> list[np.ndarray]:
    """The first `n` images of the seeded split, batched and normalized."""
    idx = list(data.split(len(tensors.ok), n, None, 0).calib)
    return batched(tensors, idx, batch)


def batched(tensors: data.Tensors, idx: list[int], batch: int = 8) -> list[np.ndarray]:
    """Normalized batches of equal size (see quantize.even_batch)."""
    batch = quantize.even_batch(len(idx), batch)
    return [tensors.batch(idx[i : i + batch]) for i in range(0, len(idx), batch)]


def exported(name: str, weights: str = "pretrained") -> tuple[models.ModelSpec, Path]:
    """Export a registry model to FP32 ONNX in the bench work dir."""
    spec = models.resolve(name)
    assert spec.build is not None
    path = WORK / f"{name}-{weights}-fp32.onnx"
    if not path.exists():
        export.to_onnx(spec.build(weights), spec.transform.crop, path)
    return spec, path


def int8(fp32: Path, batches: list[np.ndarray], options: quantize.QuantOptions | None = None, tag: str = "") -> Path:
    """ptq's INT8 compression of `fp32` with the given options."""
    out = fp32.with_name(fp32.stem.replace("fp32", f"int8{tag}") + ".onnx")
    quantize.to_int8(fp32, out, iter(batches), options or quantize.QuantOptions(), Phases(), out.with_suffix(".ranges.json"))
    return out


def p50(session: Session, x: np.ndarray, queries: int) -> float:
    """p50 of `queries` timed queries on one session, with ptq's own timing loop."""
    method = bench.LatencyMethod(warmup=0, min_queries=queries, min_duration_s=0, blocks=2, batch_size=len(x))
    return bench.time_blocks({"": session}, x, method)[""].percentiles()[0]


def alternate(rounds: int, a: Callable[[], float], b: Callable[[], float]) -> tuple[float, float]:
    """Run a and b alternately `rounds` times and return the median of each (noise hits both alike)."""
    xs, ys = [], []
    for _ in range(rounds):
        xs.append(a())
        ys.append(b())
    return statistics.median(xs), statistics.median(ys)


def report(name: str, ptq_value: float, reference: float, unit: str, goal: str) -> None:
    """One line: both measurements, their ratio, and the goal."""
    print(f"{name:<48} ptq {ptq_value:10.3f} {unit:<5} reference {reference:10.3f} {unit:<5} ratio {ptq_value / reference:6.3f}  (goal {goal})", flush=True)
