"""Everything MLflow: reachability, the device fingerprint, run lifecycle and metric logging."""

from __future__ import annotations

import logging
import os
import platform
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


def check_reachable() -> None:
    """Fail fast, before any work, if the tracking server cannot be reached."""
    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    try:
        MlflowClient().search_experiments(max_results=1)
    except Exception as exc:
        msg = str(exc).splitlines()[0][:160]
        if "401" in msg or "403" in msg or "Unauthorized" in msg:
            raise PtqError(f"tracking server {uri} refused the credentials: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD") from None
        raise PtqError(f"tracking server {uri} is unreachable ({msg}): start it, or unset MLFLOW_TRACKING_URI to log to the local store") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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


def _new_params(run_id: str, params: dict[str, str]) -> dict[str, str]:
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
    if not nested and not os.environ.get("MLFLOW_RUN_ID"):
        mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name, nested=nested) as active:
        mlflow.set_tags({**fingerprint(), **tags})
        mlflow.log_params(_new_params(active.info.run_id, params))
        try:
            yield active
        except BaseException as exc:
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            mlflow.set_tag("ptq.error", f"{type(exc).__name__}: {exc}"[:5000])
            mlflow.log_text("".join(traceback.format_exception(exc)), "error.txt")
            mlflow.end_run(status=status)
            raise
