"""The study's report from tracked runs: tables, plots, paired statistics, a Markdown summary and a tidy CSV."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from scipy import stats

from ptq import tracking
from ptq.errors import PtqError

log = logging.getLogger(__name__)

KEYS = ["device", "model", "weights", "precision", "backend"]
# tidy column -> MLflow column; a run without one of these (older, failed) just has a gap there
COLUMNS = {
    "device": "tags.device.host",
    "gpu": "tags.device.gpu",
    "model": "params.model",
    "weights": "params.weights",
    "precision": "params.precision",
    "backend": "params.backend",
    "calib_method": "params.calib_method",
    "size_mb": "metrics.size/model_bytes",
    "size_ratio": "metrics.size/ratio",
    "export_s": "metrics.compress/export_s",
    "calibrate_s": "metrics.compress/calibrate_s",
    "quantize_s": "metrics.compress/quantize_s",
    "convert_s": "metrics.compress/convert_s",
    "build_s": "metrics.compress/build_s",
    "compress_s": "metrics.compress/total_s",
    "calib_cpu_pct": "metrics.phase/calibrate/cpu_pct_mean",
    "calib_rss_mb_peak": "metrics.phase/calibrate/rss_mb_peak",
    "latency_cpu_pct": "metrics.phase/latency/cpu_pct_mean",
    "latency_rss_mb_peak": "metrics.phase/latency/rss_mb_peak",
    "latency_gpu_util_pct": "metrics.phase/latency/gpu_util_pct_mean",
    "p50_ms": "metrics.latency/p50_ms",
    "p99_ms": "metrics.latency/p99_ms",
    "img_s": "metrics.throughput/img_s",
    "speedup": "metrics.speedup/p50",
    "top1": "metrics.acc/top1",
    "fp32_top1": "metrics.acc/fp32_top1",
    "drop_pt": "metrics.acc/top1_drop_pt",
    "energy_per_img_j": "metrics.phase/latency/energy_per_img_j",
}


def load_runs(experiments: list[str], device: str = "", model: str = "", precision: str = "") -> pd.DataFrame:
    """Finished runs of the experiments (sweep parents excluded), newest first, filtered by device/model/precision."""
    tracking.check_reachable()
    clauses = ["attributes.status = 'FINISHED'"]
    for column, value in (("tags.`device.host`", device), ("params.model", model), ("params.precision", precision)):
        if value:
            clauses.append(f"{column} = '{value}'")
    missing = [e for e in experiments if mlflow.get_experiment_by_name(e) is None]
    if missing:
        raise PtqError(f"no experiment named {', '.join(missing)}: check --experiments (runs go to 'ptq' by default)")
    runs = mlflow.search_runs(experiment_names=experiments, filter_string=" and ".join(clauses), order_by=["attributes.start_time DESC"])
    if isinstance(runs, list):  # search_runs returns a DataFrame unless asked otherwise
        runs = pd.DataFrame()
    runs = runs[runs.get("params.model", pd.Series(dtype=object)).notna()] if len(runs) else runs
    if runs.empty:
        what = ", ".join(f"{k}={v}" for k, v in (("device", device), ("model", model), ("precision", precision)) if v) or "no filter"
        raise PtqError(f"no finished runs in {', '.join(experiments)} match ({what}): run `ptq run` or `ptq sweep` first, or loosen the filter")
    return runs


def tidy(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per device x model x weights x precision x backend (the newest run), study columns, gaps as NaN."""
    out = pd.DataFrame({name: runs[col] if col in runs else np.nan for name, col in COLUMNS.items()})
    out["run_id"] = runs["run_id"].values
    out["size_mb"] = out["size_mb"] / 1e6
    out["drop_pt"] = out["drop_pt"].where(out["weights"] == "pretrained")  # never report accuracy of random weights
    return out.drop_duplicates(KEYS).sort_values(KEYS).reset_index(drop=True)


def mcnemar(predictions: pd.DataFrame) -> float:
    """Exact McNemar p-value for FP32 vs compressed top-1 on the same images (binomial test on discordant pairs)."""
    b = int(((predictions["fp32_correct"] == 1) & (predictions["correct"] == 0)).sum())
    c = int(((predictions["fp32_correct"] == 0) & (predictions["correct"] == 1)).sum())
    return 1.0 if b + c == 0 else float(stats.binomtest(b, b + c, 0.5).pvalue)


