"""`ptq doctor --check`: the field check for a first real board, in one file a user can attach to an issue.

It runs doctor, reads every monitor source once, compares the board's files with tegrastats (board power, GPU
load) over a few seconds, sets actmon's raw EMC counter beside tegrastats' EMC percentage (the unit ptq could not
verify, see ptq.jetson.read_emc), and builds an exported FP32 ONNX (lite0: `ptq export --model lite0`) at fp32,
fp16 and int8 through the public backend interface (check, compress, open), recording what each build says
(numerics, tags: calibration, DLA placement), how many calibration images the backend pulled, and what it refused.
Calibration images are seeded noise: the check proves the plumbing, not accuracy. Where something cannot be
checked (no TensorRT, not a Jetson, no model given) the report says so and why, and the check still completes.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from ptq import doctor, jetson
from ptq.backends import CompressJob, get_backend
from ptq.options import user_options
from ptq.monitor import BOARD_POWER, GPU_UTIL, JtopSource, Source
from ptq.phases import Phases

PRECISIONS = ("fp32", "fp16", "int8")
CALIB_IMAGES = 64  # seeded noise images offered to the calibrator; the report says how many it pulled
COMPARED = {"board power (W)": BOARD_POWER, "GPU load (%)": GPU_UTIL}


def _why(exc: BaseException) -> str:
    """An exception as one short line."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def _mean(rows: List[Dict[str, float]], key: str) -> Optional[float]:
    values = [r[key] for r in rows if key in r]
    return sum(values) / len(values) if values else None


def read_sources(root: Path, seconds: float, interval: float = 0.5) -> Dict[str, Any]:
    """Each Jetson source (sysfs, tegrastats, and jtop on the real root) opened and read once; then, where sysfs and
    tegrastats both open, both sampled for `seconds` and their mean board power and GPU load set side by side."""
    candidates: List[Source] = [jetson.JetsonSysfsSource(root), jetson.TegrastatsSource(interval_ms=int(interval * 1000))]
    if root == Path("/"):
        candidates.append(JtopSource())
    report: Dict[str, Any] = {}
    opened: Dict[str, Source] = {}
    try:
        for src in candidates:
            try:
                src.open()
                opened[src.name] = src
                report[src.name] = {"values": src.read(), "tags": src.tags()}
            except Exception as exc:  # a source that cannot open is a finding, not a failure of the check
                report[src.name] = {"error": _why(exc)}
        pair = [opened.get("jetson-sysfs"), opened.get("tegrastats")]
        if None in pair:
            missing = [n for n in ("jetson-sysfs", "tegrastats") if n not in opened]
            report["comparison"] = {"skipped": "needs both sysfs and tegrastats; not open: " + ", ".join(
                f"{n} ({report[n]['error']})" for n in missing)}
            return report
        rows: Dict[str, List[Dict[str, float]]] = {"jetson-sysfs": [], "tegrastats": []}
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for name in rows:
                try:
                    rows[name].append(opened[name].read())
                except Exception as exc:
                    report["comparison"] = {"stopped": f"{name}: {_why(exc)}"}
                    return report
            time.sleep(interval)
        report["comparison"] = {label: {"sysfs": _mean(rows["jetson-sysfs"], key), "tegrastats": _mean(rows["tegrastats"], key)}
                                for label, key in COMPARED.items()}
        report["comparison"]["samples"] = len(rows["tegrastats"])
        report["comparison"]["emc"] = {"raw": jetson.emc_raw(root), "tegrastats_pct": rows["tegrastats"][-1].get(jetson.EMC_UTIL)}
    finally:
        for src in opened.values():
            try:
                src.close()
            except Exception:  # closing is best effort; the report is what matters
                pass
    return report


def _noise(crop: int) -> Any:
    """Calibration batches of seeded noise, counting the images the backend pulls."""
    pulled = {"images": 0}

    def batches(batch_size: int) -> Iterator[np.ndarray]:
        rng = np.random.default_rng(0)
        for start in range(0, CALIB_IMAGES, batch_size):
            n = min(batch_size, CALIB_IMAGES - start)
            pulled["images"] += n
            yield rng.standard_normal((n, 3, crop, crop)).astype(np.float32)

    return batches, pulled


