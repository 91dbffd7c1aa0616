"""The flow of one run: export, compress, build, latency, evaluate against FP32, all logged to MLflow."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from ptq import bench, data, disk, doctor, export, models, prequantize, quantizers, summary, tracking, worker
from ptq.quantizers import ort as quantize
from ptq.quantizers import toolkit
from ptq.backends import Backend, Compressed, CompressJob, Session, get_backend
from ptq.config import RunConfig
from ptq.errors import PtqError
from ptq.monitor import Monitor
from ptq.phases import COMPRESS_PHASES, Phases
from ptq.progress import track

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)


def run(cfg: RunConfig, extra_tags: dict[str, str] | None = None, parent_run_id: str | None = None, run_id: str | None = None) -> str:
    """Execute one run (a child of `parent_run_id` in a sweep, as run `run_id` if the sweep claimed one for it) and return
    its MLflow run id. Bad input fails before the run starts."""
    cfg.validate()
    spec, qdq = prequantize.resolve(models.resolve(cfg.model, cfg.input_size, cfg.mean, cfg.std), cfg.precision)
    backend = get_backend(cfg.backend)
    backend.check(cfg.precision, onnx_only=spec.build is None)
    if cfg.profile and not backend.profiles:
        raise PtqError(f"backend {cfg.backend} has no per-op profiler in ptq yet: use profile=false, or backend=ort")
    options = cfg.backend_options()
    technique = cfg.quantizer_options()
    environment = toolkit.check(cfg.quantizer, backend.qdq_target, technique) if cfg.quantizer != quantizers.BUILT_IN else ""
    if environment and qdq is not None:
        raise PtqError(f"{qdq.path.name} is quantized already: give its FP32 model to quantize it with quantizer {cfg.quantizer}, or drop quantizer")
    if spec.onnx_path is not None:
        export.check_classifier(spec.onnx_path, spec.transform.crop, accuracy=cfg.weights == "pretrained")
        if getattr(options, "keep_float", ()):
            if qdq is not None:
                raise PtqError(f"keep_float does not apply to {qdq.path.name}, which is quantized already: quantize its FP32 model in the run instead")
            quantize.check_keep_float(spec.onnx_path, options.keep_float)
    assert cfg.data is not None
    dataset = data.scan(cfg.data)
    split = data.split(len(dataset.files), cfg.calib_size, cfg.eval_size, cfg.split_seed)
    data.require_readable(dataset, split, dataset.readable, calibrate=cfg.precision == "int8" and qdq is None)
    if qdq is not None:
        qdq.check_split([dataset.files[i].name for i in split.eval])
    module = None
    if spec.build:
        import torch

        torch.manual_seed(cfg.split_seed)  # weights=random is reproducible too
        module = spec.build(cfg.weights)
    tracking.select_store()
    fp32_bytes = spec.onnx_path.stat().st_size if spec.onnx_path is not None else 4 * models.count_params(module)  # type: ignore[arg-type]
    # temp: fp32, pre-processed, augmented, compressed, and a model folder staged while logging it; store: both models
    needs = {Path(tempfile.gettempdir()): (5 * fp32_bytes, "or set TMPDIR to a larger disk")}
    if (store := tracking.local_artifact_dir(cfg.experiment)) is not None:
        needs[store] = (2 * fp32_bytes, "or point MLFLOW_TRACKING_URI at a store on a larger disk")
    if (database := disk.database_folder()) is not None:  # every row of the run goes there, artifacts or not
        needs[database] = (needs.get(database, (0, ""))[0] + disk.DATABASE_BYTES, "or point MLFLOW_TRACKING_URI at a database on a larger disk")
    disk.require_space(needs)

    params = {**cfg.params(), "data_hash": dataset.content_hash, "data_images": str(len(dataset.files))}
    tags = {
        "ptq.model_source": spec.source,
        "ptq.accuracy": "measured" if cfg.weights == "pretrained" else "none (weights=random)",
        "ptq.backend_device": backend.device(),
        **doctor.run_warnings(),
        **{f"version.{k}": v for k, v in backend.versions().items()},
        **({"ptq.quantizer_env": environment} if environment else {}),
        **({"ptq.qdq_model": f"{qdq.path.name}, made by ptq quantize ({qdq.record['quantizer']}) from {qdq.fp32.name}", "numerics.qdq": qdq.numerics()} if qdq else {}),
        **(extra_tags or {}),
    }
    if cfg.eval_size and len(split.eval) < cfg.eval_size:  # the headline says so too (summary.rows)
        tags["ptq.warning.eval_images"] = (
            f"only {len(split.eval)} evaluation images of eval_size={cfg.eval_size}: the data folder has {len(dataset.files)} images, {len(split.calib)} of them calibrate"
        )
        log.warning(tags["ptq.warning.eval_images"])
    name = f"{spec.name}-{cfg.precision}-{cfg.backend}" + ("-random" if cfg.weights == "random" else "")
    phases = Phases()
    # the work folder is named for this process and tagged, so whoever closes the run if this process dies removes it
    with tempfile.TemporaryDirectory(prefix=tracking.temp_prefix()) as tmp, tracking.run(cfg.experiment, name, params, {**tags, tracking.TEMP_TAG: tmp}, parent_run_id, run_id) as rec:
        monitor = Monitor(cfg.monitor_interval, phases) if cfg.monitor else None
        failed = True
        try:
            if monitor:
                monitor.start()
            _execute(cfg, spec, module, backend, options, technique, dataset, split, phases, monitor, rec, Path(tmp), qdq.path if qdq else None)
            failed = False
        finally:
            if monitor:
                monitor.stop()
                try:
                    _log_monitor(rec, monitor, Path(tmp))
                except Exception as exc:  # never let it replace the run's own error
                    if not failed:
                        raise
                    log.warning("the monitor's data could not be logged (%s); the run's own error follows", exc)
        _log_summary(rec, cfg)
        return rec.run_id


def export_model(name: str, weights: str, out: Path) -> Path:
    """Export a torch model (with `weights`) to an ONNX file carrying its preprocessing: what a torch-free device runs."""
    if weights not in models.WEIGHTS:
        raise PtqError(f"unknown weights {weights!r}: use one of {', '.join(models.WEIGHTS)}")
    if out.suffix != ".onnx":
        raise PtqError(f"out={out} must end in .onnx")
    spec = models.resolve(name)
    if spec.build is None:
        raise PtqError(f"{name} is already an ONNX file: copy it to the device as it is")
    out.parent.mkdir(parents=True, exist_ok=True)
    import torch

    torch.manual_seed(0)  # weights=random: the same file every time
    export.to_onnx(spec.build(weights), spec.transform.crop, out)
    export.stamp(out, {"model": spec.name, **spec.transform.as_dict()})
    return out


def _log_monitor(rec: tracking.Recorder, monitor: Monitor, work: Path) -> None:
    """The series (under `system/`, which MLflow's System metrics tab shows), the per-phase figures as the table
    `phases.json`, a few headline figures as metrics (compression's peak memory and CPU; energy per image where
    power is measured), which sources ran, the raw timeline and its plot."""
    rec.series(monitor.points())
    rec.metrics(
        {
            **monitor.headline("compress", COMPRESS_PHASES, ("peak_rss_mb", "peak_rss_delta_mb", "cpu_pct_mean", "quantizer_worker_peak_rss_mb")),
            **monitor.headline("latency", ("latency",), ("energy_per_img_j",)),
            **monitor.headline("evaluate", ("evaluate",), ("energy_per_img_j",)),
        }
    )
    rec.tags(monitor.tags())
    if monitor.samples:
        rec.table(monitor.phase_table(), "phases.json")
        rec.text(monitor.csv_text(), "monitor/timeline.csv")
        if importlib.util.find_spec("matplotlib") is not None:
            rec.artifact(monitor.plot(work / "timeline.png"), "monitor")
        else:  # a device may do without it: the data is all in timeline.csv
            rec.tags({"monitor.plot": "none: matplotlib is not installed (pip install 'ptq[report]')"})


def _execute(
    cfg: RunConfig,
    spec: models.ModelSpec,
    module: Optional[nn.Module],
    backend: Backend,
    options: Any,
    technique: Any,
    dataset: data.Dataset,
    split: data.Split,
    phases: Phases,
    monitor: Monitor | None,
    rec: tracking.Recorder,
    work: Path,
    qdq_onnx: Optional[Path] = None,
) -> None:
    fp32_path = work / "model_fp32.onnx"
    with phases("export"):
        if spec.onnx_path is not None:
            shutil.copyfile(spec.onnx_path, fp32_path)
        else:
            assert module is not None
            export.to_onnx(module, spec.transform.crop, fp32_path)
            export.stamp(fp32_path, {"model": spec.name, **spec.transform.as_dict()})
    rec.metrics({"size/fp32_bytes": fp32_path.stat().st_size})
    if module is not None:
        rec.metrics({"model/params": models.count_params(module)})

    with phases("load_data"):
        tensors = data.load_tensors(dataset, spec.transform, progress=cfg.progress, indices=split.calib + split.eval)
    calib_idx, eval_idx = data.usable(dataset, split, tensors, calibrate=cfg.precision == "int8")
    rec.params({"data_used_hash": tensors.used_hash})  # the split's image content; data_hash names the folder's listing
    rec.tags({"ptq.tensor_cache": "hit" if tensors.from_cache else "miss"})
    skipped = len(split.calib) + len(split.eval) - len(calib_idx) - len(eval_idx)
    rec.metrics({"data/calib_images": len(calib_idx), "data/eval_images": len(eval_idx), "data/skipped_images": skipped})
    rec.text(json.dumps({"calib": [dataset.files[i].name for i in calib_idx], "eval": [dataset.files[i].name for i in eval_idx]}), "split.json")

    def calib_batches(batch_size: int) -> Iterator[np.ndarray]:
        batch_size = quantize.even_batch(len(calib_idx), batch_size)
        starts = range(0, len(calib_idx), batch_size)
        for s in track(starts, total=len(starts), description="calibrate", enabled=cfg.progress):
            yield tensors.batch(calib_idx[s : s + batch_size])

    if cfg.quantizer != quantizers.BUILT_IN:
        qdq_onnx = _toolkit_quantize(cfg.quantizer, technique, fp32_path, calib_batches(1), work, phases, monitor, rec, backend.qdq_target)
    job = CompressJob(fp32_path, module, cfg.precision, calib_batches, options, phases, work, (cfg.batch_size, max(cfg.batch_size, cfg.eval_batch_size)), cfg.threads_used, qdq_onnx)
    compressed = backend.compress(job)
    with phases("build"):
        session = backend.open(compressed, cfg.threads_used)
    _log_compression(rec, phases, fp32_path, compressed)
    sessions = {"": session}
    if cfg.precision != "fp32":  # the reference runs beside the compressed model: same process, same minutes
        with phases("fp32_build"):
            ref_model = backend.compress(replace(job, precision="fp32", phases=Phases(), reference=True))
            sessions["fp32_"] = backend.open(ref_model, cfg.threads_used)
        rec.tags({"numerics.fp32": ref_model.numerics})

    batch = tensors.batch((eval_idx * cfg.batch_size)[: cfg.batch_size])
    timed = {"": compressed, **({"fp32_": ref_model} if cfg.precision != "fp32" else {})}
    with _latency_timers(cfg, sessions, timed, batch, monitor, rec) as timers:
        latency = bench.time_blocks(timers, batch, cfg.latency(), phases)
    for prefix, lat in latency.items():
        if monitor:
            monitor.count_images(f"{prefix}latency", len(lat.ms) * cfg.batch_size)
        rec.metrics(lat.metrics(prefix))
    rec.tags({"ptq.latency_stability": _stability(latency)})
    mine = latency[""]
    rec.metrics({"latency/queries": len(mine.ms), "latency/blocks": len(np.unique(mine.block)), "latency/seconds": mine.seconds})
    if "fp32_" in latency:
        _log_speedup(rec, cfg, latency["fp32_"], mine)
    _log_latency_samples(rec, work, cfg.precision, latency)
    if cfg.profile:
        models_run = {"": compressed, **({"fp32_": ref_model} if cfg.precision != "fp32" else {})}
        with phases("profile"):
            profiles = {prefix: backend.profile(m, batch, cfg.threads_used) for prefix, m in models_run.items()}
        _log_profile(rec, work, cfg.precision, profiles, compressed)

    measured = cfg.weights == "pretrained"  # random weights: no accuracy, but the fidelity to FP32 where eval_size asks for images
    if eval_idx and (measured or cfg.eval_size):
        labels = np.asarray([dataset.labels[i] for i in eval_idx])
        accuracy = {}
        for prefix, sess in sessions.items():
            if monitor:
                monitor.count_images(f"{prefix}evaluate", len(eval_idx))
            with phases(f"{prefix}evaluate"):
                accuracy[prefix] = bench.evaluate(sess, tensors, eval_idx, labels, cfg.eval_batch_size, f"evaluate {prefix or cfg.precision}", cfg.progress)
            if measured:
                rec.metrics({f"acc/{prefix}top1": accuracy[prefix].top1, f"acc/{prefix}top5": accuracy[prefix].top5})  # kept if the next one fails
        acc, reference = accuracy[""], accuracy.get("fp32_", accuracy[""])
        if "fp32_" in accuracy:  # label-free: what quantization changed, on any images
            rec.metrics(bench.fidelity(acc, reference))
        if measured:
            drop = 100 * (reference.top1 - acc.top1)
            rec.metrics({"acc/top1_drop_pt": drop, "acc/top5_drop_pt": 100 * (reference.top5 - acc.top5)})
            if "fp32_" in accuracy:
                rec.metrics({"acc/top1_drop_p": bench.mcnemar_p(acc.top5_pred[:, 0] == labels, reference.top5_pred[:, 0] == labels)})
            else:  # an fp32 run is its own reference
                rec.metrics({"acc/fp32_top1": acc.top1, "acc/fp32_top5": acc.top5})
            _log_predictions(rec, work, dataset, eval_idx, acc, reference)
    del sessions, session


def _toolkit_quantize(
    name: str, technique: Any, fp32_path: Path, batches: Iterator[np.ndarray], work: Path, phases: Phases, monitor: Monitor | None, rec: tracking.Recorder, target: str
) -> Path:
    """The QDQ model of toolkit quantizer `name` laid out for the backend's `target`, made in its own process (its
    phases timed, its process sampled); its record and log are logged, the log on failure too."""
    try:
        made = toolkit.quantize(name, technique, fp32_path, batches, work, phases, monitor.watch if monitor else None, target)
    finally:
        if (work / toolkit.LOG).is_file():
            rec.artifact(work / toolkit.LOG, "quantizer")
    rec.text(json.dumps(made.record, indent=1), "quantizer/record.json")
    rec.tags({"numerics.qdq": toolkit.describe(made.record), **{f"version.{k}": v for k, v in made.record["versions"].items() if k not in ("python", "numpy")}})
    return made.path


@contextmanager
def _latency_timers(
    cfg: RunConfig, sessions: dict[str, Session], models: dict[str, Compressed], batch: np.ndarray, monitor: Monitor | None, rec: tracking.Recorder
) -> Iterator[Mapping[str, Session | worker.Timer]]:
    """Where latency is timed: the run's own sessions, or (latency_process=worker) a lean worker process per model,
    whose CPU and memory the monitor samples apart from this process's."""
    if not cfg.latency_in_worker:
        if cfg.latency_process == "worker":
            rec.tags({"ptq.latency_process": f"inprocess: backend {cfg.backend} has no worker (its model is a torch module)"})
        yield sessions
        return
    names = {key: "fp32" if key else cfg.precision for key in models}
    with worker.workers(cfg.backend, models, names, cfg.threads_used, batch) as timers:
        if monitor:
            monitor.watch({key: t.pid for key, t in timers.items() if t.pid is not None})
        try:
            yield timers
        finally:
            if monitor:
                monitor.watch({})


