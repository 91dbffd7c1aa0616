"""Does a run's speed-up hold up? Reruns the README's main job and re-times each run's own two logged models
with nothing but ONNX Runtime.

Usage: python bench/speedup_check.py [--repeats 3] [--model lite0] [--precision int8]
Runs `mlflow run . --env-manager local -P model=… -P precision=… -P data=$PTQ_DATA` `repeats` times into a temporary
store, then, for each run, downloads model/model_fp32.onnx and model/model_<precision>.onnx and times them in a bare
loop (plain InferenceSession, the run's thread count, batch 1, 20 warm-up queries each, then 20 rounds of one block
of 100 queries per model, alternating), and prints the run's speed-up with its 95 % interval, the bare one and their
ratio, then the spread of the run's speed-up across reruns.
Goals: the run's speed-up within 3 % across reruns; within 5 % of the bare script's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import onnxruntime as ort

from ptq import tracking

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PTQ_DATA", ROOT.parent / "shared" / "data" / "imagenet-sample-1k"))
WARMUP, ROUNDS, BLOCK = 20, 20, 100


def bare_speedup(fp32: str, model: str, threads: int) -> float:
    """p50(fp32) / p50(model), both timed in alternating blocks with a plain InferenceSession."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sessions = {name: ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"]) for name, path in (("model", model), ("fp32", fp32))}
    shape = [1, *sessions["fp32"].get_inputs()[0].shape[1:]]  # the batch axis is dynamic, the image side is not
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    feeds = {name: {s.get_inputs()[0].name: x} for name, s in sessions.items()}
    for name, s in sessions.items():
        for _ in range(WARMUP):
            s.run(None, feeds[name])
    ms: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(ROUNDS):
        for name, s in sessions.items():
            for _ in range(BLOCK):
                t0 = time.perf_counter()
                s.run(None, feeds[name])
                ms[name].append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ms["fp32"]) / statistics.median(ms["model"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="lite0")
    parser.add_argument("--precision", default="int8")
    args = parser.parse_args()
    store = Path(tempfile.mkdtemp(prefix="ptq-speedup-check-"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    command = [sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local", "--experiment-name", "ptq",
               "-P", f"model={args.model}", "-P", f"precision={args.precision}", "-P", f"data={DATA}"]
    print("mlflow " + " ".join(command[3:]), flush=True)
    print(f"{'run':<34} {'run speed-up [95 % CI]':>26} {'block spread %':>15} {'bare speed-up':>14} {'run / bare':>11}", flush=True)
    speedups = []
    for _ in range(args.repeats):
        out = subprocess.run(command, env=env, cwd=store, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            sys.exit(out.stderr[-2000:])
        run = mlflow.search_runs(experiment_names=["ptq"], order_by=["attributes.start_time DESC"], max_results=1).iloc[0]
        models = tracking.download_models(run.run_id, store / run.run_id)
        bare = bare_speedup(str(models["fp32-onnx"] / "model.onnx"), str(models[f"{args.precision}-onnx"] / "model.onnx"), int(run["params.threads_used"]))
        s, low, high = (run[f"metrics.speedup/p50{k}"] for k in ("", "_ci95_low", "_ci95_high"))
        speedups.append(s)
        print(f"{run.run_id:<34} {s:>9.3f} [{low:.3f}, {high:.3f}] {run['metrics.latency/block_p50_spread_pct']:>15.2f} {bare:>14.3f} {s / bare:>11.3f}", flush=True)
    median = statistics.median(speedups)
    print(f"spread of the run's speed-up over {len(speedups)} reruns: {min(speedups):.3f}-{max(speedups):.3f}, "
          f"(max - min) / median = {100 * (max(speedups) - min(speedups)) / median:.2f} % (goal within 3 %)")


if __name__ == "__main__":
    main()