def build_model(model: Optional[Path], workdir: Path, crop: int = 224) -> Dict[str, Any]:
    """The TensorRT backend's check/compress/open at each precision (and fp16 on DLA core 0 where the backend takes
    a dla_core option) on `model`, one entry each: what was built and said, or what was refused and why."""
    try:
        backend = get_backend("tensorrt")
    except Exception as exc:
        return {"skipped": f"the tensorrt backend does not load: {_why(exc)}"}
    attempts: List[Tuple[str, Dict[str, str]]] = [(p, {}) for p in PRECISIONS]
    if "dla_core" in {f.name for f in user_options(backend.Options)}:
        attempts.append(("fp16", {"dla_core": "0"}))
    out: Dict[str, Any] = {}
    for precision, given in attempts:
        label = precision + "".join(f" {k}={v}" for k, v in given.items())
        try:
            backend.check(precision, onnx_only=True)
        except Exception as exc:
            out[label] = {"refused": _why(exc)}
            continue
        if model is None:
            out[label] = {"skipped": "no --model given: export lite0 on a host (`ptq export --model lite0 --out lite0.onnx`) "
                                     "and pass --model lite0.onnx"}
            continue
        batches, pulled = _noise(crop)
        try:
            job = CompressJob(fp32_onnx=model, module=None, precision=precision, calib_batches=batches,
                              options=backend.options(given), phases=Phases(), workdir=workdir / label.replace(" ", "_"),
                              batch_sizes=(1, 8))
            job.workdir.mkdir(parents=True, exist_ok=True)
            built = backend.compress(job)
            logits = backend.open(built, 0).run(np.zeros((1, 3, crop, crop), np.float32))
            out[label] = {"numerics": built.numerics, "tags": built.tags, "metrics": built.metrics,
                          "calibration_images_pulled": pulled["images"], "output_shape": list(logits.shape)}
        except Exception as exc:
            out[label] = {"refused": _why(exc), "calibration_images_pulled": pulled["images"]}
    return out


def run_check(root: Path, model: Optional[Path], out: Path, seconds: float = 5.0) -> Dict[str, Any]:
    """Everything above, written to `out` as JSON; returns the report."""
    checks = doctor.diagnose(root)
    is_jetson = bool(jetson.l4t_release(root)) or jetson.find_gpu(root) is not None
    report: Dict[str, Any] = {
        "ptq_field_check": 1,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "root": str(root),
                    "jetson_model": jetson.jetson_model(root) or "unknown", "l4t": jetson.l4t_release(root) or "unknown"},
        "doctor": [asdict(c) for c in checks],
        "warnings_for_runs": doctor.warnings_for_run(checks),
        "sources": read_sources(root, seconds) if is_jetson else {"skipped": f"not a Jetson: no L4T release and no Jetson GPU under {root}"},
        "power_mode": asdict(jetson.power_mode(root)) if is_jetson else {},
        "build": build_model(model, out.parent / (out.stem + "_engines")),
    }
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    return report


def summary_lines(report: Dict[str, Any]) -> List[str]:
    """What the check could and could not check, one line per part, for the terminal."""
    lines = [f"machine: {report['machine']['jetson_model']}, L4T {report['machine']['l4t']}"]
    sources = report["sources"]
    if "skipped" in sources:
        lines.append(f"sources: not checked ({sources['skipped']})")
    else:
        for name, found in sources.items():
            lines.append(f"{name}: " + (found.get("error") or found.get("skipped") or found.get("stopped")
                                        or json.dumps(found.get("values", found), default=str)[:200]))
    build = report["build"]
    for label, found in (build.items() if "skipped" not in build else [("build", build)]):
        lines.append(f"tensorrt {label}: " + (found.get("refused") or found.get("skipped")
                                               or f"built, {found['numerics']}, calibration images pulled {found['calibration_images_pulled']}"))
    return lines