UNSTABLE_SPREAD_PCT = 5.0  # per-block p50s straying more than this: the machine's speed changed during the run


def _stability(latency: dict[str, bench.Latency]) -> str:
    """'stable', or why not: a block-to-block spread of a p50 above UNSTABLE_SPREAD_PCT means the machine changed
    speed while it was timed (other load, clocks, heat), which a rerun may not repeat."""
    spreads = {prefix or "model": lat.block_p50_spread_pct() for prefix, lat in latency.items()}
    high = {k.rstrip("_"): v for k, v in spreads.items() if v > UNSTABLE_SPREAD_PCT}
    if not high:
        return "stable"
    note = "unstable: per-block p50 spread " + ", ".join(f"{k} {v:.1f} %" for k, v in high.items())
    log.warning("latency %s (over %g %%): the machine changed speed while timing; rerun on a quiet machine or with locked clocks", note, UNSTABLE_SPREAD_PCT)
    return note


def _log_speedup(rec: tracking.Recorder, cfg: RunConfig, reference: bench.Latency, model: bench.Latency) -> None:
    """p50 speed-up over FP32 with its block-bootstrap 95 % interval; warns where compression made it slower."""
    speedup = reference.percentiles()[0] / model.percentiles()[0]
    low, high = bench.speedup_ci(reference, model)
    rec.metrics({"speedup/p50": speedup, "speedup/p50_ci95_low": low, "speedup/p50_ci95_high": high})
    if reference.gpu_ms is not None and model.gpu_ms is not None:  # the device's own time, copies left out (trtexec's GPU compute)
        rec.metrics({"speedup/gpu_compute_p50": float(np.median(reference.gpu_ms) / np.median(model.gpu_ms))})
    if speedup < 1.0:
        note = f"{cfg.precision} is slower than fp32 here: {speedup:.2f}x the fp32 speed at batch {cfg.batch_size} (95 % CI {low:.2f}-{high:.2f})"
        log.warning(note)
        rec.tags({"ptq.warning": note})


