"""Upload runs recorded offline (tracking server unreachable) to their server, idempotently."""

from __future__ import annotations

import fcntl
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.tracking import MlflowClient

from ptq import tracking
from ptq.errors import PtqError
from ptq.tracking import LOGGED_MODELS

log = logging.getLogger(__name__)

SOURCE_TAG = "ptq.source_run"  # on the server: the offline run it came from
SYNCED_TAG = "ptq.synced_run_id"  # offline: the server run it became


@dataclass
class SyncResult:
    """Run ids (offline) by what happened to them."""

    uploaded: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)  # still running or interrupted mid-run


def _chunks(items: list, size: int) -> list[list]:  # type: ignore[type-arg]
    return [items[i : i + size] for i in range(0, len(items), size)]


def sync(target: str | None = None) -> SyncResult:
    """Copy every finished offline run (params, tags, logged models, metric histories with steps, timestamps and
    model links, artifacts, status and times) to `target` or the server it was meant for; a run already there is
    never copied twice, even by syncs running at once (here, or on another machine with a copy of the store)."""
    result = SyncResult()
    configured = target or mlflow.get_tracking_uri()
    if configured.startswith(("http://", "https://")):
        tracking.probe(configured)  # wrong credentials are an error even with nothing to upload
    if not (tracking.offline_dir() / "mlflow.db").is_file():
        return result
    local = MlflowClient(tracking_uri=tracking.offline_uri())
    tracking.close_stale_runs(local, [e.experiment_id for e in local.search_experiments()])  # uploaded as KILLED
    remote_ids: dict[str, str] = {}
    for exp in local.search_experiments():
        for listed in local.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"], max_results=50000):
            with _locked(listed.info.run_id):  # another sync of this store waits here, then finds it uploaded
                _sync_run(local, local.get_run(listed.info.run_id), exp.name, target, remote_ids, result)
    return result


