"""Everything MLflow: reachability, the device fingerprint, run lifecycle and metric logging."""

from __future__ import annotations

import logging
import os
import platform
import re
import socket
import subprocess
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import mlflow
import psutil
from mlflow.tracking import MlflowClient

from ptq.errors import PtqError

log = logging.getLogger(__name__)

LIBRARIES = ("torch", "torchvision", "onnx", "onnxruntime", "mlflow", "numpy", "tensorrt", "jetson-stats")


def probe(uri: str) -> str | None:
    """None if the tracking server at `uri` answers; else why not. Wrong credentials raise at once."""
    # a refused connection fails in seconds; a busy server (many devices at once) gets time to answer
    limits = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
    saved = {k: os.environ.get(k) for k in limits}
    os.environ.update(limits)
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        return None
    except Exception as exc:
        msg = str(exc).splitlines()[0][:160]
        text = str(exc)
        denied = getattr(exc, "error_code", "") in ("UNAUTHENTICATED", "PERMISSION_DENIED")
        if denied or re.search(r"error code 40[13]\b|Unauthorized|not authenticated", text):
            raise PtqError(
                f"tracking server {uri} refused the credentials: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
            ) from None
        return msg
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def check_reachable() -> None:
    """Fail fast, before any work, if the tracking server cannot be reached (for reading: report, sync)."""
    uri = mlflow.get_tracking_uri()
    if _is_server(uri) and (why := probe(uri)):
        raise PtqError(f"tracking server {uri} is unreachable ({why}): start it, or unset MLFLOW_TRACKING_URI to use the local store")


def offline_dir() -> Path:
    """Where runs wait while the tracking server is unreachable: $PTQ_CACHE_DIR/offline."""
    from ptq.data import cache_dir

    return cache_dir() / "offline"


def offline_uri() -> str:
    """The offline store's tracking URI (SQLite)."""
    return f"sqlite:///{offline_dir() / 'mlflow.db'}"


_sync_target: str | None = None  # the unreachable server this process's runs are waiting for


def offline_tags() -> dict[str, str]:
    """`ptq.sync_target` for runs recorded offline, so `ptq sync` knows where they belong."""
    return {"ptq.sync_target": _sync_target} if _sync_target and mlflow.get_tracking_uri() == offline_uri() else {}


def select_store() -> str | None:
    """Keep the configured store if it answers; if a server is unreachable, switch this process to the
    offline store and return the server's URI (runs are tagged with it and `ptq sync` uploads them later)."""
    uri = mlflow.get_tracking_uri()
    if not _is_server(uri) or not (why := probe(uri)):
        return None
    offline_dir().mkdir(parents=True, exist_ok=True)
    log.warning("tracking server %s is unreachable (%s): recording locally in %s; run `ptq sync` when it is back", uri, why, offline_dir())
    mlflow.set_tracking_uri(offline_uri())
    global _sync_target
    _sync_target = uri
    return uri


def under_mlflow_run() -> bool:
    """True inside `mlflow run`, whose project run (MLFLOW_RUN_ID) is adopted rather than a new one opened
    in an experiment of ptq's choosing (MLflow refuses a run outside the experiment it was started in)."""
    return bool(os.environ.get("MLFLOW_RUN_ID"))


def set_experiment(name: str) -> str:
    """Activate experiment `name`, creating it if needed, and return its id. Safe when many devices create it
    at once (mlflow.set_experiment can then leave a loser in 'Default'); offline, artifacts live beside the database."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = (offline_dir() / "artifacts" / name).as_uri() if mlflow.get_tracking_uri() == offline_uri() else None
        try:
            client.create_experiment(name, artifact_location=location)
        except mlflow.exceptions.MlflowException:  # another device created it first
            pass
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise PtqError(f"could not create or find experiment {name!r} on {mlflow.get_tracking_uri()}")
    mlflow.set_experiment(experiment_id=experiment.experiment_id)
    return str(experiment.experiment_id)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> str:
    """The Jetson board's model, else NVML's name of GPU 0, else 'none'."""
    jetson = Path("/proc/device-tree/model")
    if jetson.is_file():
        return jetson.read_text().strip("\x00\n ")
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return str(pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0)))
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return "none"


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def fingerprint() -> dict[str, str]:
    """Tags that identify the device and software a run measured, so runs from many devices can be compared.
    `PTQ_DEVICE_NAME` names the device where host names are not telling (`xavier-lab-2`)."""
    tags = {
        "device.host": os.environ.get("PTQ_DEVICE_NAME") or socket.gethostname(),
        "device.cpu": _cpu_model(),
        "device.cores": str(psutil.cpu_count(logical=True)),
        "device.ram_gb": f"{psutil.virtual_memory().total / 2**30:.1f}",
        "device.gpu": gpu_name(),
        "device.os": platform.platform(),
        "device.arch": platform.machine(),
        "version.python": platform.python_version(),
        "ptq.commit": _commit(),
    }
    for lib in LIBRARIES:
        try:
            tags[f"version.{lib}"] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            pass
    return tags


def new_params(run_id: str, params: dict[str, str]) -> dict[str, str]:
    """Params not yet on the run. Under `mlflow run` the MLproject parameters are already logged as the user
    typed them; where ptq's reading differs it is logged beside them as `resolved.<name>`."""
    existing = MlflowClient().get_run(run_id).data.params
    out = {k: v for k, v in params.items() if k not in existing}
    out.update({f"resolved.{k}": v for k, v in params.items() if k in existing and existing[k].strip("'") != v})
    return out


@contextmanager
def run(experiment: str, run_name: str, params: dict[str, str], tags: dict[str, str]) -> Iterator[mlflow.ActiveRun]:
    """Open a run (nested under the active one in a sweep; adopted under `mlflow run`); on error mark it
    FAILED (KILLED on Ctrl-C) with the error, keeping all logged so far."""
    nested = mlflow.active_run() is not None  # a sweep's child run
    if not nested and not under_mlflow_run():
        set_experiment(experiment)
    with mlflow.start_run(run_name=run_name, nested=nested) as active:
        mlflow.set_tags({**fingerprint(), **offline_tags(), **tags})
        mlflow.log_params(new_params(active.info.run_id, params))
        try:
            yield active
        except BaseException as exc:
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            mlflow.set_tag("ptq.error", f"{type(exc).__name__}: {exc}"[:5000])
            mlflow.log_text("".join(traceback.format_exception(exc)), "error.txt")
            mlflow.end_run(status=status)
            raise