def _log_profile(rec: tracking.Recorder, work: Path, precision: str, profiles: dict[str, Any], compressed: Compressed) -> None:
    """Per op type (FP32 against the compressed model) as `profile.json`, per node as `profile_nodes.json`, the
    compressed model's float islands and Q/DQ cost, a plot, and the kernel time per query of each as metrics."""
    from ptq import profile

    mine, ref = profiles[""], profiles.get("fp32_")
    rec.table(ref.table(mine, family=True) if ref is not None else mine.table(), "profile.json")
    nodes = mine.by_node()
    rec.table({k: [r[k] for r in nodes] for k in ("node", "op_type", "us", "share", "input_type")}, "profile_nodes.json")
    rec.metrics({"profile/kernel_us": mine.total_us, **({"profile/fp32_kernel_us": ref.total_us} if ref is not None else {})})
    if precision == "int8" and compressed.path.suffix == ".onnx":
        islands = profile.float_islands(compressed.path, mine)
        qdq = profile.qdq_overhead(mine)
        rec.text(json.dumps({"qdq": qdq, "float_islands": islands}, indent=1), "profile_int8.json")
        rec.metrics({"profile/qdq_us": qdq["qdq_us"], "profile/float_island_us": sum(r["us"] for r in islands)})
    if ref is not None and importlib.util.find_spec("matplotlib") is not None:
        rec.artifact(profile.plot(ref, mine, work / "profile.png"))


