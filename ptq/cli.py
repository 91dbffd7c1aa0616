"""The `ptq` command line (typer): parses parameters and calls the library, nothing more.

Annotations here are evaluated (typer reads them), so they use typing's spellings, which Python 3.8 understands.
"""

import dataclasses
import functools
import inspect
import logging
import os
import signal
import sys
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, TextIO, Tuple

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table
from typing_extensions import Annotated

from ptq import doctor, models, pipeline, prequantize, quantizers, summary, tracking
from ptq import report as reports
from ptq import sensitivity as sensitivities
from ptq import sweep as sweeps
from ptq import sync as syncs
from ptq import tune as tunes
from ptq.backends import BACKENDS, options_class
from ptq.options import format_value, user_options
from ptq.config import RunConfig
from ptq.errors import PtqError, stop_on_signals

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False, help="Measure what post-training quantization costs and buys on this device.")
console = Console(stderr=True)
log = logging.getLogger("ptq.cli")


def _bool(name: str, text: str) -> bool:
    """true/false (also yes/no, 1/0): options take a value so MLproject's string parameters pass straight through."""
    value = text.strip().lower()
    if value in ("true", "yes", "1", "on"):
        return True
    if value in ("false", "no", "0", "off"):
        return False
    raise PtqError(f"{name}={text!r} is not a boolean: use true or false")


def _triple(text: str) -> Optional[Tuple[float, float, float]]:
    if not text:
        return None
    values = tuple(float(v) for v in text.split(","))
    if len(values) != 3:
        raise PtqError(f"expected three comma-separated numbers (one per channel), got {text!r}")
    return values  # type: ignore[return-value]


def _config(params: Dict[str, Any]) -> RunConfig:
    """A RunConfig from parsed options; CLI spellings (0 = default, true/false strings) resolved here."""
    o = dict(params)
    return RunConfig(
        eval_size=int(o.pop("eval_size")) or None,
        input_size=int(o.pop("input_size")) or None,
        mean=_triple(str(o.pop("mean"))),
        std=_triple(str(o.pop("std"))),
        monitor=_bool("monitor", str(o.pop("monitor"))),
        profile=_bool("profile", str(o.pop("profile"))),
        progress=_bool("progress", str(o.pop("progress"))) and sys.stderr.isatty(),
        **o,
    )


def backend_option_flags() -> Dict[str, inspect.Parameter]:
    """One `--flag` per option of any backend or quantizer, from their Options dataclasses (help and default there);
    unset (None or "", as MLproject passes it) means the owner's default."""
    owners: Dict[str, List[str]] = {}
    fields: Dict[str, dataclasses.Field] = {}  # type: ignore[type-arg]
    members = [(b, options_class(b)) for b in BACKENDS] + [(f"quantizer {q}", quantizers.options_class(q)) for q in quantizers.QUANTIZERS]
    for owner, options in members:
        for f in user_options(options):
            owners.setdefault(f.name, []).append(f"{owner}: {format_value(f.default) or 'none'}")
            fields.setdefault(f.name, f)
    return {
        name: inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[Optional[str], typer.Option(help=f"{f.metadata['help']} (default {'; '.join(owners[name])})", show_default=False)],
        )
        for name, f in fields.items()
    }


def take_backend_options(params: Dict[str, Any]) -> Dict[str, str]:
    """Remove the backend option flags from parsed `params`; return the ones set, as text."""
    values = {k: params.pop(k, None) for k in backend_option_flags()}
    return {k: str(v) for k, v in values.items() if v not in (None, "")}


def with_backend_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give `command` every backend's options as flags; it receives the ones set as `options` (name -> text)."""
    flags = backend_option_flags()
    signature = inspect.signature(command)

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> None:
        command(options=take_backend_options(kwargs), **kwargs)

    own = [p for p in signature.parameters.values() if p.name != "options"]
    wrapper.__signature__ = signature.replace(parameters=[*own, *flags.values()])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {**command.__annotations__, **{k: p.annotation for k, p in flags.items()}}
    return wrapper


