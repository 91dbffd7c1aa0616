"""Grids of runs (models x precisions x backends [x calibration methods]) as child runs of one parent,
each in a fresh process, resumable: a combination that already FINISHED on this machine, with the same
parameters, data, ptq commit and library versions, is skipped."""

from __future__ import annotations

import faulthandler
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection

import mlflow
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from ptq import data, pipeline, quantizers, tracking
from ptq.backends import PRECISIONS, int8_setting
from ptq.config import RunConfig
from ptq.errors import PtqError, Terminated
from ptq.models import resolve

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STOP_GRACE_S = 30.0  # how long a stopped sweep waits for its child to close its run before killing it

PRESETS: dict[str, tuple[str, ...]] = {
    "study": ("mob-s", "mob-l", "r18", "r50", "d169", "d201"),  # the seed study's six CNNs
    "edge-lite": ("lite0", "lite1", "lite2"),  # real weights that install offline
}


@dataclass(frozen=True)
class ChildJob:
    """One combination as its child process gets it: the run's config and tags, the sweep's run, the run claimed for
    it, the store to log to and the `ptq` log level (a spawned process inherits neither mlflow's nor logging's settings)."""

    cfg: RunConfig
    tags: dict[str, str]
    parent_run_id: str
    tracking_uri: str
    log_level: int
    run_id: str | None = None


class ChildFailed(Exception):
    """A combination's child process failed (its run, if any, is closed on the store) or died."""


@dataclass
class SweepResult:
    """What a sweep did, combination by combination."""

    parent_run_id: str
    passed: list[str]
    failed: list[str]
    skipped: list[str]


def combinations(models: list[str], precisions: list[str], backends: list[str], calib_methods: list[str], techniques: list[str] | None = None) -> list[dict[str, str]]:
    """The grid, in a stable order; quantizers (`techniques`: specs such as `quark+adaround`, see
    `quantizers.parse_spec`) vary only for int8, calibration methods only for int8 by the backend's own quantizer
    ("" = the default). A grid without quantizers keeps the combinations (and so the resume keys) it always had."""
    grid = []
    for model, precision, backend in itertools.product(models, precisions, backends):
        for spec in (techniques or [""]) if precision == "int8" else [""]:
            own = not spec or quantizers.parse_spec(spec)[0] == quantizers.BUILT_IN
            for method in calib_methods if precision == "int8" and own else [""]:
                grid.append({"model": model, "precision": precision, "backend": backend, **({"quantizer": spec} if spec else {}), "calib_method": method})
    return grid


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _configure(base: RunConfig, combo: dict[str, str]) -> RunConfig:
    options, quantizer = dict(base.options), base.quantizer
    if combo.get("quantizer"):
        quantizer, technique = quantizers.parse_spec(combo["quantizer"])
        if quantizer != base.quantizer:  # the base's INT8 settings belong to the base's quantizer, not to this one
            own = base.quantizer == quantizers.BUILT_IN
            options = {k: v for k, v in options.items() if k not in quantizers.option_names(base.quantizer) and not (own and int8_setting(combo["backend"], k))}
        options.update(technique)
    if combo["calib_method"]:
        options["calib_method"] = combo["calib_method"]
    return replace(base, model=combo["model"], precision=combo["precision"], backend=combo["backend"], quantizer=quantizer, options=options)


def resume_identity(fingerprint: dict[str, str], data_hash: str, fleet: bool = False) -> dict[str, object]:
    """What must match for a finished run to stand for a combination: the device (its name, which reports key on,
    and its machine id, which tells apart machines with one host name; with `fleet`, its kind, so every device of
    that kind shares the sweep), the data's content, ptq's commit and the library versions; a new commit, library
    or image set measures something new."""
    device = {"kind": fingerprint["device.kind"]} if fleet else {"device": fingerprint["device.name"], "machine_id": fingerprint["device.machine_id"]}
    return {
        **device,
        "commit": fingerprint["ptq.commit"],
        "versions": {k: v for k, v in fingerprint.items() if k.startswith("version.")},
        "data_hash": data_hash,
    }


def run_child(job: ChildJob) -> str:
    """What each child process runs by default: the combination's run (the one claimed for it), a child of the sweep's
    run; returns its id."""
    return pipeline.run(job.cfg, job.tags, job.parent_run_id, run_id=job.run_id)


