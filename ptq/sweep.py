"""Grids of runs (models x precisions x backends [x calibration methods]) as child runs of one parent,
resumable: a combination that already FINISHED on this machine, with the same parameters, data, ptq commit
and library versions, is skipped."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from dataclasses import dataclass, replace

import mlflow
from mlflow.tracking import MlflowClient

from ptq import data, pipeline, tracking
from ptq.backends import PRECISIONS
from ptq.config import RunConfig
from ptq.errors import PtqError
from ptq.models import resolve
from ptq.progress import track

log = logging.getLogger(__name__)

PRESETS: dict[str, tuple[str, ...]] = {
    "study": ("mob-s", "mob-l", "r18", "r50", "d169", "d201"),  # the seed study's six CNNs
    "edge-lite": ("lite0", "lite1", "lite2"),  # real weights that install offline
}


@dataclass
class SweepResult:
    """What a sweep did, combination by combination."""

    parent_run_id: str
    passed: list[str]
    failed: list[str]
    skipped: list[str]


def combinations(models: list[str], precisions: list[str], backends: list[str], calib_methods: list[str]) -> list[dict[str, str]]:
    """The grid, in a stable order; calibration methods vary only for int8."""
    grid = []
    for model, precision, backend in itertools.product(models, precisions, backends):
        for method in calib_methods if precision == "int8" else calib_methods[:1]:
            grid.append({"model": model, "precision": precision, "backend": backend, "calib_method": method})
    return grid


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _configure(base: RunConfig, combo: dict[str, str]) -> RunConfig:
    return replace(base, model=combo["model"], precision=combo["precision"], backend=combo["backend"], quant=replace(base.quant, calib_method=combo["calib_method"]))


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


def run_sweep(
    name: str,
    base: RunConfig,
    models: list[str],
    precisions: list[str] | None = None,
    backends: list[str] | None = None,
    calib_methods: list[str] | None = None,
) -> SweepResult:
    """Run every combination as a child of one parent run; rerunning resumes where the last attempt stopped."""
    grid = combinations(models, precisions or list(PRECISIONS), backends or ["ort"], calib_methods or [base.quant.calib_method])
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
            for combo in track(grid, total=len(grid), description=f"sweep {name}", enabled=base.progress):
                label = "/".join(combo.values())
                combo_key = _key(identity, combo, key_params)
                earlier = client.search_runs([experiment_id], f"tags.`ptq.combo_key` = '{combo_key}'")
                if any(r.info.status == "FINISHED" for r in earlier):
                    skipped.append(label)
                    continue
                for stale in earlier:  # failed, killed or cut off by power loss: superseded by this attempt
                    client.delete_run(stale.info.run_id)
                try:
                    pipeline.run(_configure(base, combo), {"ptq.sweep": name, "ptq.combo_key": combo_key})
                    passed.append(label)
                except Exception as exc:  # one failed combination does not stop the others
                    log.warning("sweep %s: %s failed: %s", name, label, exc)
                    failed.append(label)
        except BaseException as exc:  # Ctrl-C (KILLED, like its interrupted child) or a lost store: rerun to resume
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
