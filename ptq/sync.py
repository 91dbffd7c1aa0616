"""Upload runs recorded offline (tracking server unreachable) to their server, idempotently."""

from __future__ import annotations

import logging
import tempfile
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
    never copied twice."""
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
        for run in local.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"], max_results=50000):
            rid, tags = run.info.run_id, run.data.tags
            if SYNCED_TAG in tags:
                remote_ids[rid] = tags[SYNCED_TAG]
                result.already.append(rid)
                continue
            if run.info.status == "RUNNING":
                result.waiting.append(rid)
                continue
            uri = target or tags.get("ptq.sync_target")
            if not uri:
                raise PtqError(f"offline run {rid} does not say which server it belongs to: pass --target URI")
            if why := tracking.probe(uri):
                raise PtqError(f"tracking server {uri} is still unreachable ({why}): start it and run `ptq sync` again")
            remote = MlflowClient(tracking_uri=uri)
            remote_exp = remote.get_experiment_by_name(exp.name)
            exp_id = remote_exp.experiment_id if remote_exp else remote.create_experiment(exp.name)
            earlier = remote.search_runs([exp_id], f"tags.`{SOURCE_TAG}` = '{rid}'")
            done = [r for r in earlier if r.info.status != "RUNNING"]
            for cut_off in (r for r in earlier if r.info.status == "RUNNING" and r.info.run_id != tags.get(tracking.PARTIAL_TAG)):
                for model in _models(remote, exp_id, cut_off.info.run_id):
                    remote.delete_logged_model(model.model_id)  # type: ignore[attr-defined]
                remote.delete_run(cut_off.info.run_id)  # a copy whose sync was cut off midway
            new_id = done[0].info.run_id if done else _copy(local, remote, run, exp_id, remote_ids)
            local.set_tag(rid, SYNCED_TAG, new_id)
            remote_ids[rid] = new_id
            (result.already if done else result.uploaded).append(rid)
    return result


def _server_run(remote: MlflowClient, run_id: str | None) -> Run | None:
    """The server's run `run_id`, if it is (still) there."""
    if not run_id:
        return None
    try:
        return remote.get_run(run_id)
    except MlflowException:
        return None


def _models(client: Any, experiment_id: str, run_id: str) -> list[Any]:
    """The logged models that run `run_id` produced (none with MLflow 2, whose models are among the run's artifacts)."""
    if not LOGGED_MODELS:
        return []
    return list(client.search_logged_models([experiment_id], f"source_run_id = '{run_id}'", max_results=1000))


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
    for model in _models(remote, exp_id, new_id) if partial else []:
        if model.status == LoggedModelStatus.READY:
            have[model.name] = model.model_id
        else:
            remote.delete_logged_model(model.model_id)
    links = {}
    for model in _models(local, run.info.experiment_id, run.info.run_id):
        if model.status != LoggedModelStatus.READY:
            continue
        server_id = have.get(model.name) or _upload_model(remote, model, exp_id, new_id)
        links.update({(m.key, m.timestamp, m.step, m.value): server_id for m in model.metrics or []})
    return links


def _copy(local: MlflowClient, remote: MlflowClient, run: Run, exp_id: str, remote_ids: dict[str, str]) -> str:
    """Upload an offline run; one that continues a server run lost mid-run (tag ptq.partial_of) completes that
    run, adding only what the server does not have yet."""
    rid = run.info.run_id
    tags = {k: v for k, v in run.data.tags.items() if k not in ("ptq.sync_target", SYNCED_TAG, tracking.PARTIAL_TAG)}
    if "mlflow.parentRunId" in tags:
        tags["mlflow.parentRunId"] = remote_ids.get(tags["mlflow.parentRunId"], tags["mlflow.parentRunId"])
    partial = _server_run(remote, run.data.tags.get(tracking.PARTIAL_TAG))
    if partial is not None:
        new_id, have_params = partial.info.run_id, partial.data.params
    else:
        new_id, have_params = remote.create_run(exp_id, start_time=run.info.start_time, run_name=run.info.run_name).info.run_id, {}
    remote.log_batch(new_id, tags=[RunTag(k, v) for k, v in {**tags, SOURCE_TAG: rid}.items()])
    for batch in _chunks([Param(k, v) for k, v in run.data.params.items() if k not in have_params], 100):
        remote.log_batch(new_id, params=batch)
    links = _copy_models(local, remote, run, exp_id, new_id, partial is not None)
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
    with tempfile.TemporaryDirectory(prefix="ptq-sync-") as tmp:
        if local.list_artifacts(rid):
            remote.log_artifacts(new_id, local.download_artifacts(rid, "", tmp))
    remote.set_terminated(new_id, run.info.status, run.info.end_time)
    log.info("uploaded offline run %s %s %s", rid, "completing server run" if partial else "as", new_id)
    return new_id