def _log_models(rec: tracking.Recorder, fp32_path: Path, compressed: Compressed) -> str:
    """Log the FP32 ONNX and the compressed model as the run's LoggedModels, named `<precision>-<format>` (backends
    write `model_<precision>.<ext>`), and return the id of the one the run measured (the FP32 one in an fp32 run)."""
    formats = {".onnx": "onnx", ".engine": "tensorrt", ".pt": "torch"}

    def log(path: Path, role: str, numerics: str, files: tuple[Path, ...]) -> str:
        precision, kind = path.stem[len("model_") :], formats.get(path.suffix, path.suffix.lstrip("."))
        return rec.model(path, f"{precision}-{kind}", kind, {"precision": precision}, {"numerics": numerics, "ptq.role": role}, files)

    if compressed.path != fp32_path:
        log(fp32_path, "fp32 reference", "fp32", ())
    return log(compressed.path, "measured", compressed.numerics, tuple(p for p in compressed.artifacts if p.suffix != ".onnx"))


def _log_compression(rec: tracking.Recorder, phases: Phases, fp32_path: Path, compressed: Compressed) -> None:
    """Compression times and sizes, the models as LoggedModels (each file stored once; read them as `models:/<id>`), an
    intermediate ONNX graph under `model/`; from here on the run's metrics carry the measured model's id, so MLflow's
    "Logged models" views compare models by them."""
    times = {f"compress/{p}_s": phases.seconds[p] for p in COMPRESS_PHASES if p in phases.seconds}
    times["compress/total_s"] = sum(times.values())
    size = compressed.path.stat().st_size
    rec.tags({"numerics.model": compressed.numerics, **compressed.tags})
    rec.link_metrics(_log_models(rec, fp32_path, compressed))
    rec.metrics({**times, **compressed.metrics, "size/model_bytes": size, "size/ratio": fp32_path.stat().st_size / size})
    for extra in compressed.artifacts:
        if extra.suffix == ".onnx":  # the QDQ graph an engine was built from: a file of no logged model
            rec.artifact(extra, "model")


