"""The study's report from tracked runs: tables, plots, paired statistics, a Markdown summary and a tidy CSV."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ptq import bench, quantizers, tracking
from ptq.backends import PRECISIONS
from ptq.compat import removeprefix
from ptq.errors import PtqError
from ptq.monitor import PROCESS_RSS

log = logging.getLogger(__name__)

KEYS = ["device", "model", "weights", "precision", "backend"]
# tidy column -> MLflow column, or (phase, figure) from the run's per-phase table phases.json (written where the
# monitor ran: CPU in % of the whole machine, memory in MB of 10^6 bytes); a run without one of these (older,
# failed, monitor off) just has a gap there
COLUMNS: dict[str, str | tuple[str, str]] = {
    "device": "tags.device.name",
    "host": "tags.device.host",
    "machine_id": "tags.device.machine_id",
    "cpu": "tags.device.cpu",
    "cpu_isa": "tags.device.cpu_isa",
    "gpu": "tags.device.gpu",
    "model": "params.model",
    "weights": "params.weights",
    "precision": "params.precision",
    "backend": "params.backend",
    "numerics": "tags.numerics.model",
    "technique": "tags.numerics.qdq",  # a toolkit quantizer's (or ptq quantize's): toolkit, version, techniques
    "size_mb": "metrics.size/model_bytes",
    "size_ratio": "metrics.size/ratio",
    "export_s": "metrics.compress/export_s",
    "calibrate_s": "metrics.compress/calibrate_s",
    "quantize_s": "metrics.compress/quantize_s",
    "convert_s": "metrics.compress/convert_s",
    "build_s": "metrics.compress/build_s",
    "compress_s": "metrics.compress/total_s",
    "calib_cpu_pct": ("calibrate", "cpu_pct_mean"),
    "calib_rss_mb_peak": ("calibrate", "peak_rss_mb"),
    "latency_cpu_pct": ("latency", "cpu_pct_mean"),
    "latency_rss_mb_peak": ("latency", "peak_rss_mb"),
    "latency_gpu_util_pct": ("latency", "gpu_util_pct_mean"),
    "p50_ms": "metrics.latency/p50_ms",
    "p99_ms": "metrics.latency/p99_ms",
    "latency_stability": "tags.ptq.latency_stability",
    "block_spread_pct": "metrics.latency/block_p50_spread_pct",
    "fp32_block_spread_pct": "metrics.latency/fp32_block_p50_spread_pct",
    "img_s": "metrics.throughput/img_s",
    "speedup": "metrics.speedup/p50",
    "speedup_ci_low": "metrics.speedup/p50_ci95_low",
    "speedup_ci_high": "metrics.speedup/p50_ci95_high",
    "top1": "metrics.acc/top1",
    "fp32_top1": "metrics.acc/fp32_top1",
    "drop_pt": "metrics.acc/top1_drop_pt",
    "top1_agreement": "metrics.fidelity/top1_agreement",  # label-free, against FP32 on the same images
    "kl_to_fp32": "metrics.fidelity/kl_mean",
    "energy_per_img_j": "metrics.latency/energy_per_img_j",
}
# Params that are not the configuration measured, so they never split rows: where the data lives (`data_hash` is
# its identity, `data_images` follows from it), where the run is filed, cached or drawn (experiment, timing_cache,
# progress), what else is recorded (monitor), and how precisely latency is timed (warmup, min_queries,
# min_duration_s, blocks, the older iters): those change the width of the speed-up's interval, which each row
# reports, not what it estimates, so a re-measurement replaces the row. `threads` yields to `threads_used`,
# the count it meant on that device (0 = every core).
NOT_CONFIGURATION = {
    "data", "data_images", "experiment", "timing_cache", "progress", "monitor", "monitor_interval",
    "warmup", "min_queries", "min_duration_s", "blocks", "iters", "threads",
    "data_used_hash",  # follows from data_hash, calib_size, eval_size and split_seed, which are keys
}  # fmt: skip
CALIBRATION = "calib_method"
_INT8 = {"precision": {"int8"}}
# Params that shape only some runs, blanked elsewhere so that they neither split nor label rows they do not affect
# (a fp32 run logs a calib_method too). calib_size and split_seed stay keys everywhere: they also decide which
# images evaluate (and split_seed the random weights).
ONLY_WHERE: dict[str, dict[str, set[str]]] = {
    CALIBRATION: _INT8,
    "per_channel": _INT8,
    "activation_type": _INT8,
    "weight_type": _INT8,
    "quant_format": _INT8,
    "quant_mode": _INT8,
    "symmetric_activations": _INT8,
    "calib_batch": _INT8,
    "percentile": {**_INT8, CALIBRATION: {"percentile"}},
    "calib_bins": {**_INT8, CALIBRATION: {"entropy", "percentile"}},
    "int8_mode": {**_INT8, "backend": {"tensorrt"}},
    "workspace_mb": {"backend": {"tensorrt"}},
    "dla_core": {"backend": {"tensorrt"}},
    "eval_size": {"weights": {"pretrained"}},  # random weights evaluate nothing
    "quantizer": _INT8,
}
for _name in quantizers.QUANTIZERS:  # a toolkit's options shape its own runs only (ort's are its backend's, above)
    for _option in quantizers.option_names(_name):
        if _option not in ONLY_WHERE:
            ONLY_WHERE[_option] = {**_INT8, "quantizer": {q for q in quantizers.QUANTIZERS if _option in quantizers.option_names(q)}}


def load_runs(experiments: list[str], device: str = "", model: str = "", precision: str = "") -> pd.DataFrame:
    """Finished study runs (not sweep parents, reports, tune or sensitivity runs) of the experiments named, or of every
    experiment where none is, newest first, filtered by model, precision and device (its name or host name); column
    `experiment` names the experiment of each."""
    tracking.check_reachable()
    clauses = ["attributes.status = 'FINISHED'"]
    for column, value in (("params.model", model), ("params.precision", precision)):
        if value:
            clauses.append(f"{column} = '{value}'")
    runs = tracking.search_study_runs(experiments, " and ".join(clauses))
    if len(runs):
        # study runs only: a report's own run (under `mlflow run -e report` it logs model/precision filters as
        # params, maybe empty) and a sweep's parent have no precision ptq measured
        frame: pd.DataFrame = runs

        def values(name: str) -> pd.Series:
            return frame[name] if name in frame else pd.Series(None, index=frame.index, dtype=object)

        keep = values("params.precision").isin(PRECISIONS) & values("tags.ptq.kind").isna()  # not a report, sensitivity or tune run
        if device:  # MLflow's filter has no OR: the name reports use, or the host name of older runs and scripts
            keep &= (values("tags.device.name") == device) | (values("tags.device.host") == device)
        runs = runs[keep]
    if runs.empty:
        what = ", ".join(f"{k}={v}" for k, v in (("device", device), ("model", model), ("precision", precision)) if v) or "no filter"
        where = ", ".join(experiments) if experiments else "any experiment"
        raise PtqError(f"no finished runs in {where} match ({what}): run `ptq run` or `ptq sweep` first, or loosen the filter")
    return runs


def experiments_read(runs: pd.DataFrame) -> str:
    """Which experiments the runs came from, most runs first: `ptq (3 runs), Default (1 run)`."""
    counts = sorted(runs["experiment"].value_counts().items(), key=lambda c: (-c[1], c[0]))
    return ", ".join(f"{name} ({n} run{'s' if n > 1 else ''})" for name, n in counts)


def configuration(runs: pd.DataFrame) -> pd.DataFrame:
    """Each run's configuration params beyond the fixed keys: ptq's reading where `mlflow run` logged the user's
    spelling beside it (`resolved.*`), blanked where they mean nothing for that run."""
    names = [removeprefix(c, "params.") for c in runs.columns if c.startswith("params.") and not c.startswith("params.resolved.")]
    names = [n for n in names if n not in NOT_CONFIGURATION and n not in KEYS]
    frame = pd.DataFrame(index=runs.index)
    for name in names:
        frame[name] = runs[f"params.{name}"]
        if f"params.resolved.{name}" in runs:
            frame[name] = runs[f"params.resolved.{name}"].fillna(frame[name])
    if "quantizer" in frame:  # runs logged before quantizers were a choice were quantized by their backend's own
        frame["quantizer"] = frame["quantizer"].fillna(quantizers.BUILT_IN)
    for name, where in ONLY_WHERE.items():
        if name in frame:
            applies = pd.Series(True, index=runs.index)
            for param, values in where.items():
                value = frame[param] if param in frame else runs.get(f"params.{param}", pd.Series(np.nan, index=runs.index))
                applies &= value.isin(values)
            frame[name] = frame[name].where(applies)
    return frame


def _natural(column: pd.Series) -> pd.Series:
    """Sort numbers as numbers (batch 2 before 16) where a column holds nothing else."""
    numbers = pd.to_numeric(column, errors="coerce")
    return numbers if numbers.notna().sum() == column.notna().sum() else column


def tidy(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per distinct configuration (the newest run): device x model x weights x precision x backend, the
    calibration method and every other configuration param whose value varies among `runs`; study columns, gaps as NaN
    (the columns from phases.json too, until `add_phase_figures` fills them)."""
    out = pd.DataFrame({name: runs[col] if isinstance(col, str) and col in runs else np.nan for name, col in COLUMNS.items()}, index=runs.index)
    if "tags.device.host" in runs:  # runs from before device.name: their host name named the device
        out["device"] = out["device"].fillna(runs["tags.device.host"])
    config = configuration(runs)
    if CALIBRATION not in config:  # always a column, the study's first question about an int8 row; older runs lack it
        config[CALIBRATION] = np.nan
    varying = [CALIBRATION] + sorted(c for c in config if c != CALIBRATION and config[c].nunique() > 1)
    at = out.columns.get_loc("backend") + 1
    for i, name in enumerate(varying):
        out.insert(at + i, name, config[name])
    out["run_id"] = runs["run_id"].values
    out["size_mb"] = out["size_mb"] / 1e6
    out["drop_pt"] = out["drop_pt"].where(out["weights"] == "pretrained")  # never report accuracy of random weights
    keys = KEYS + varying
    return out.drop_duplicates(keys).sort_values(keys, key=_natural).reset_index(drop=True)