@app.command()
@with_backend_options
def run(
    model: Annotated[str, typer.Option(help="Alias (mob-s, r50, d201, lite0...), torchvision name, or path to an .onnx file")],
    precision: Annotated[str, typer.Option(help="fp32, fp16 or int8")] = "int8",
    backend: Annotated[str, typer.Option(help="ort (ONNX Runtime CPU), torch or tensorrt")] = "ort",
    quantizer: Annotated[str, typer.Option(help="INT8 technique: ort (the backend's own), nncf, quark or aimet (each in its environment: ptq env NAME)")] = "ort",
    weights: Annotated[str, typer.Option(help="pretrained, or random to characterize the architecture only")] = "pretrained",
    data: Annotated[Optional[Path], typer.Option(help="ImageNet-style or flat <wnid>_*.JPEG folder [env: PTQ_DATA]")] = None,
    calib_size: Annotated[int, typer.Option(help="Images used for calibration (disjoint from evaluation)")] = 100,
    eval_size: Annotated[int, typer.Option(help="Images evaluated; 0 = every non-calibration image")] = 0,
    split_seed: Annotated[int, typer.Option(help="Seed of the calibration/evaluation split")] = 0,
    batch_size: Annotated[int, typer.Option(help="Batch size of the latency measurement")] = 1,
    eval_batch_size: Annotated[int, typer.Option(help="Batch size of the accuracy evaluation")] = 32,
    threads: Annotated[int, typer.Option(help="CPU threads; 0 = every core")] = 0,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up queries per model")] = RunConfig.warmup,
    min_queries: Annotated[int, typer.Option(help="Timed queries per model, at least")] = RunConfig.min_queries,
    min_duration_s: Annotated[float, typer.Option(help="Timed seconds per model, at least")] = RunConfig.min_duration_s,
    blocks: Annotated[int, typer.Option(help="Blocks per model, alternating with the FP32 reference, at least")] = RunConfig.blocks,
    latency_process: Annotated[str, typer.Option(help="Where latency is timed: inprocess, or worker (a lean process per model holding only the runtime and the model)")] = RunConfig.latency_process,
    input_size: Annotated[int, typer.Option(help="Input side for model=*.onnx; 0 = 224")] = 0,
    mean: Annotated[str, typer.Option(help="Per-channel mean for model=*.onnx, e.g. 0.5,0.5,0.5")] = "",
    std: Annotated[str, typer.Option(help="Per-channel std for model=*.onnx")] = "",
    experiment: Annotated[str, typer.Option(help="MLflow experiment name")] = "ptq",
    monitor: Annotated[str, typer.Option("--monitor", help="Sample resources during the run: true/false")] = "true",
    monitor_interval: Annotated[float, typer.Option(help="Seconds between resource samples")] = 1.0,
    profile: Annotated[str, typer.Option(help="Per-op kernel times of both models (ONNX Runtime's profiler): true/false")] = "false",
    progress: Annotated[str, typer.Option(help="Draw progress bars (on a terminal): true/false")] = "true",
    options: Optional[Dict[str, str]] = None,
) -> None:
    """Quantize, evaluate and benchmark one model; log everything to MLflow.

    Backend and quantizer options (--calib-method, --workspace-mb, --adaround, ...) apply to those named in their help."""
    cfg = _config(locals())
    with _stopped_by_signal(), _stdout_to_stderr() as stdout:
        run_id = pipeline.run(cfg)
        stored = tracking.stored_run(run_id)
        pairs = summary.rows(stored.data.params, stored.data.tags, stored.data.metrics)
        console.print(summary.table(f"run {run_id} FINISHED", pairs))
        console.print(f"open it: {tracking.where_to_look(stored)}", soft_wrap=True, highlight=False)
        print(run_id, file=stdout, flush=True)


@contextmanager
def _stdout_to_stderr() -> Iterator[TextIO]:
    """Library chatter (Python prints and native logs alike) goes to stderr while a command works, so stdout
    carries only what the README says it does; yields the real stdout for that."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    real = os.fdopen(os.dup(saved), "w")
    try:
        with redirect_stdout(sys.stderr):
            yield real
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        real.close()


@contextmanager
def _stopped_by_signal() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP end the command with 128 + the signal's number, after the run was closed KILLED."""
    try:
        yield
    except KeyboardInterrupt as exc:
        raise typer.Exit(128 + getattr(exc, "signum", signal.SIGINT)) from None


