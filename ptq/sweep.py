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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection

import mlflow
from mlflow.tracking import MlflowClient

from ptq import data, pipeline, tracking
from ptq.backends import PRECISIONS
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
    """One combination as its child process gets it: the run's config and tags, the sweep's run, the store to
    log to and the `ptq` log level (a spawned process inherits neither mlflow's nor logging's settings)."""

    cfg: RunConfig
    tags: dict[str, str]
    parent_run_id: str
    tracking_uri: str
    log_level: int


class ChildFailed(Exception):
    """A combination's child process failed (its run, if any, is closed on the store) or died."""


@dataclass
class SweepResult:
    """What a sweep did, combination by combination."""

    parent_run_id: str
    passed: list[str]
    failed: list[str]
    skipped: list[str]


def combinations(models: list[str], precisions: list[str], backends: list[str], calib_methods: list[str]) -> list[dict[str, str]]:
    """The grid, in a stable order; calibration methods vary only for int8 ("" = the backend's default)."""
    grid = []
    for model, precision, backend in itertools.product(models, precisions, backends):
        for method in calib_methods if precision == "int8" else [""]:
            grid.append({"model": model, "precision": precision, "backend": backend, "calib_method": method})
    return grid


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _configure(base: RunConfig, combo: dict[str, str]) -> RunConfig:
    options = {**base.options, **({"calib_method": combo["calib_method"]} if combo["calib_method"] else {})}
    return replace(base, model=combo["model"], precision=combo["precision"], backend=combo["backend"], options=options)


def resume_identity(fingerprint: dict[str, str], data_hash: str) -> dict[str, object]:
    """What must match for a finished run to stand for a combination: the device (its name, which reports key on,
    and its machine id, which tells apart machines with one host name), the data's content, ptq's commit and
    the library versions; a new commit, library or image set measures something new."""
    return {
        "device": fingerprint["device.name"],
        "machine_id": fingerprint["device.machine_id"],
        "commit": fingerprint["ptq.commit"],
        "versions": {k: v for k, v in fingerprint.items() if k.startswith("version.")},
        "data_hash": data_hash,
    }


def run_child(job: ChildJob) -> str:
    """What each child process runs by default: the combination's run, a child of the sweep's run; returns its id."""
    return pipeline.run(job.cfg, job.tags, job.parent_run_id)