def config_columns(table: pd.DataFrame) -> list[str]:
    """The tidy table's configuration columns beyond the fixed keys, calibration first."""
    return [c for c in table.columns if c not in COLUMNS and c not in ("run_id", "mcnemar_p")]


def mcnemar(predictions: pd.DataFrame) -> float:
    """Exact McNemar p-value for FP32 vs compressed top-1 on the same images (binomial test on discordant pairs)."""
    return bench.mcnemar_p(predictions["correct"].to_numpy() == 1, predictions["fp32_correct"].to_numpy() == 1)


def _artifact_table(run_id: str, path: str, folder: Path) -> pd.DataFrame | None:
    """A run's CSV artifact or `Recorder.table` JSON, downloaded into `folder` once (statistics and plots both read latency.csv)."""
    local = folder / run_id / path
    try:
        if not local.is_file():  # a file artifact lands in dst_path under its base name
            tracking.download_artifact(run_id, path, local.parent)
        return pd.read_json(local, orient="split") if local.suffix == ".json" else pd.read_csv(local)
    except Exception:  # older runs, random weights, monitor off, failed uploads: a gap, not a crash
        return None


@dataclass
class Report:
    """The report's files, written into `folder`."""

    folder: Path
    table: pd.DataFrame
    files: list[Path] = field(default_factory=list)
    experiments: str = ""  # which experiments the runs came from (experiments_read)