def _names(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _run_config(args: List[str], **fixed: str) -> RunConfig:
    """A RunConfig from `ptq run` options given to another command (sweep, sensitivity, tune), parsed as `ptq run`
    parses them, with `fixed` fields set by that command."""
    run_command = typer.main.get_command(app).commands["run"]  # type: ignore[attr-defined]
    parsed = run_command.make_context("run", ["--model", "-", *args]).params
    parsed.update(fixed, options=take_backend_options(parsed))
    return _config(parsed)


EXTRA_RUN_OPTIONS = {"allow_extra_args": True, "ignore_unknown_options": True}


@app.command(context_settings=EXTRA_RUN_OPTIONS)
def sweep(
    ctx: typer.Context,
    name: Annotated[str, typer.Option(help="Sweep name; rerunning the same sweep resumes it")] = "",
    preset: Annotated[str, typer.Option(help="study (the seed's six CNNs) or edge-lite (lite0-2)")] = "",
    models_: Annotated[str, typer.Option("--models", help="Comma-separated models (added to the preset's)")] = "",
    precisions: Annotated[str, typer.Option(help="Comma-separated precisions")] = "fp32,fp16,int8",
    backends: Annotated[str, typer.Option(help="Comma-separated backends")] = "ort",
    calib_methods: Annotated[str, typer.Option(help="Comma-separated INT8 calibration methods (default: the backend's)")] = "",
    quantizers_: Annotated[str, typer.Option("--quantizers", help="Comma-separated INT8 techniques, each quantizer[+option[=value]...]: ort,nncf+bias_correction=full,quark+adaround")] = "",
    fleet: Annotated[str, typer.Option(help="Share the sweep with every device of this kind (device.kind) logging to the same store: true/false")] = "false",
) -> None:
    """Run a grid of models x precisions x backends (x quantizers) as child runs of one parent run; resumable.

    Every other `ptq run` option (--weights, --data, --calib-size, --min-queries, ...) applies to all its runs.
    """
    if preset and preset not in sweeps.PRESETS:
        raise PtqError(f"unknown preset {preset!r}: use one of {', '.join(sweeps.PRESETS)}")
    grid_models = [*sweeps.PRESETS.get(preset, ()), *_names(models_)]
    base = _run_config(ctx.args, model=grid_models[0] if grid_models else "", precision="fp32", backend="ort")
    with _stopped_by_signal(), _stdout_to_stderr():
        result = sweeps.run_sweep(name or preset or "custom", base, grid_models, _names(precisions), _names(backends), _names(calib_methods), _names(quantizers_), fleet=_bool("fleet", fleet))
    table = Table(*summary.SWEEP_COLUMNS, title=f"sweep {result.parent_run_id}", title_justify="left")
    for child in tracking.child_runs(result.parent_run_id):
        table.add_row(*summary.sweep_row(child.data.params, child.data.metrics, child.info.status))
    console.print(table)
    console.print(
        f"sweep run {result.parent_run_id}: {len(result.passed)} ran, {len(result.skipped)} already finished, {len(result.failed)} failed"
        + (f" ({', '.join(result.failed)})" if result.failed else "")
    )
    if result.failed:
        raise typer.Exit(1)


def _count(message: str) -> Callable[[int, int], None]:
    """A progress callback logging `message` % (done, total) every tenth step and at the end."""

    def report(done: int, total: int) -> None:
        if done % 10 == 0 or done == total:
            log.info(message, done, total)

    return report


@app.command(context_settings=EXTRA_RUN_OPTIONS)
def sensitivity(
    ctx: typer.Context,
    model: Annotated[str, typer.Option(help="Alias, torchvision name or .onnx file")],
    images: Annotated[int, typer.Option(help="Held-out evaluation images the divergence from FP32 is measured on")] = 64,
    eval_top: Annotated[int, typer.Option(help="Best nodes to keep in float whose top-1 drop is measured on all evaluation images")] = 5,
    show: Annotated[int, typer.Option(help="Rows of the ranking printed")] = 10,
    metric: Annotated[str, typer.Option(help="Rank by kl (class distributions) or cosine (logits: random weights)")] = "kl",
) -> None:
    """Rank the model's Conv/Gemm/MatMul nodes by what keeping each in float saves (KL from FP32's output).

    Every `ptq run` option (--data, --calib-size, --calib-method, --per-channel, ...) applies."""
    cfg = _run_config(ctx.args, model=model, precision="int8", backend="ort")
    with _stopped_by_signal(), _stdout_to_stderr() as stdout:
        result = sensitivities.analyze(cfg, images, eval_top, _count("sensitivity: %d/%d quantized"), metric)
        ranking = result.ranking
        table = Table("rank", "kept in float", "kind", f"{metric} saved", "KL", "cos dist", "top-1 agree", "top-1 drop (pt)", title=f"sensitivity run {result.run_id}", title_justify="left")
        for i, d in enumerate([*ranking.nodes[:show], *ranking.kinds, ranking.whole]):
            drop = "—" if d.top1_drop_pt is None else f"{d.top1_drop_pt:.2f}"
            table.add_row(str(i + 1) if i < show else "", d.node, d.kind, f"{d.recovered:.3g}", f"{d.kl:.3g}", f"{d.cosine:.3g}", f"{d.agreement:.3f}", drop)
        console.print(table)
        console.print(f"{ranking.quantizations} quantizations on {ranking.images} images in {ranking.seconds:.0f} s; keep the best 3 in float with "
                      f"--keep-float {','.join(ranking.top(3))}", soft_wrap=True, highlight=False)
        print(result.run_id, file=stdout, flush=True)


@app.command(context_settings=EXTRA_RUN_OPTIONS)
def tune(
    ctx: typer.Context,
    model: Annotated[str, typer.Option(help="Alias, torchvision name or .onnx file (pretrained weights: the drop is measured)")],
    max_drop: Annotated[float, typer.Option(help="Top-1 drop allowed against FP32, in points, on the same images")],
    calib_methods: Annotated[str, typer.Option(help="Calibration methods to try, in order")] = "minmax,percentile,entropy",
    per_channel: Annotated[str, typer.Option("--per-channel-values", help="Per-channel weight scales to try: true,false")] = "true",
    activation_types: Annotated[str, typer.Option(help="Activation types to try: uint8,int8")] = "uint8",
    keep_float: Annotated[str, typer.Option("--keep-float-counts", help="How many of the nodes sensitivity ranks first to keep in float")] = "0,1,2,4,8",
    exhaustive: Annotated[bool, typer.Option(help="Run every candidate and pick the fastest within budget (to see what the guided search saves)")] = False,
    quantizers_: Annotated[str, typer.Option("--quantizers", help="Toolkit techniques to try too, comma-separated: nncf+bias_correction=full,quark+adaround")] = "",
) -> None:
    """Find the fastest INT8 configuration whose paired top-1 drop stays within --max-drop; each trial a child run.

    Every `ptq run` option (--data, --calib-size, --min-duration-s, ...) applies to every trial."""
    cfg = _run_config(ctx.args, model=model, precision="int8", backend="ort")
    try:
        counts = [int(k) for k in _names(keep_float)]
    except ValueError:
        raise PtqError(f"--keep-float-counts {keep_float!r} must be whole numbers, e.g. 0,1,2,4,8") from None
    candidates = tunes.space(_names(calib_methods), [_bool("per_channel", v) for v in _names(per_channel)], _names(activation_types), counts, _names(quantizers_))
    with _stopped_by_signal(), _stdout_to_stderr() as stdout:
        result = tunes.search(cfg, max_drop, candidates, exhaustive)
        table = Table("trial", "configuration", "top-1 drop (pt)", "p50 (ms)", "speed-up", "s", "within", title=f"tune run {result.parent_run_id}", title_justify="left")
        for i, t in enumerate(result.trials, 1):
            table.add_row(str(i), t.candidate.label(), f"{t.drop_pt:.2f}", f"{t.p50_ms:.3f}", f"{t.speedup:.2f}", f"{t.seconds:.0f}", "yes" if t.within(max_drop) else "no")
        console.print(table)
        console.print(f"{result.verdict()}; {len(result.trials)} of {len(candidates)} candidates tried in {result.seconds:.0f} s", soft_wrap=True, highlight=False)
        print(result.parent_run_id, file=stdout, flush=True)


@app.command()
def report(
    experiments: Annotated[str, typer.Option(help="Comma-separated MLflow experiments to read; empty: every experiment that holds ptq runs")] = "",
    device: Annotated[str, typer.Option(help="Only runs of this device (its device.name or host name)")] = "",
    model: Annotated[str, typer.Option(help="Only this model")] = "",
    precision: Annotated[str, typer.Option(help="Only this precision")] = "",
    out: Annotated[Path, typer.Option(help="Folder for the tables, plots and summary")] = Path("report"),
) -> None:
    """Tables, plots and statistics across devices, models and precisions; also logged as a report run."""
    result = reports.build(_names(experiments), out, device, model, precision)
    console.print(f"runs read from experiments {result.experiments}", soft_wrap=True, highlight=False)
    console.print(f"{len(result.table)} configurations -> {out}/report.md, runs.csv and {sum(f.suffix == '.png' for f in result.files)} plots")


@app.command("sync")
def sync_runs(target: Annotated[str, typer.Option(help="Server URI; default: the one each offline run was meant for")] = "") -> None:
    """Upload runs recorded while the tracking server was unreachable; running it twice, or twice at once, uploads nothing twice."""
    with _stopped_by_signal():
        result = syncs.sync(target or None)
    console.print(f"uploaded {len(result.uploaded)}, already there {len(result.already)}, still running {len(result.waiting)}")


@app.command("export")
def export_model(
    model: Annotated[str, typer.Option(help="Alias (mob-s, r50, d201, lite0...) or torchvision name")],
    out: Annotated[Path, typer.Option(help="The .onnx file to write")],
    weights: Annotated[str, typer.Option(help="pretrained or random")] = "pretrained",
) -> None:
    """Export a model to ONNX with its preprocessing inside, for a device without torch (`ptq run --model FILE.onnx`)."""
    path = pipeline.export_model(model, weights, out)
    console.print(f"wrote {path}: on the device, `ptq run --model {path.name} ...` prepares images as here", soft_wrap=True, highlight=False)


@app.command("quantize")
def quantize_model(
    model: Annotated[str, typer.Option(help="Alias (lite0, mob-s, d201...), torchvision name or FP32 .onnx file")],
    out: Annotated[Path, typer.Option(help="The QDQ .onnx file to write (its FP32 model and record go beside it)")],
    backend: Annotated[str, typer.Option(help="What the QDQ model is for: tensorrt (TensorRT's Q/DQ rules) or ort")] = "tensorrt",
    data: Annotated[Optional[Path], typer.Option(help="Image folder to calibrate on (default: $PTQ_DATA)")] = None,
    calib_size: Annotated[int, typer.Option(help="Calibration images, taken as a run takes them (seeded split)")] = 100,
    split_seed: Annotated[int, typer.Option(help="Seed of the calibration/evaluation split")] = 0,
    weights: Annotated[str, typer.Option(help="pretrained or random")] = "pretrained",
    calib_method: Annotated[str, typer.Option(help="minmax, entropy or percentile (quantizer ort)")] = "minmax",
    quantizer: Annotated[str, typer.Option(help="The technique: ort, or a toolkit's spec such as quark+adaround+iterations=50 (see ptq sweep --quantizers)")] = "ort",
) -> None:
    """Write an explicit-INT8 (QDQ) model on a host without TensorRT or GPU; a device runs it with `ptq run --model FILE`
    and calibrates nothing."""
    folder = data or (Path(os.environ["PTQ_DATA"]) if os.environ.get("PTQ_DATA") else None)
    if folder is None:
        raise PtqError("no image data given: pass --data PATH (or set PTQ_DATA) to calibrate on")
    path = prequantize.write(model, backend, folder, out, calib_size, split_seed, weights, calib_method, quantizer)
    console.print(
        f"wrote {path}, {path.stem}.fp32.onnx and {path.stem}.json: copy them together; on the device, "
        f"`ptq run --model {path.name} --precision int8 --backend {backend} --calib-size {calib_size} --split-seed {split_seed}`",
        soft_wrap=True, highlight=False,
    )


@app.command("env")
def make_env(name: Annotated[str, typer.Argument(help="The toolkit: nncf, quark or aimet")]) -> None:
    """Make the environment a toolkit quantizer runs in: a venv with the toolkit's pins first and this environment's
    packages (torch, ONNX Runtime) after them; `ptq run --quantizer NAME` then finds it."""
    from ptq.quantizers import toolkit

    with _stdout_to_stderr() as stdout:
        python = toolkit.make_env(name)
        console.print(f"quantizer {name} runs in {python}", soft_wrap=True, highlight=False)
        print(python, file=stdout, flush=True)


@app.command("doctor")
def doctor_command(
    root: Annotated[Path, typer.Option(help="Read the board's files under this folder instead of / (a captured layout)")] = Path("/"),
    check: Annotated[bool, typer.Option("--check", help="Field check: read every source, compare sysfs with tegrastats, build --model with TensorRT at fp32/fp16/int8, write --out")] = False,
    out: Annotated[Path, typer.Option(help="The field check's report (JSON) to attach to an issue")] = Path("ptq_field_check.json"),
    model: Annotated[Optional[Path], typer.Option(help="Field check: the FP32 ONNX to build (`ptq export --model lite0 --out lite0.onnx` on a host)")] = None,
) -> None:
    """What this device can measure before a study: versions, backends, power/GPU/thermal sources, power mode and
    clocks, memory and disk, and what would make numbers unreliable."""
    if check:
        from ptq import field_check

        if model is not None and not model.is_file():
            raise PtqError(f"--model {model} is not a file: export one on a host (`ptq export --model lite0 --out lite0.onnx`) and copy it here")
        for line in field_check.summary_lines(field_check.run_check(root, model, out)):
            Console().print(line, soft_wrap=True, highlight=False, markup=False)
        Console().print(f"wrote {out}: attach it to an issue", soft_wrap=True, highlight=False)
        return
    checks = doctor.diagnose(root)
    Console().print(doctor.render(checks))
    warned = doctor.warnings_for_run(checks)
    Console().print(f"{len(warned)} warning(s) runs here will carry as tags" + (": " + ", ".join(warned) if warned else ""), soft_wrap=True)


@app.command("models")
def list_models(all_: Annotated[bool, typer.Option("--all", help="Also list every torchvision classifier")] = False) -> None:
    """List the models ptq knows, with parameter counts, input size and whether weights are on this machine."""
    table = Table("name", "source", "params (M)", "input", "mean/std", "pretrained weights here")
    names = models.known_names() + ([n for n in models.torchvision_classifiers() if n not in models.TORCHVISION_ALIASES.values()] if all_ else [])
    for name in names:
        spec = models.resolve(name)
        if spec.num_params is None and spec.build is not None:
            spec.num_params = models.count_params(spec.build("random"))
        t = spec.transform
        table.add_row(
            name,
            spec.source,
            f"{spec.num_params / 1e6:.1f}" if spec.num_params else "?",
            f"{t.resize}->{t.crop} {t.interpolation}",
            f"{t.mean[0]:g}/{t.std[0]:g}" if t.mean[0] == 0.5 else "imagenet",
            "yes" if spec.weights_available else f"no ({spec.weights_note})",
        )
    Console().print(table)
    if not all_:
        Console().print("Any torchvision classifier name and any .onnx path also work (`ptq models --all`).")


def main() -> None:
    """Console-script entry: run the app, turning PtqError into one line on stderr and exit status 2."""
    # on a terminal rich's layout; in a log file (Slurm, systemd, CI) plain lines that are never wrapped
    handler = RichHandler(console=console, show_path=False) if sys.stderr.isatty() else logging.StreamHandler(sys.stderr)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[handler])
    logging.getLogger("ptq").setLevel(logging.INFO)
    stop_on_signals()
    try:
        app()
    except PtqError as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True, highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