def run_sweep(
    name: str,
    base: RunConfig,
    models: list[str],
    precisions: list[str] | None = None,
    backends: list[str] | None = None,
    calib_methods: list[str] | None = None,
    *,
    target: Callable[[ChildJob], str] = run_child,
) -> SweepResult:
    """Run every combination as a child of one parent run, each in a fresh process (so a native crash costs one
    combination, and peak memory is each run's own); rerunning resumes where the last attempt stopped. `target`
    is what each child runs: a module-level function, as the spawned process imports it by name."""
    grid = combinations(models, precisions or list(PRECISIONS), backends or ["ort"], calib_methods or [base.options.get("calib_method", "")])
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
    identity = resume_identity(fingerprint, data_hash)
    run_params = {k: v for k, v in base.params().items() if k not in ("model", "precision", "backend", "calib_method", "experiment")}
    key_params = {k: v for k, v in run_params.items() if k != "data"}  # the same images elsewhere are the same data
    sweep_key = _key(name, identity, grid, key_params)
    client = MlflowClient()
    parent_id = None
    if not tracking.under_mlflow_run():  # under `mlflow run -e sweep`, the project's run is the parent
        experiment_id = tracking.set_experiment(base.experiment)
        previous = client.search_runs([experiment_id], f"tags.`ptq.sweep_key` = '{sweep_key}'", max_results=1)
        parent_id = previous[0].info.run_id if previous else None
    passed: list[str] = []
    failed: list[str] = []
    skipped: list[str] = []
    with mlflow.start_run(run_id=parent_id, run_name=None if parent_id else f"sweep-{name}") as parent:
        experiment_id = parent.info.experiment_id
        if not parent_id:
            mlflow.set_tags({**fingerprint, **tracking.offline_tags(), "ptq.sweep": name, "ptq.sweep_key": sweep_key})
            params = {**run_params, "sweep": name, "data_hash": data_hash, "grid": json.dumps(grid)[:6000], "combinations": str(len(grid))}
            mlflow.log_params(tracking.new_params(parent.info.run_id, params))
        try:
            for number, combo in enumerate(grid, 1):
                label = "/".join(v for v in combo.values() if v)
                combo_key = _key(identity, combo, key_params)
                earlier = client.search_runs([experiment_id], f"tags.`ptq.combo_key` = '{combo_key}'")
                if any(r.info.status == "FINISHED" for r in earlier):
                    skipped.append(label)
                    continue
                for stale in earlier:  # failed, killed or cut off by power loss: superseded by this attempt
                    client.delete_run(stale.info.run_id)
                # the fingerprint the resume key was made of, so every run's tags match its key
                tags = {**fingerprint, **tracking.offline_tags(), "ptq.sweep": name, "ptq.combo_key": combo_key}
                job = ChildJob(_configure(base, combo), tags, parent.info.run_id, mlflow.get_tracking_uri(), logging.getLogger("ptq").getEffectiveLevel())
                log.info("sweep %s %d/%d: %s", name, number, len(grid), label)
                try:
                    run_id = _in_child(target, job, client, experiment_id)
                    log.info("sweep %s: %s finished as run %s", name, label, run_id)
                    passed.append(label)
                except ChildFailed as exc:  # one failed combination does not stop the others
                    log.warning("sweep %s: %s failed: %s", name, label, exc)
                    failed.append(label)
        except BaseException as exc:  # Ctrl-C, SIGTERM (KILLED, like its stopped child) or a lost store: rerun to resume
            with _shielded():
                _log_counts(grid, passed, failed, skipped)
                mlflow.end_run(status="KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
        _log_counts(grid, passed, failed, skipped)
        return SweepResult(parent.info.run_id, passed, failed, skipped)


def _log_counts(grid: list[dict[str, str]], passed: list[str], failed: list[str], skipped: list[str]) -> None:
    """The parent's tally: how many combinations finished, ran now, were skipped or failed."""
    mlflow.log_metrics(
        {"sweep/total": len(grid), "sweep/finished": len(skipped) + len(passed), "sweep/ran": len(passed), "sweep/skipped": len(skipped), "sweep/failed": len(failed)}
    )
    mlflow.set_tag("ptq.sweep_failed", ", ".join(failed)[:5000] or "none")


def _in_child(target: Callable[[ChildJob], str], job: ChildJob, client: MlflowClient, experiment_id: str) -> str:
    """Run `target(job)` in a fresh spawned process and return the run id it reports; raise ChildFailed if it
    failed or died (a run it left RUNNING is closed FAILED, naming the signal). Stopped by Ctrl-C or SIGTERM,
    the sweep stops the child first, which closes its run KILLED."""
    context = multiprocessing.get_context("spawn")
    reader, writer = context.Pipe(duplex=False)
    process = context.Process(target=_child_main, args=(target, job, writer), name="ptq-sweep-child")
    process.start()
    writer.close()  # the child holds the only writer: its exit ends recv()
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
                _close_left_running(client, experiment_id, job, process.pid, "KILLED", why)
            except Exception as inner:  # the store failed too: the stop is what the sweep reports
                log.warning("could not close the stopped combination's run (%s)", inner)
        raise
    finally:
        reader.close()
    if kind == "ok":
        return str(value)
    if kind == "died":
        code = process.exitcode or 0
        value = f"child process died of {signal.Signals(-code).name}" if code < 0 else f"child process exited with status {code} without a result"
        _close_left_running(client, experiment_id, job, process.pid, "FAILED", value)
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


def _close_left_running(client: MlflowClient, experiment_id: str, job: ChildJob, pid: int | None, status: str, why: str) -> None:
    """Close the run that the child process `pid` left RUNNING for this combination, if any, with `why` as its error."""
    query = f"tags.`ptq.combo_key` = '{job.tags['ptq.combo_key']}' and attributes.status = 'RUNNING' and tags.`{tracking.PROCESS_TAG}` LIKE '{pid}:%'"
    for run in client.search_runs([experiment_id], query):
        client.set_tag(run.info.run_id, "ptq.error", why)
        client.set_terminated(run.info.run_id, status)
        log.warning("run %s %s (%s)", run.info.run_id, status, why)


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