def add_phase_figures(table: pd.DataFrame, work: Path) -> pd.DataFrame:
    """The columns that COLUMNS takes from a phase of the run's per-phase table phases.json, where the run has it."""
    table = table.copy()
    wanted = {name: col for name, col in COLUMNS.items() if isinstance(col, tuple)}
    for i, row in table.iterrows():
        phases = _artifact_table(row.run_id, "phases.json", work)
        if phases is None or "phase" not in phases:
            continue
        phases = phases.set_index("phase")
        for name, (phase, figure) in wanted.items():
            if phase in phases.index and figure in phases.columns:
                table.loc[i, name] = phases.at[phase, figure]
    return table


def add_statistics(table: pd.DataFrame, work: Path) -> pd.DataFrame:
    """McNemar p-values beside each accuracy drop, from the run's per-image predictions (the speed-up's interval
    is the run's own, bootstrapped over its alternating blocks)."""
    table = table.copy()
    table["mcnemar_p"] = np.nan
    for i, row in table.iterrows():
        preds = _artifact_table(row.run_id, "predictions.csv", work) if row.weights == "pretrained" and row.precision != "fp32" else None
        if preds is not None:
            table.loc[i, "mcnemar_p"] = mcnemar(preds)
    return table


def labels(table: pd.DataFrame, device: bool = True) -> pd.Series:
    """Row names for plots: model, precision, the configuration values that set the row apart, and the device."""
    config = table[config_columns(table)].astype(object).where(table[config_columns(table)].notna(), None)
    extra = config.apply(lambda r: " ".join(f"{v}" if k == CALIBRATION else f"{k}={v}" for k, v in r.items() if v is not None), axis=1)
    text = table["model"] + " " + table["precision"] + (" " + extra).where(extra != "", "")
    return text + (" @" + table["device"].fillna("—") if device else "")