def run_sweep(
    name: str,
    base: RunConfig,
    models: list[str],
    precisions: list[str] | None = None,
    backends: list[str] | None = None,
    calib_methods: list[str] | None = None,
    techniques: list[str] | None = None,
    *,
    fleet: bool = False,
    target: Callable[[ChildJob], str] = run_child,
) -> SweepResult:
    """Run every combination as a child of one parent run, each in a fresh process (so a native crash costs one
    combination, and peak memory is each run's own); rerunning resumes where the last attempt stopped, and identical
    sweeps running at once share the work (a combination is claimed before it runs). The parent writes through a
    Recorder, so a lost server moves it and the rest of the sweep offline. With `fleet`, every device of this kind
    (`device.kind`) running the same sweep against one store joins it and splits the combinations. `target` is what
    each child runs: a module-level function, as the spawned process imports it by name."""
    grid = combinations(models, precisions or list(PRECISIONS), backends or ["ort"], calib_methods or [base.options.get("calib_method", "")], techniques)
    if not grid:
        raise PtqError("the sweep is empty: give at least one model, precision and backend")
    for model in models:  # every bad parameter is refused before the first run starts
        resolve(model)
    for combo in grid:
        _configure(base, combo).validate()
    tracking.select_store()
    fingerprint = tracking.fingerprint()  # identifies this device's runs; also the parent's tags
    assert base.data is not None  # validate() refused a sweep without data
    data_hash = data.scan(base.data).content_hash
    identity = resume_identity(fingerprint, data_hash, fleet)
    run_params = {k: v for k, v in base.params().items() if k not in ("model", "precision", "backend", "quantizer", "calib_method", "experiment")}
    key_params = {k: v for k, v in run_params.items() if k != "data"}  # the same images elsewhere are the same data
    sweep_key = _key(name, identity, grid, key_params)
    parent_tags = {**fingerprint, **tracking.offline_tags(), "ptq.sweep": name, SWEEP_KEY: sweep_key}
    params = {**run_params, "sweep": name, "data_hash": data_hash, "grid": json.dumps(grid)[:6000], "combinations": str(len(grid))}
    parent_id, new = None, True
    if not tracking.under_mlflow_run():  # under `mlflow run -e sweep`, the project's run is the parent
        parent_id, new = _parent(MlflowClient(), tracking.set_experiment(base.experiment), sweep_key, parent_tags, f"sweep-{name}")
    tally = Tally(grid)
    with ExitStack() as shield, tracking.run(base.experiment, f"sweep-{name}", params if new else {}, parent_tags, run_id=parent_id) as parent:
        try:
            waiting: dict[str, tuple[dict[str, str], str]] = {}  # combinations another sweep is running: label -> (combination, its run)
            for number, combo in enumerate(grid, 1):
                label = "/".join(v for v in combo.values() if v)
                log.info("sweep %s %d/%d: %s", name, number, len(grid), label)
                if busy := _attempt(target, parent, base, combo, label, name, identity, key_params, fingerprint, tally):
                    waiting[label] = (combo, busy)
            while waiting:  # every combination is counted by the end, whoever ran it
                time.sleep(WAIT_S)
                for label, (combo, run_id) in list(waiting.items()):
                    other = parent.call(lambda client, _e: client.get_run(run_id))  # noqa: B023 (called at once)
                    if other.info.lifecycle_stage == "active" and other.info.status == "RUNNING" and tracking.claim_alive(other):
                        continue
                    del waiting[label]
                    if other.info.lifecycle_stage == "active" and other.info.status == "FINISHED":
                        tally.skipped.append(label)
                    elif other.info.lifecycle_stage == "active" and other.info.status != "RUNNING":
                        tally.failed.append(label)
                    elif busy := _attempt(target, parent, base, combo, label, name, identity, key_params, fingerprint, tally):  # its claimer died
                        waiting[label] = (combo, busy)
        except BaseException:  # Ctrl-C, SIGTERM (KILLED, like its stopped child) or a store lost for good: rerun to resume
            shield.enter_context(_shielded())  # until the parent is closed too
            _log_counts(parent, tally)
            raise
        _log_counts(parent, tally)
        return SweepResult(parent.run_id, tally.passed, tally.failed, tally.skipped)


SWEEP_KEY, COMBO_KEY = "ptq.sweep_key", "ptq.combo_key"
WAIT_S = 2.0  # how often a sweep looks at the combinations that other sweeps are running
HEARTBEAT_S = 60.0  # how often a sweep renews the claim on the combination it runs (tracking.CLAIM_STALE_S for other machines)


