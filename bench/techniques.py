"""Techniques side by side: `ptq sweep --quantizers` over ONNX Runtime, NNCF, Quark and AIMET on the lite models (real
weights), on one runtime (ONNX Runtime CPU), the same 100 calibration and 900 evaluation images; prints one row per
(model, quantizer, techniques, granularity) with top-1, the paired drop and McNemar's p, compression seconds by
phase, peak memory (ptq's process and the toolkit's), and the INT8 p50 speed-up with its interval.

    python bench/techniques.py [--models lite0,lite1,lite2] [--quick]

The toolkits run in the environments `ptq env NAME` makes (or PTQ_<NAME>_PYTHON).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import DATA, WORK  # noqa: E402

# per-tensor for every toolkit (where the techniques matter most), and each toolkit's plain per-channel for reference
SPECS = [
    "ort", "ort+per_channel=false",
    "nncf+per_channel=false", "nncf+per_channel=false+bias_correction=full", "nncf",
    "quark+calib_method=minmax", "quark+calib_method=minmax+bias_correction", "quark+calib_method=minmax+cle",
    "quark+calib_method=minmax+adaround+iterations=50", "quark+calib_method=minmax+per_channel",
    "aimet+per_channel=false", "aimet+per_channel=false+seq_mse", "aimet+per_channel=false+adaround+iterations=50", "aimet",
]  # fmt: skip
QUICK = [
    "ort", "ort+per_channel=false", "nncf+per_channel=false+bias_correction=full",
    "quark+calib_method=minmax+adaround+iterations=50", "quark+calib_method=minmax+activation_type=uint8+adaround+iterations=50", "aimet+per_channel=false",
]  # fmt: skip
PHASES = ("toolkit_start", "preprocess", "cle", "calibrate", "bias_correction", "adaround", "seq_mse", "quantize", "write")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lite0")
    parser.add_argument("--quick", action="store_true", help="six specs instead of fourteen")
    parser.add_argument("--specs", default="", help="comma-separated quantizer specs instead (see ptq sweep --quantizers)")
    args = parser.parse_args()
    specs = args.specs.split(",") if args.specs else QUICK if args.quick else SPECS
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{WORK / 'mlflow.db'}", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-m", "ptq.cli", "sweep", "--name", "techniques", "--models", args.models, "--precisions", "int8",
               "--quantizers", ",".join(specs), "--data", str(DATA), "--calib-size", "100", "--min-queries", "300", "--min-duration-s", "3",
               "--blocks", "6", "--progress", "false"]  # fmt: skip
    subprocess.run(command, env=env, cwd=WORK, check=False)
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="params.precision = 'int8'")
    print("| model | quantizer | techniques | weights | top-1 % | drop (pt) | McNemar p | compress s (by phase) | peak MB ptq / toolkit | p50 speed-up [95 % CI] |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for _, r in runs.sort_values(["params.model", "start_time"]).iterrows():
        if r.get("status") != "FINISHED":
            print(f"| {r['params.model']} | {r['params.quantizer']} | FAILED | | | | | | | |")
            continue
        technique = r.get("tags.numerics.qdq") if isinstance(r.get("tags.numerics.qdq"), str) else r.get("tags.numerics.model")
        granularity = "per-channel" if str(r.get("params.per_channel")) == "true" else "per-tensor"
        phases = ", ".join(f"{p} {r[f'metrics.compress/{p}_s']:.1f}" for p in PHASES if f"metrics.compress/{p}_s" in r and r[f"metrics.compress/{p}_s"] == r[f"metrics.compress/{p}_s"] and r[f"metrics.compress/{p}_s"] >= 0.05)
        toolkit_peak = r.get("metrics.compress/quantizer_worker_peak_rss_mb")
        peak = f"{r['metrics.compress/peak_rss_mb']:.0f} / " + (f"{toolkit_peak:.0f}" if toolkit_peak == toolkit_peak and toolkit_peak is not None else "—")
        print(
            f"| {r['params.model']} | {r['params.quantizer']} | {technique} | {granularity} | {100 * r['metrics.acc/top1']:.2f} | "
            f"{r['metrics.acc/top1_drop_pt']:.2f} | {r['metrics.acc/top1_drop_p']:.2g} | {r['metrics.compress/total_s']:.1f} ({phases}) | {peak} | "
            f"{r['metrics.speedup/p50']:.2f} [{r['metrics.speedup/p50_ci95_low']:.2f}-{r['metrics.speedup/p50_ci95_high']:.2f}] |"
        )
    fp32 = runs["metrics.acc/fp32_top1"].dropna()
    print(f"\nFP32 top-1 on the same images: {', '.join(f'{m} {100 * v:.2f} %' for m, v in runs.groupby('params.model')['metrics.acc/fp32_top1'].first().items())}"
          if len(fp32) else "")


if __name__ == "__main__":
    main()