def speedup_ci(fp32_ms: np.ndarray, ms: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95 % bootstrap confidence interval of the p50 speed-up (median FP32 latency / median latency)."""

    def ratio(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.median(a, axis=axis) / np.median(b, axis=axis)

    res = stats.bootstrap((fp32_ms, ms), ratio, n_resamples=2000, method="percentile", random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _artifact_csv(run_id: str, path: str, folder: Path) -> pd.DataFrame | None:
    """A run's CSV artifact, downloaded into `folder` once (statistics and plots both read latency.csv)."""
    local = folder / run_id / path
    try:
        if not local.is_file():  # a file artifact lands in dst_path under its base name
            mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(local.parent))
        return pd.read_csv(local)
    except Exception:  # older runs, random weights, failed uploads: a gap, not a crash
        return None


@dataclass
class Report:
    """The report's files, written into `folder`."""

    folder: Path
    table: pd.DataFrame
    files: list[Path] = field(default_factory=list)


def add_statistics(table: pd.DataFrame, work: Path) -> pd.DataFrame:
    """McNemar p-values beside each accuracy drop and bootstrap CIs beside each speed-up, from run artifacts."""
    table = table.copy()
    table["mcnemar_p"] = np.nan
    table["speedup_ci_low"] = np.nan
    table["speedup_ci_high"] = np.nan
    for i, row in table.iterrows():
        preds = _artifact_csv(row.run_id, "predictions.csv", work) if row.weights == "pretrained" else None
        if preds is not None and row.precision != "fp32":
            table.loc[i, "mcnemar_p"] = mcnemar(preds)
        lat = _artifact_csv(row.run_id, "latency.csv", work)
        if lat is not None and "fp32_ms" in lat:
            table.loc[i, ["speedup_ci_low", "speedup_ci_high"]] = speedup_ci(lat["fp32_ms"].to_numpy(), lat["ms"].to_numpy())
    return table


