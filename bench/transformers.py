"""Transformers on this CPU: `ptq sweep` over torchvision ViT-B/16 and Swin-T (random weights: size, compression,
memory and latency, not accuracy) at fp32, fp16, static INT8 and dynamic INT8 on ONNX Runtime, batch 1, with the
per-op profile; prints one row per run and the op families that take the most kernel time.

    python bench/transformers.py [--models vit_b_16,swin_t]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import DATA, WORK  # noqa: E402

PHASES = ("export", "preprocess", "calibrate", "quantize", "convert")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit_b_16,swin_t")
    args = parser.parse_args()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{WORK / 'mlflow.db'}", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-m", "ptq.cli", "sweep", "--name", "transformers", "--models", args.models, "--precisions", "fp32,fp16,int8",
               "--quantizers", "ort,ort+quant_mode=dynamic", "--weights", "random", "--data", str(DATA), "--calib-size", "16",
               "--min-queries", "100", "--min-duration-s", "3", "--blocks", "4", "--warmup", "5", "--profile", "true", "--progress", "false"]  # fmt: skip
    subprocess.run(command, env=env, cwd=WORK, check=False)
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    client = mlflow.MlflowClient()
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`ptq.combo_key` != ''")
    print("| model | precision | size MB | compress s (by phase) | peak MB | p50 / p99 ms | speed-up [95 % CI] | largest op families (share of kernel time) |")
    print("|---|---|---|---|---|---|---|---|")
    for _, r in runs.sort_values(["params.model", "start_time"]).iterrows():
        mode = r["params.precision"] + (" dynamic" if r.get("params.quant_mode") == "dynamic" else " static" if r["params.precision"] == "int8" else "")
        if r["status"] != "FINISHED":
            print(f"| {r['params.model']} | {mode} | {r['status']}: {str(r.get('tags.ptq.error', ''))[:120]} | | | | | |")
            continue
        phases = ", ".join(f"{p} {r[f'metrics.compress/{p}_s']:.1f}" for p in PHASES if r.get(f"metrics.compress/{p}_s", 0) == r.get(f"metrics.compress/{p}_s", 0) and r.get(f"metrics.compress/{p}_s", 0) >= 0.05)
        speedup = f"{r['metrics.speedup/p50']:.2f} [{r['metrics.speedup/p50_ci95_low']:.2f}-{r['metrics.speedup/p50_ci95_high']:.2f}]" if r["params.precision"] != "fp32" else "—"
        try:  # profile.json: per op family, the measured model's kernel time (`int8_us` beside FP32's), or `us` alone at fp32
            table = json.loads(Path(client.download_artifacts(r["run_id"], "profile.json", str(WORK))).read_text())
            cols = table["columns"]
            us = cols.index("int8_us" if "int8_us" in cols else "us")
            total = sum(float(row[us]) for row in table["data"]) or 1.0
            top = sorted(table["data"], key=lambda row: -float(row[us]))[:4]
            families = ", ".join(f"{row[cols.index('op_type')]} {100 * float(row[us]) / total:.0f} %" for row in top)
        except Exception as exc:  # a run without a profile still has its row
            families = f"(no profile: {type(exc).__name__})"
        print(
            f"| {r['params.model']} | {mode} | {r['metrics.size/model_bytes'] / 1e6:.1f} | {r['metrics.compress/total_s']:.1f} ({phases}) | "
            f"{r['metrics.compress/peak_rss_mb']:.0f} | {r['metrics.latency/p50_ms']:.1f} / {r['metrics.latency/p99_ms']:.1f} | {speedup} | {families} |"
        )


if __name__ == "__main__":
    main()