@contextmanager
def _locked(run_id: str) -> Iterator[None]:
    """Hold the offline store's lock on run `run_id` (a lock file beside the store, flock): one sync at a time uploads it."""
    folder = tracking.offline_dir() / "locks"
    folder.mkdir(exist_ok=True)
    with open(folder / f"{run_id}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _sync_run(local: MlflowClient, run: Run, experiment: str, target: str | None, remote_ids: dict[str, str], result: SyncResult) -> None:
    """Upload one offline run unless it is uploaded, running, or claimed by another uploader, counting it in `result`."""
    rid, tags = run.info.run_id, run.data.tags
    if SYNCED_TAG in tags:
        remote_ids[rid] = tags[SYNCED_TAG]
        result.already.append(rid)
        return
    if run.info.status == "RUNNING":
        result.waiting.append(rid)
        return
    uri = target or tags.get("ptq.sync_target")
    if not uri:
        raise PtqError(f"offline run {rid} does not say which server it belongs to: pass --target URI")
    if why := tracking.probe(uri):
        raise PtqError(f"tracking server {uri} is still unreachable ({why}): start it and run `ptq sync` again")
    remote = MlflowClient(tracking_uri=uri)
    exp_id = _experiment(remote, experiment)
    partial = _server_run(remote, tags.get(tracking.PARTIAL_TAG))
    if partial is None:
        earlier = remote.search_runs([exp_id], f"tags.`{SOURCE_TAG}` = '{rid}'", max_results=1000)
        done = [r for r in earlier if r.info.status != "RUNNING"]
        if done:
            return _already(local, rid, min(done, key=tracking.claim_order).info.run_id, remote_ids, result)
        if uploading := [r for r in earlier if tracking.claim_alive(r)]:  # by another sync, here or elsewhere
            remote_ids[rid] = min(uploading, key=tracking.claim_order).info.run_id
            result.already.append(rid)
            return
        for cut_off in earlier:
            tracking.discard_run(remote, cut_off.info.run_id, "its upload was cut off; uploaded again")
        new_id, mine = tracking.claim_run(
            remote, exp_id, SOURCE_TAG, rid, {}, lambda r: r.info.status != "RUNNING" or tracking.claim_alive(r), run.info.run_name, run.info.start_time
        )
        if not mine:  # another uploader claimed it first: it is there, or soon will be
            if remote.get_run(new_id).info.status != "RUNNING":
                return _already(local, rid, new_id, remote_ids, result)
            remote_ids[rid] = new_id
            result.already.append(rid)
            return
    try:
        _copy(local, remote, run, exp_id, remote_ids, partial or remote.get_run(new_id), partial is not None)
    except BaseException as exc:
        if partial is None:  # never left behind half uploaded, nor RUNNING in the trash
            tracking.discard_run(remote, new_id, "its upload was stopped")
        if isinstance(exc, KeyboardInterrupt):
            log.warning("ptq sync stopped (%s) while uploading offline run %s: its partial copy was removed from %s; run `ptq sync` again", exc, rid, uri)
        raise
    server_id = partial.info.run_id if partial else new_id
    local.set_tag(rid, SYNCED_TAG, server_id)
    remote_ids[rid] = server_id
    result.uploaded.append(rid)


def _already(local: MlflowClient, rid: str, server_id: str, remote_ids: dict[str, str], result: SyncResult) -> None:
    """Offline run `rid` is on the server already, as `server_id`."""
    local.set_tag(rid, SYNCED_TAG, server_id)
    remote_ids[rid] = server_id
    result.already.append(rid)


def _experiment(remote: MlflowClient, name: str) -> str:
    """The server's experiment `name`, created if needed (by whichever uploader comes first)."""
    found = remote.get_experiment_by_name(name)
    if found is None:
        with suppress(MlflowException):  # another uploader created it first
            remote.create_experiment(name, tags={tracking.KIND_TAG: tracking.KIND})
        found = remote.get_experiment_by_name(name)
        if found is None:
            raise PtqError(f"could not create or find experiment {name!r} on {remote.tracking_uri}")
    return str(found.experiment_id)


def _server_run(remote: MlflowClient, run_id: str | None) -> Run | None:
    """The server's run `run_id`, if it is (still) there."""
    if not run_id:
        return None
    try:
        run = remote.get_run(run_id)
    except MlflowException:
        return None
    return run if run.info.lifecycle_stage == "active" else None


def _upload_model(remote: Any, model: Any, exp_id: str, run_id: str) -> str:
    """Copy an offline logged model (name, type, params, tags, files) to the server as an output of `run_id`; its id there."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus  # type: ignore[attr-defined,unused-ignore]

    new = remote.create_logged_model(exp_id, model.name, run_id, model.tags, model.params, model.model_type)
    with tempfile.TemporaryDirectory(prefix="ptq-sync-") as tmp:
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location, dst_path=tmp))
        meta = Model.load(str(folder))  # it names the offline ids and location: name the server's
        meta.run_id, meta.artifact_path, meta.model_uuid, meta.model_id = run_id, new.artifact_location, new.model_id, new.model_id
        meta.save(str(folder / "MLmodel"))
        remote.log_model_artifacts(new.model_id, str(folder))
    remote.finalize_logged_model(new.model_id, LoggedModelStatus.READY)
    remote.log_outputs(run_id, [LoggedModelOutput(new.model_id, step=0)])
    return new.model_id


def _copy_models(local: Any, remote: Any, run: Run, exp_id: str, new_id: str, partial: bool) -> dict[tuple[str, int, int, float], str]:
    """Upload the offline run's finished logged models to server run `new_id`, and return the server model each
    linked metric point (key, timestamp, step, value) belongs to. Completing a server run lost mid-run keeps the
    models it finished before the loss (by name) and drops those it left unfinished."""
    if not LOGGED_MODELS:
        return {}
    from mlflow.entities import LoggedModelStatus  # type: ignore[attr-defined,unused-ignore]

    have: dict[str, str] = {}
    for model in tracking.logged_models(remote, exp_id, new_id) if partial else []:
        if model.status == LoggedModelStatus.READY:
            have[model.name] = model.model_id
        else:
            remote.delete_logged_model(model.model_id)
    links = {}
    for model in tracking.logged_models(local, run.info.experiment_id, run.info.run_id):
        if model.status != LoggedModelStatus.READY:
            continue
        server_id = have.get(model.name) or _upload_model(remote, model, exp_id, new_id)
        links.update({(m.key, m.timestamp, m.step, m.value): server_id for m in model.metrics or []})
    return links


def _copy(local: MlflowClient, remote: MlflowClient, run: Run, exp_id: str, remote_ids: dict[str, str], server: Run, partial: bool) -> None:
    """Upload an offline run into server run `server`: the one claimed for it, or the server run it continues after the
    server was lost mid-run (tag ptq.partial_of), to which only what the server does not have yet is added. The
    claim is renewed between steps, so uploaders on other machines see that this one lives."""
    rid, new_id = run.info.run_id, server.info.run_id
    tags = {k: v for k, v in run.data.tags.items() if k not in ("ptq.sync_target", SYNCED_TAG, tracking.PARTIAL_TAG)}
    if "mlflow.parentRunId" in tags:
        tags["mlflow.parentRunId"] = remote_ids.get(tags["mlflow.parentRunId"], tags["mlflow.parentRunId"])
    have_params = server.data.params if partial else {}
    # owned by this process while it uploads: a run closing stale runs on this machine leaves it alone, unless we die
    remote.log_batch(new_id, tags=[RunTag(k, v) for k, v in {**tags, SOURCE_TAG: rid, tracking.PROCESS_TAG: tracking.process_id()}.items()])
    for batch in _chunks([Param(k, v) for k, v in run.data.params.items() if k not in have_params], 100):
        remote.log_batch(new_id, params=batch)
    links = _copy_models(local, remote, run, exp_id, new_id, partial)
    tracking.beat(remote, new_id)
    metrics = []
    for key in run.data.metrics:
        there = {(m.step, m.timestamp, m.value) for m in remote.get_metric_history(new_id, key)} if partial else set()
        metrics += [
            Metric(m.key, m.value, m.timestamp, m.step, **({"model_id": links.get((m.key, m.timestamp, m.step, m.value))} if LOGGED_MODELS else {}))
            for m in local.get_metric_history(rid, key)
            if (m.step, m.timestamp, m.value) not in there
        ]
    for batch in _chunks(metrics, 1000):
        remote.log_batch(new_id, metrics=batch)
    tracking.beat(remote, new_id)
    with tempfile.TemporaryDirectory(prefix="ptq-sync-") as tmp:
        if local.list_artifacts(rid):
            remote.log_artifacts(new_id, local.download_artifacts(rid, "", tmp))
    remote.set_terminated(new_id, run.info.status, run.info.end_time)
    log.info("uploaded offline run %s %s %s", rid, "completing server run" if partial else "as", new_id)