def _log_latency_samples(rec: tracking.Recorder, work: Path, precision: str, latency: dict[str, bench.Latency]) -> None:
    """Every timed query with its model and block, for distributions and block-bootstrap intervals; its GPU compute
    time (`gpu_ms`) where the session has a device clock."""
    path = work / "latency.csv"
    gpu = all(lat.gpu_ms is not None for lat in latency.values())
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["precision", "block", "ms", *(["gpu_ms"] if gpu else [])])
        for prefix, lat in latency.items():
            name = "fp32" if prefix else precision
            if gpu:
                assert lat.gpu_ms is not None
                writer.writerows((name, int(b), f"{v:.4f}", f"{g:.4f}") for b, v, g in zip(lat.block, lat.ms, lat.gpu_ms))
            else:
                writer.writerows((name, int(b), f"{v:.4f}") for b, v in zip(lat.block, lat.ms))
    rec.artifact(path)


def _log_predictions(rec: tracking.Recorder, work: Path, dataset: data.Dataset, eval_idx: list[int], acc: bench.Accuracy, ref: bench.Accuracy) -> None:
    """Per-image top-5 of both models, for paired statistics (McNemar) across precisions."""
    path = work / "predictions.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label", "top5", "fp32_top5", "correct", "fp32_correct"])
        for row, i in enumerate(eval_idx):
            writer.writerow(
                [
                    dataset.files[i].name,
                    acc.labels[row],
                    " ".join(map(str, acc.top5_pred[row])),
                    " ".join(map(str, ref.top5_pred[row])),
                    int(acc.top5_pred[row, 0] == acc.labels[row]),
                    int(ref.top5_pred[row, 0] == ref.labels[row]),
                ]
            )
    rec.artifact(path)


def _log_summary(rec: tracking.Recorder, cfg: RunConfig) -> None:
    """The headline, read back from what the run logged, as `summary.md` and as the run's description (the
    first thing its page in the MLflow UI shows)."""
    run = rec.snapshot()
    m = cfg.latency()
    method = (
        f"Latency: batch {m.batch_size}, {cfg.threads_used} threads, {m.warmup} warm-up queries per model, then blocks of "
        f"{m.block_queries} queries alternating with the FP32 reference until each model had at least {m.blocks} blocks, "
        f"{m.min_queries} queries and {m.min_duration_s:g} s."
    )
    text = summary.markdown(f"ptq run {rec.run_id}", summary.rows(run.data.params, run.data.tags, run.data.metrics)) + "\n" + method + "\n"
    rec.text(text, "summary.md")
    rec.tags({"mlflow.note.content": text})