def _plots(table: pd.DataFrame, work: Path, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = labels(table)
    short = labels(table, device=table["device"].nunique() > 1)

    fig, ax = plt.subplots(figsize=(7, 5))
    acc = table.dropna(subset=["drop_pt", "speedup"])
    for precision, group in acc.groupby("precision"):  # horizontal bars: the speed-up's 95 % bootstrap interval
        err = np.abs(group[["speedup_ci_low", "speedup_ci_high"]].to_numpy().T - group["speedup"].to_numpy())
        ax.errorbar(group["speedup"], group["drop_pt"], xerr=np.nan_to_num(err), fmt="o", capsize=3, label=precision)
    for i, r in acc.iterrows():
        ax.annotate(short[i], (r.speedup, r.drop_pt), fontsize=7)
    if len(acc):
        ax.legend(fontsize=8)
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(1, color="grey", lw=0.5)
    ax.set(xlabel="speed-up over FP32 (p50)", ylabel="top-1 drop (points)", title="What compression buys vs what it costs")

    fig2, ax2 = plt.subplots(figsize=(7, 5))
    sized = table.dropna(subset=["size_mb", "top1"])
    ax2.scatter(sized["size_mb"], 100 * sized["top1"])
    for i, r in sized.iterrows():
        ax2.annotate(short[i], (r.size_mb, 100 * r.top1), fontsize=7)
    ax2.set(xlabel="model size (MB)", ylabel="top-1 (%)", title="Size vs accuracy")

    fig3, ax3 = plt.subplots(figsize=(9, 5))
    comp = table.dropna(subset=["compress_s"])
    ax3.barh(label[comp.index], comp["compress_s"])
    ax3.set(xlabel="compression time (s)", title="Compression time per device")

    fig4, ax4 = plt.subplots(figsize=(9, 5))
    dists, names = [], []
    for i, r in table.iterrows():
        lat = _artifact_table(r.run_id, "latency.csv", work)
        if lat is not None and "precision" in lat:  # the run's own model, not its FP32 reference
            dists.append(lat.loc[lat["precision"] == r.precision, "ms"].to_numpy())
            names.append(label[i])
    if dists:
        ax4.boxplot(dists, vert=False, tick_labels=names, showfliers=False)
    ax4.set(xlabel="latency per query (ms)", title="Latency distributions")

    fig5, ax5 = plt.subplots(figsize=(9, 5))
    first_model = table["model"].iloc[0]
    for i, r in table[table["model"] == first_model].iterrows():
        tl = _artifact_table(r.run_id, "monitor/timeline.csv", work)
        if tl is not None and PROCESS_RSS in tl:
            ax5.plot(tl["t_s"], tl[PROCESS_RSS], label=label[i])
    ax5.set(xlabel="seconds since run start", ylabel="process RSS (MB)", title=f"Memory over a run of {first_model}, by device and precision")
    if ax5.lines:  # monitor off everywhere: no timelines
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


def markdown(table: pd.DataFrame, experiments: str = "") -> str:
    """A summary an analyst can paste into a paper: one row per configuration, then the devices it ran on;
    `experiments` says where the runs came from."""
    config = config_columns(table)
    names = ["calibration" if c == CALIBRATION else c for c in config]
    lines = [
        "# ptq report",
        "",
        *([f"Runs read from experiments: {experiments}.", ""] if experiments else []),
        f"{len(table)} configurations from {table['device'].nunique()} device(s): one row per device, model, precision, backend "
        "and every run parameter that differs among the runs (the newest run of each). Drops are FP32 minus compressed top-1 "
        "on the same images (McNemar's exact test on the paired predictions); speed-ups are p50 FP32 / p50 compressed, timed "
        "in alternating blocks in the same run (95 % block-bootstrap interval). '—' marks a figure the run did not measure "
        "(random weights, monitor off, older runs) or a parameter that does not apply (calibration for fp32/fp16).",
        "",
        "| device | model | precision | backend | " + "".join(f"{n} | " for n in names) + "size MB (ratio) | compress s | p50 ms | p99 ms "
        "| speed-up [95 % CI] | top-1 % | drop pt (p) | calib CPU % / peak MB | inference CPU % / peak MB | J/img |",
        "|---|---|---|---|" + "---|" * len(config) + "---|---|---|---|---|---|---|---|---|---|",
    ]
    for _, r in table.iterrows():
        ci = f" [{_fmt(r.speedup_ci_low)}, {_fmt(r.speedup_ci_high)}]" if not np.isnan(r.speedup_ci_low) else ""
        p = f" (p={r.mcnemar_p:.2g})" if not np.isnan(r.mcnemar_p) else ""
        values = "".join(f"{'—' if pd.isna(r[c]) else r[c]} | " for c in config)
        lines.append(
            f"| {_fmt(r.device)} | {r.model}{'' if r.weights == 'pretrained' else ' (random)'} | {r.precision} | {r.backend} | {values}"
            f"{_fmt(r.size_mb)} ({_fmt(r.size_ratio, 1)}x) | {_fmt(r.compress_s)} | {_fmt(r.p50_ms)} | {_fmt(r.p99_ms)} "
            f"| {_fmt(r.speedup)}{ci} | {_fmt(100 * r.top1, 1)} | {_fmt(r.drop_pt)}{p} "
            f"| {_fmt(r.calib_cpu_pct, 0)} / {_fmt(r.calib_rss_mb_peak, 0)} | {_fmt(r.latency_cpu_pct, 0)} / {_fmt(r.latency_rss_mb_peak, 0)} "
            f"| {_fmt(r.energy_per_img_j, 3)} |"
        )
    lines += ["", "| device | host | machine id | CPU | CPU ISA (INT8) | GPU |", "|---|---|---|---|---|---|"]
    for _, d in table.dropna(subset=["device"]).drop_duplicates("device").iterrows():
        lines.append(f"| {d.device} | {_fmt(d.host)} | {_fmt(d.machine_id)} | {_fmt(d.cpu)} | {_fmt(d.cpu_isa)} | {_fmt(d.gpu)} |")
    lines += ["", "Plots: drop_vs_speedup.png, size_vs_accuracy.png, compression_time.png, latency_distributions.png, resource_timelines.png."]
    return "\n".join(lines) + "\n"


def profile_section(table: pd.DataFrame, work: Path, top: int = 6) -> str:
    """Where the time goes, for the runs logged with profile=true: kernel µs per query of the largest op families,
    FP32 against the compressed model (from each run's profile.json); empty where no run has a profile."""
    lines = []
    for _, r in table.iterrows():
        prof = _artifact_table(r.run_id, "profile.json", work)
        if prof is None or "int8_us" not in prof:
            continue
        rows = "; ".join(
            f"{o.op_type} {o.fp32_us:.0f} → {o.int8_us:.0f}" + (f" ({o.int8_over_fp32:.2f}×)" if pd.notna(o.int8_over_fp32) else "")
            for o in prof.head(top).itertuples()
        )
        lines.append(f"- {_fmt(r.device)} {r.model} {r.precision} {r.backend}: fp32 {prof.fp32_us.sum():.0f} µs → {prof.int8_us.sum():.0f} µs per query in kernels; {rows}")
    if not lines:
        return ""
    return "\n## Per-op profiles (kernel µs per query, FP32 → compressed)\n\n" + "\n".join(lines) + "\n"


def check_out(out: Path) -> None:
    """The report's folder must be a folder, or one that can be made, that this user can write: one line naming the
    problem, before any work (nothing is left created here)."""
    if out.exists() and not out.is_dir():
        raise PtqError(f"--out {out} is a file: name a folder for the report (it is created if missing)")
    existing = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise PtqError(f"--out {out} is inside {existing}, which is a file: name a folder for the report")
    try:  # what the folder's mode says is not enough: root, read-only mounts, /proc
        os.rmdir(tempfile.mkdtemp(prefix=".ptq-write-check-", dir=existing))
    except OSError as exc:
        raise PtqError(f"--out {out} cannot be written (making a folder in {existing}: {exc.strerror}): name a folder you can write") from None


def build(experiments: list[str], out: Path, device: str = "", model: str = "", precision: str = "", log_run: bool = True) -> Report:
    """Pull runs (of every experiment that holds ptq runs where `experiments` is empty), compute the study's tables
    and statistics, write files to `out` and log them as a report run."""
    check_out(out)
    runs = load_runs(experiments, device, model, precision)
    where = experiments_read(runs)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # what access() could not foresee (a full disk, a race)
        raise PtqError(f"--out {out} cannot be created ({exc.strerror}): name a folder you can write") from None
    with tempfile.TemporaryDirectory(prefix="ptq-report-") as tmp:
        table = add_statistics(add_phase_figures(tidy(runs), Path(tmp)), Path(tmp))
        files = _plots(table, Path(tmp), out)
        profiles = profile_section(table, Path(tmp))
    table.to_csv(out / "runs.csv", index=False)
    (out / "report.md").write_text(markdown(table, where) + profiles)
    files += [out / "runs.csv", out / "report.md"]
    if log_run:
        read = ",".join(experiments) or ",".join(sorted(runs["experiment"].unique()))
        params = {"experiments": read, "device": device, "model": model, "precision": precision, "runs": str(len(table))}
        tracking.log_report(params, files)
    return Report(out, table, files, where)
