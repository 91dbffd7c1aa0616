"""What timing latency in a lean worker process costs (latency_process=worker against inprocess), side by side in
one run: lite0 INT8 (pretrained) and d201 INT8 (weights=random), each against its FP32 reference, ONNX Runtime CPU.

Usage: python bench/worker_overhead.py [--threads 0] [--rounds 7] [--queries 300] [--blocks 6] [--calib 100] [--models lite0,d201]
Each round times both settings with ptq's own loop (bench.time_blocks: 20 warm-up queries per model, then alternating
blocks of the compressed model and FP32), in-process first in odd rounds and the workers first in even ones; the
p50s are the medians over rounds. It prints, per model and precision, the p50 of each setting and their ratio
worker/inprocess (goal <= 1.02: then latency_process=worker may become the default), and the resident memory during
latency: the parent's (which holds both models as a run does, for evaluation) and each worker's.
Run it alone on a quiet machine; `--rounds 1 --queries 20 --calib 8` is a smoke test, not a measurement.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import DATA, batched, exported, int8  # noqa: E402
from ptq import bench, data, worker  # noqa: E402
from ptq.backends import Compressed  # noqa: E402
from ptq.backends.ort import open_session  # noqa: E402

GOAL = 1.02
MODELS = {"lite0": "pretrained", "d201": "random"}


def rss_mb(pid: int | None = None) -> float:
    """A process's resident memory now (this one's by default)."""
    return psutil.Process(pid).memory_info().rss / 1e6


def measure(name: str, weights: str, args: argparse.Namespace) -> bool:
    """Both settings on one model, alternated over rounds; True where both precisions meet the goal."""
    spec, fp32 = exported(name, weights)
    ds = data.scan(DATA)
    split = data.split(len(ds.files), args.calib, 1, 0)
    tensors = data.load_tensors(ds, spec.transform, progress=False, indices=split.calib + split.eval)
    model = int8(fp32, batched(tensors, list(split.calib)))
    batch = tensors.batch(split.eval[:1])
    threads = args.threads or os.cpu_count() or 1
    method = bench.LatencyMethod(warmup=20, min_queries=args.queries, min_duration_s=0.0, blocks=args.blocks, batch_size=1)
    sessions = {"": open_session(str(model), threads), "fp32_": open_session(str(fp32), threads)}
    p50: dict[str, dict[str, list[float]]] = {how: {"": [], "fp32_": []} for how in ("inprocess", "worker")}
    rss: dict[str, list[float]] = {"parent, inprocess": [], "parent, worker": [], "int8 worker": [], "fp32 worker": []}
    with worker.workers("ort", {"": Compressed(model), "fp32_": Compressed(fp32)}, {"": "int8", "fp32_": "fp32"}, threads, batch) as timers:
        modules = set(timers[""].modules)  # type: ignore[attr-defined]
        for r in range(args.rounds):
            order = ("inprocess", "worker") if r % 2 == 0 else ("worker", "inprocess")
            for how in order:
                lat = bench.time_blocks(sessions if how == "inprocess" else timers, batch, method)
                for key, value in lat.items():
                    p50[how][key].append(value.percentiles()[0])
                rss[f"parent, {how}"].append(rss_mb())
                if how == "worker":
                    rss["int8 worker"].append(rss_mb(timers[""].pid))
                    rss["fp32 worker"].append(rss_mb(timers["fp32_"].pid))
    ok = True
    for key, label in (("", "int8"), ("fp32_", "fp32")):
        inproc, work = statistics.median(p50["inprocess"][key]), statistics.median(p50["worker"][key])
        ratio = work / inproc
        ok &= ratio <= GOAL
        print(f"{name} {label} p50 (batch 1, {threads} threads): inprocess {inproc:.3f} ms, worker {work:.3f} ms, ratio worker/inprocess {ratio:.4f} (goal <= {GOAL})", flush=True)
    print(f"{name} RSS during latency (MB): " + ", ".join(f"{k} {statistics.median(v):.0f}" for k, v in rss.items()), flush=True)
    print(f"{name} the workers hold torch: {'torch' in modules}, mlflow: {'mlflow' in modules}, onnx: {'onnx' in modules}", flush=True)
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="ORT intra-op threads; 0 = every core, as a run's default")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--queries", type=int, default=300, help="timed queries per model per setting per round")
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--calib", type=int, default=100, help="calibration images of the INT8 models")
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    verdicts = [measure(m, MODELS[m], args) for m in args.models.split(",")]
    switch = all(verdicts)
    verdict = "within it on every model: make latency_process=worker the default" if switch else "over it somewhere: keep inprocess"
    print(f"goal: the worker within {100 * (GOAL - 1):.0f} % of in-process; {verdict}")


if __name__ == "__main__":
    main()