@dataclass
class Tally:
    """The combinations of a sweep by what became of them in this process."""

    grid: list[dict[str, str]]
    passed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _parent(client: MlflowClient, experiment_id: str, sweep_key: str, tags: dict[str, str], run_name: str) -> tuple[str, bool]:
    """The sweep's parent run: an earlier one with its key (resumed, or joined by a concurrent identical sweep), else a
    new one claimed so that two sweeps starting at once join one parent; (its id, whether it is new)."""
    earlier = client.search_runs([experiment_id], f"tags.`{SWEEP_KEY}` = '{sweep_key}'", max_results=1000)
    if earlier:
        return min(earlier, key=lambda r: (tracking.claim_order(r))).info.run_id, False
    owner = {tracking.PROCESS_TAG: tracking.process_id(), "device.machine_id": tracking.machine_id()}
    return tracking.claim_run(client, experiment_id, SWEEP_KEY, sweep_key, {**tags, **owner}, lambda _r: True, run_name)


def _claim_combo(client: MlflowClient, experiment_id: str, combo_key: str, tags: dict[str, str], run_name: str) -> tuple[str, str]:
    """Claim a combination before running it, so concurrent identical sweeps share the work: ("done", run) if a
    FINISHED run stands for it, ("busy", run) if another sweep's live claim holds it, else ("mine", the run claimed,
    RUNNING, that the child process takes over). Failed, killed and dead attempts are discarded: superseded by this one."""
    earlier = client.search_runs([experiment_id], f"tags.`{COMBO_KEY}` = '{combo_key}'", max_results=1000)
    for r in earlier:
        if r.info.status == "FINISHED":
            return "done", r.info.run_id
    for r in earlier:
        if r.info.status == "RUNNING" and tracking.claim_alive(r):
            return "busy", r.info.run_id
    for stale in earlier:  # failed, killed or cut off by power loss
        tracking.discard_run(client, stale.info.run_id, "superseded by a new attempt")

    def stands(r: Run) -> bool:
        return r.info.status == "FINISHED" or (r.info.status == "RUNNING" and tracking.claim_alive(r))

    owner = {tracking.PROCESS_TAG: tracking.process_id(), "device.machine_id": tracking.machine_id()}
    winner, mine = tracking.claim_run(client, experiment_id, COMBO_KEY, combo_key, {**tags, **owner}, stands, run_name)
    if mine:
        return "mine", winner
    return ("done" if client.get_run(winner).info.status == "FINISHED" else "busy"), winner


def _attempt(
    target: Callable[[ChildJob], str], parent: tracking.Recorder, base: RunConfig, combo: dict[str, str], label: str, name: str,
    identity: dict[str, object], key_params: dict[str, str], fingerprint: dict[str, str], tally: Tally,
) -> str | None:
    """Claim and run one combination, counting it in `tally`; the run id of another sweep's claim if that holds it."""
    combo_key = _key(identity, combo, key_params)
    # the fingerprint the resume key was made of, so every run's tags match its key
    tags = {**fingerprint, "ptq.sweep": name, COMBO_KEY: combo_key}

    def claim(client: MlflowClient, experiment_id: str) -> tuple[str, str]:  # on the store the parent is in by then
        return _claim_combo(client, experiment_id, combo_key, {**tags, **tracking.offline_tags(), "mlflow.parentRunId": parent.run_id}, label.replace("/", "-"))

    kind, run_id = parent.call(claim)
    tags.update(tracking.offline_tags())
    if kind == "done":
        tally.skipped.append(label)
        return None
    if kind == "busy":
        log.info("sweep %s: %s is being run by another sweep (run %s)", name, label, run_id)
        return run_id
    job = ChildJob(_configure(base, combo), tags, parent.run_id, mlflow.get_tracking_uri(), logging.getLogger("ptq").getEffectiveLevel(), run_id)
    try:
        done = _in_child(target, job, parent)
        log.info("sweep %s: %s finished as run %s", name, label, done)
        tally.passed.append(label)
    except ChildFailed as exc:  # one failed combination does not stop the others
        log.warning("sweep %s: %s failed: %s", name, label, exc)
        tally.failed.append(label)
    return None


def _log_counts(parent: tracking.Recorder, tally: Tally) -> None:
    """The parent's tally: how many combinations finished, ran now, were skipped (finished already, or by another
    sweep) or failed."""
    finished = len(tally.skipped) + len(tally.passed)
    parent.metrics({"sweep/total": len(tally.grid), "sweep/finished": finished, "sweep/ran": len(tally.passed), "sweep/skipped": len(tally.skipped), "sweep/failed": len(tally.failed)})
    parent.tags({"ptq.sweep_failed": ", ".join(tally.failed)[:5000] or "none"})