def _plots(table: pd.DataFrame, work: Path, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = table["model"] + " " + table["precision"] + " @" + table["device"]

    fig, ax = plt.subplots(figsize=(7, 5))
    acc = table.dropna(subset=["drop_pt", "speedup"])
    for precision, group in acc.groupby("precision"):  # horizontal bars: the speed-up's 95 % bootstrap interval
        err = np.abs(group[["speedup_ci_low", "speedup_ci_high"]].to_numpy().T - group["speedup"].to_numpy())
        ax.errorbar(group["speedup"], group["drop_pt"], xerr=np.nan_to_num(err), fmt="o", capsize=3, label=precision)
    for _, r in acc.iterrows():
        ax.annotate(f"{r.model} @{r.device}" if table["device"].nunique() > 1 else r.model, (r.speedup, r.drop_pt), fontsize=7)
    if len(acc):
        ax.legend(fontsize=8)
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(1, color="grey", lw=0.5)
    ax.set(xlabel="speed-up over FP32 (p50)", ylabel="top-1 drop (points)", title="What compression buys vs what it costs")

    fig2, ax2 = plt.subplots(figsize=(7, 5))
    sized = table.dropna(subset=["size_mb", "top1"])
    ax2.scatter(sized["size_mb"], 100 * sized["top1"])
    for _, r in sized.iterrows():
        ax2.annotate(f"{r.model} {r.precision}", (r.size_mb, 100 * r.top1), fontsize=7)
    ax2.set(xlabel="model size (MB)", ylabel="top-1 (%)", title="Size vs accuracy")

    fig3, ax3 = plt.subplots(figsize=(9, 5))
    comp = table.dropna(subset=["compress_s"])
    ax3.barh(label[comp.index], comp["compress_s"])
    ax3.set(xlabel="compression time (s)", title="Compression time per device")

    fig4, ax4 = plt.subplots(figsize=(9, 5))
    dists, names = [], []
    for i, r in table.iterrows():
        lat = _artifact_csv(r.run_id, "latency.csv", work)
        if lat is not None:
            dists.append(lat["ms"].to_numpy())
            names.append(label[i])
    if dists:
        ax4.boxplot(dists, vert=False, tick_labels=names, showfliers=False)
    ax4.set(xlabel="latency per query (ms)", title="Latency distributions")

    fig5, ax5 = plt.subplots(figsize=(9, 5))
    first_model = table["model"].iloc[0]
    for _, r in table[table["model"] == first_model].iterrows():
        tl = _artifact_csv(r.run_id, "monitor/timeline.csv", work)
        if tl is not None and "proc/rss_mb" in tl:
            ax5.plot(tl["t_s"], tl["proc/rss_mb"], label=f"{r.precision} @{r.device}")
    ax5.set(xlabel="seconds since run start", ylabel="process RSS (MB)", title=f"Memory over a run of {first_model}, by device and precision")
    ax5.legend(fontsize=7)

    for f, name in ((fig, "drop_vs_speedup"), (fig2, "size_vs_accuracy"), (fig3, "compression_time"), (fig4, "latency_distributions"), (fig5, "resource_timelines")):
        f.tight_layout()
        f.savefig(folder / f"{name}.png", dpi=110)
        plt.close(f)
    return [folder / f"{n}.png" for n in ("drop_vs_speedup", "size_vs_accuracy", "compression_time", "latency_distributions", "resource_timelines")]


def _fmt(v: object, digits: int = 2) -> str:
    if isinstance(v, float):
        return "—" if np.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def markdown(table: pd.DataFrame) -> str:
    """A summary an analyst can paste into a paper."""
    lines = [
        "# ptq report",
        "",
        f"{len(table)} configurations from {table['device'].nunique()} device(s). Drops are FP32 minus compressed top-1 on the same "
        "images (McNemar's exact test on the paired predictions); speed-ups are p50 FP32 / p50 compressed from the same run "
        "(95 % bootstrap interval). '—' marks a figure the run did not measure (random weights, monitor off, older runs).",
        "",
        "| device | model | precision | backend | size MB (ratio) | compress s | p50 ms | p99 ms | speed-up [95 % CI] | top-1 % | drop pt (p) | calib CPU % / peak MB | inference CPU % / peak MB | J/img |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _, r in table.iterrows():
        ci = f" [{_fmt(r.speedup_ci_low)}, {_fmt(r.speedup_ci_high)}]" if not np.isnan(r.speedup_ci_low) else ""
        p = f" (p={r.mcnemar_p:.2g})" if not np.isnan(r.mcnemar_p) else ""
        lines.append(
            f"| {r.device} | {r.model}{'' if r.weights == 'pretrained' else ' (random)'} | {r.precision} | {r.backend} "
            f"| {_fmt(r.size_mb)} ({_fmt(r.size_ratio, 1)}x) | {_fmt(r.compress_s)} | {_fmt(r.p50_ms)} | {_fmt(r.p99_ms)} "
            f"| {_fmt(r.speedup)}{ci} | {_fmt(100 * r.top1, 1)} | {_fmt(r.drop_pt)}{p} "
            f"| {_fmt(r.calib_cpu_pct, 0)} / {_fmt(r.calib_rss_mb_peak, 0)} | {_fmt(r.latency_cpu_pct, 0)} / {_fmt(r.latency_rss_mb_peak, 0)} "
            f"| {_fmt(r.energy_per_img_j, 3)} |"
        )
    lines += ["", "Plots: drop_vs_speedup.png, size_vs_accuracy.png, compression_time.png, latency_distributions.png, resource_timelines.png."]
    return "\n".join(lines) + "\n"


def build(experiments: list[str], out: Path, device: str = "", model: str = "", precision: str = "", log_run: bool = True) -> Report:
    """Pull runs, compute the study's tables and statistics, write files to `out` and log them as a report run."""
    runs = load_runs(experiments, device, model, precision)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ptq-report-") as tmp:
        table = add_statistics(tidy(runs), Path(tmp))
        files = _plots(table, Path(tmp), out)
    table.to_csv(out / "runs.csv", index=False)
    (out / "report.md").write_text(markdown(table))
    files += [out / "runs.csv", out / "report.md"]
    if log_run:
        if not tracking.under_mlflow_run():  # `mlflow run -e report` logs into its own project run
            tracking.set_experiment("ptq-reports")
        with mlflow.start_run(run_name="report") as active:
            params = {"experiments": ",".join(experiments), "device": device, "model": model, "precision": precision, "runs": str(len(table))}
            mlflow.log_params(tracking.new_params(active.info.run_id, params))
            for f in files:
                mlflow.log_artifact(str(f))
    return Report(out, table, files)
