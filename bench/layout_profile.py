"""Where each toolkit's Q/DQ layout spends its time: lite0 INT8 by ONNX Runtime, NNCF, Quark (int8 and uint8
activations) and AIMET, each one `ptq run --profile true`; prints the speed-up, kernel time, the Conv family, the
Q/DQ left standing and the float islands (nodes ONNX Runtime still runs in float).

    python bench/layout_profile.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import DATA, WORK  # noqa: E402

SPECS = {
    "ort": [],
    "nncf": ["--quantizer", "nncf"],
    "quark-int8": ["--quantizer", "quark", "--calib-method", "minmax"],
    "quark-uint8": ["--quantizer", "quark", "--calib-method", "minmax", "--activation-type", "uint8"],
    "aimet": ["--quantizer", "aimet"],
}


def main() -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{WORK / 'mlflow.db'}", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    client = mlflow.MlflowClient()
    print("| quantizer | speed-up | kernel µs fp32 → int8 | Conv µs (int8 / fp32) | standing Q/DQ µs | float islands µs |")
    print("|---|---|---|---|---|---|")
    for name, extra in SPECS.items():
        args = ["--model", "lite0", "--data", str(DATA), "--calib-size", "32", "--eval-size", "100", "--min-queries", "300",
                "--min-duration-s", "3", "--blocks", "6", "--profile", "true", "--progress", "false", *extra]  # fmt: skip
        done = subprocess.run([sys.executable, "-m", "ptq.cli", "run", *args], env=env, cwd=WORK, capture_output=True, text=True)
        if done.returncode:
            print(f"| {name} | failed: {done.stderr.strip().splitlines()[-1][:150]} | | | | |")
            continue
        run_id = done.stdout.strip()
        m = client.get_run(run_id).data.metrics
        table = json.loads(Path(client.download_artifacts(run_id, "profile.json", str(WORK))).read_text())
        cols, conv = table["columns"], next(r for r in table["data"] if r[0] == "Conv")
        islands = json.loads(Path(client.download_artifacts(run_id, "profile_int8.json", str(WORK))).read_text())["float_islands"]
        kinds = sorted({i["op_type"] for i in islands})
        print(
            f"| {name} | {m['speedup/p50']:.2f} | {m['profile/fp32_kernel_us']:,.0f} → {m['profile/kernel_us']:,.0f} | "
            f"{float(conv[cols.index('int8_us')]):,.0f} / {float(conv[cols.index('fp32_us')]):,.0f} | {m['profile/qdq_us']:,.0f} | "
            f"{m['profile/float_island_us']:,.0f}{' (' + ', '.join(kinds[:4]) + ')' if kinds else ''} |"
        )


if __name__ == "__main__":
    main()