def _in_child(target: Callable[[ChildJob], str], job: ChildJob, parent: tracking.Recorder) -> str:
    """Run `target(job)` in a fresh spawned process and return the run id it reports; raise ChildFailed if it
    failed or died (a run it left RUNNING is closed FAILED, naming the signal). Stopped by Ctrl-C or SIGTERM,
    the sweep stops the child first, which closes its run KILLED. While it runs, the sweep renews its claim."""
    context = multiprocessing.get_context("spawn")
    reader, writer = context.Pipe(duplex=False)
    process = context.Process(target=_child_main, args=(target, job, writer), name="ptq-sweep-child")
    process.start()
    writer.close()  # the child holds the only writer: its exit ends recv()
    stop_beating = threading.Event()
    threading.Thread(target=_heartbeat, args=(parent.client.tracking_uri, job.run_id, stop_beating), daemon=True).start()
    try:
        try:
            kind, value = reader.recv()
        except EOFError:  # it died without a word: a native crash, the OOM killer, os._exit
            kind, value = "died", ""
        process.join()
    except KeyboardInterrupt as exc:
        with _shielded():
            why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if _stop(process, exc.signum if isinstance(exc, Terminated) else signal.SIGINT):
                why += f" (the run's process did not stop within {STOP_GRACE_S:g} s and was killed)"
            try:
                _close_left_running(parent, job, "KILLED", why)
            except Exception as inner:  # the store failed too: the stop is what the sweep reports
                log.warning("could not close the stopped combination's run (%s)", inner)
        raise
    finally:
        stop_beating.set()
        reader.close()
    if kind == "ok":
        return str(value)
    if kind == "died":
        code = process.exitcode or 0
        value = f"child process died of {signal.Signals(-code).name}" if code < 0 else f"child process exited with status {code} without a result"
    _close_left_running(parent, job, "FAILED", value)  # also the claimed run of a child that failed before taking it over
    raise ChildFailed(value)


def _child_main(target: Callable[[ChildJob], str], job: ChildJob, conn: Connection) -> None:
    """A child process: the sweep's store and log level, native crashes traced on stderr, a stop signal closes the
    run once; reports ("ok", run id), or ("error" or "stopped", why) through `conn`."""
    faulthandler.enable()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("ptq").setLevel(job.log_level)
    for sig in STOP_SIGNALS:
        signal.signal(sig, _stop_once)
    mlflow.set_tracking_uri(job.tracking_uri)
    try:
        conn.send(("ok", target(job)))
    except KeyboardInterrupt as exc:  # its run ended KILLED
        conn.send(("stopped", f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__))
    except Exception as exc:  # its run, if it had started, ended FAILED
        conn.send(("error", f"{type(exc).__name__}: {exc}"[:2000]))


def _stop_once(signum: int, _frame: object) -> None:
    """The child's first stop signal raises, as in `ptq run` (KeyboardInterrupt for SIGINT, Terminated else); later
    ones are ignored, so they cannot cut the closing of its run short (Ctrl-C at a terminal reaches it twice:
    from the terminal and passed on by the sweep)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


def _stop(process: multiprocessing.process.BaseProcess, signum: int) -> bool:
    """Pass the sweep's stop signal on to its child and wait for it to close its run; kill it if it has not within
    STOP_GRACE_S. True if it had to be killed."""
    if process.pid is not None and process.is_alive():  # not yet reaped, so its pid is still its own
        os.kill(process.pid, signum)
    process.join(STOP_GRACE_S)
    if process.is_alive():
        process.kill()
        process.join()
        return True
    return False


def _heartbeat(uri: str, run_id: str | None, stop: threading.Event) -> None:
    """Renew the claim on the combination's run every HEARTBEAT_S until `stop` (a lost server just misses beats)."""
    client = MlflowClient(uri)
    while run_id and not stop.wait(HEARTBEAT_S):
        with suppress(Exception):
            tracking.beat(client, run_id)


def _close_left_running(parent: tracking.Recorder, job: ChildJob, status: str, why: str) -> None:
    """Close the combination's run if its child process left it RUNNING (or died before taking it over), with `why`
    as its error (its work folder goes with it)."""
    parent.call(lambda client, experiment_id: tracking.close_left_running(client, experiment_id, f"attributes.run_id = '{job.run_id}'", status, why))


@contextmanager
def _shielded() -> Iterator[None]:
    """Ignore further Ctrl-C, SIGTERM and SIGHUP while a stopped sweep closes its child's run and its own, so an
    impatient second Ctrl-C cannot leave either RUNNING (signals reach only the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)
