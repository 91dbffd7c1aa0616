"""Pull ptq runs into pandas and plot one comparison: INT8 speed-up vs top-1 drop, per model and device.

Usage: python examples/analysis.py [experiment] [out.png]   (uses MLFLOW_TRACKING_URI, default the local store)
"""

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mlflow

experiment = sys.argv[1] if len(sys.argv) > 1 else "ptq"
out = sys.argv[2] if len(sys.argv) > 2 else "speedup_vs_drop.png"

runs = mlflow.search_runs(experiment_names=[experiment], filter_string="attributes.status = 'FINISHED' and params.precision = 'int8'")
if "metrics.speedup/p50" not in runs or runs["metrics.speedup/p50"].isna().all():
    sys.exit(f"no finished INT8 run with a speed-up in experiment {experiment!r} of {mlflow.get_tracking_uri()}: run the README's main command first")
runs = runs.dropna(subset=["metrics.speedup/p50"])
cols = ["tags.device.name", "params.model", "params.weights", "metrics.speedup/p50", "metrics.acc/top1_drop_pt", "metrics.latency/p50_ms"]
table = runs.reindex(columns=cols).rename(columns=lambda c: c.split(".", 1)[1])
print(table.to_string(index=False))

fig, ax = plt.subplots(figsize=(6, 4))
for device, group in table.groupby("device.name"):
    ax.scatter(group["speedup/p50"], group["acc/top1_drop_pt"].fillna(0), label=device)
    for _, row in group.iterrows():
        ax.annotate(row["model"], (row["speedup/p50"], 0 if row["acc/top1_drop_pt"] != row["acc/top1_drop_pt"] else row["acc/top1_drop_pt"]), fontsize=8)
ax.axvline(1, color="grey", lw=0.5)
ax.set(xlabel="INT8 speed-up over FP32 (p50)", ylabel="top-1 drop (points; 0 where not measured)")
ax.legend()
fig.tight_layout()
fig.savefig(out)
print(f"wrote {out}")
