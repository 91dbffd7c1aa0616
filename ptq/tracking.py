"""Everything MLflow: reachability, the device fingerprint, run lifecycle and metric logging."""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import inspect
import logging
import os
import platform
import re
import shutil
import socket
import subprocess
import tempfile
import time
import traceback
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import mlflow
import mlflow.onnx
import numpy as np
import onnx
import psutil
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec

from ptq import disk
from ptq.errors import PtqError

if TYPE_CHECKING:
    import pandas as pd

# MLflow 3 logs models as LoggedModels and links metrics to them; MLflow 2 (the last for Python 3.8, on JetPack 5)
# has neither: there a model is an MLflow 2 model among the run's artifacts (`runs:/<run>/models/<name>`).
LOGGED_MODELS = hasattr(MlflowClient, "create_logged_model")

log = logging.getLogger(__name__)

LIBRARIES = ("torch", "torchvision", "onnx", "onnxruntime", "mlflow", "numpy", "tensorrt", "jetson-stats")


RETRY_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def limit_retries() -> None:
    """MLflow retries a request 7 times with exponential backoff, minutes per call against a lost server; ptq
    allows 2 retries with a 1 s backoff factor and a 30 s timeout (about 3 s when the connection is refused, at
    most about 95 s when the server hangs), unless the user set these variables."""
    for key, value in RETRY_LIMITS.items():
        os.environ.setdefault(key, value)


def probe(uri: str) -> str | None:
    """None if the tracking server at `uri` answers (within the retry budget); else why not. Wrong credentials raise at once."""
    limit_retries()
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        return None
    except Exception as exc:
        text = str(exc)
        denied = getattr(exc, "error_code", "") in ("UNAUTHENTICATED", "PERMISSION_DENIED")
        if denied or re.search(r"error code 40[13]\b|Unauthorized|not authenticated", text):
            raise PtqError(
                f"tracking server {uri} refused the credentials: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
            ) from None
        return text.splitlines()[0][:160] if text else type(exc).__name__


def _is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def check_reachable() -> None:
    """Fail fast, before any work, if the tracking server cannot be reached or a local store opened (for reading: report, sync)."""
    uri = mlflow.get_tracking_uri()
    if _is_server(uri) and (why := probe(uri)):
        raise PtqError(f"tracking server {uri} is unreachable ({why}): start it, or unset MLFLOW_TRACKING_URI to use the local store")
    if not _is_server(uri):
        _open_local(uri)


def _open_local(uri: str) -> None:
    """Open a local store once, so that one MLflow refuses is one line: MLflow 3 keeps its file store
    (`file:///…/mlruns` or a plain folder) behind MLFLOW_ALLOW_FILE_STORE=true."""
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except mlflow.exceptions.MlflowException as exc:
        if "MLFLOW_ALLOW_FILE_STORE" not in str(exc):
            raise
        raise PtqError(
            f"MLFLOW_TRACKING_URI={uri} is MLflow's file store, which MLflow {mlflow.__version__} opens only with "
            "MLFLOW_ALLOW_FILE_STORE=true: set that, or use a database store such as sqlite:///mlflow.db "
            "(`mlflow migrate-filestore` moves existing runs into one)"
        ) from None


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


def ready_store(uri: str) -> None:
    """Create a local SQLite store under a lock file beside it: MLflow creates and migrates a new store on first
    use, and several processes doing that at once break it (alembic's `_alembic_tmp_*` tables)."""
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri[len("sqlite:///") :])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


def _go_offline(server: str) -> None:
    """Send this process's runs to the offline store, tagged with the server they belong to."""
    global _sync_target
    ready_store(offline_uri())
    mlflow.set_tracking_uri(offline_uri())
    _sync_target = server


def select_store() -> str | None:
    """Keep the configured store if it answers; if a server is unreachable, switch this process to the
    offline store and return the server's URI (runs are tagged with it and `ptq sync` uploads them later)."""
    uri = mlflow.get_tracking_uri()
    if not _is_server(uri):
        ready_store(uri) if uri.startswith("sqlite:///") else _open_local(uri)
        return None
    if not (why := probe(uri)):
        return None
    log.warning("tracking server %s is unreachable (%s): recording locally in %s; run `ptq sync` when it is back", uri, why, offline_dir())
    _go_offline(uri)
    return uri


def local_artifact_dir(experiment: str) -> Path | None:
    """Where a local store keeps the experiment's artifacts (MLflow's default: ./mlruns), or None for a server."""
    uri = mlflow.get_tracking_uri()
    if _is_server(uri):
        return None
    existing = MlflowClient().get_experiment_by_name(experiment)
    location = existing.artifact_location if existing else "mlruns"
    parsed = urllib.parse.urlparse(location)
    return Path(parsed.path) if parsed.scheme in ("file", "") else None


def search_study_runs(experiments: list[str], filter_string: str) -> pd.DataFrame:
    """Runs matching `filter_string`, newest first, as MLflow's DataFrame plus column `experiment` (its name): from the
    experiments named, or from every active experiment where none is (`mlflow run` files runs in 'Default')."""
    import pandas as pd

    if experiments:
        found = {name: mlflow.get_experiment_by_name(name) for name in experiments}
        missing = [name for name, e in found.items() if e is None]
        if missing:
            raise PtqError(f"no experiment named {', '.join(missing)}: check --experiments, or leave it empty to read every experiment")
        names = {e.experiment_id: e.name for e in found.values() if e is not None}
    else:
        names = {e.experiment_id: e.name for e in mlflow.search_experiments()}
    runs = mlflow.search_runs(experiment_ids=list(names), filter_string=filter_string, order_by=["attributes.start_time DESC"])
    if not isinstance(runs, pd.DataFrame) or runs.empty:  # search_runs returns a DataFrame unless asked otherwise
        return pd.DataFrame()
    runs["experiment"] = runs["experiment_id"].map(names)
    return runs


def download_artifact(run_id: str, path: str, folder: Path) -> None:
    """Download the run's artifact `path` into `folder` (a file lands there under its base name)."""
    mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(folder))


def download_models(run_id: str, folder: Path) -> dict[str, Path]:
    """The run's logged models, each downloaded into `folder/<name>` (an ONNX one as `model.onnx`, any other file as
    it was, with its files): LoggedModels (`models:/<id>`) on MLflow 3, the run's `models/<name>` on MLflow 2."""
    client = MlflowClient()
    if LOGGED_MODELS:
        experiment_id = client.get_run(run_id).info.experiment_id
        found: Any = client.search_logged_models([experiment_id], f"source_run_id = '{run_id}'")  # type: ignore[attr-defined,unused-ignore]
        uris = {m.name: f"models:/{m.model_id}" for m in found}
    else:
        uris = {Path(a.path).name: f"runs:/{run_id}/{a.path}" for a in client.list_artifacts(run_id, "models")}
    return {name: Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(folder / name))) for name, uri in uris.items()}


def log_report(params: dict[str, str], files: list[Path]) -> str:
    """Log a report's files as a run named `report` (ptq.kind=report) in experiment ptq-reports, or under `mlflow run
    -e report` as that project run; return its id."""
    if not under_mlflow_run():
        set_experiment("ptq-reports")
    with mlflow.start_run(run_name="report") as active:
        client = MlflowClient()
        if under_mlflow_run():
            name_run(client, active.info.run_id, "report")
        mlflow.log_params(new_params(active.info.run_id, params))
        mlflow.set_tag("ptq.kind", "report")
        for f in files:
            mlflow.log_artifact(str(f))
        return str(active.info.run_id)


def stored_run(run_id: str) -> Run:
    """A run as the store has it now (this process's store: the offline one if the server was lost)."""
    return MlflowClient().get_run(run_id)


def child_runs(parent_run_id: str) -> list[Run]:
    """A sweep's child runs, oldest first."""
    client = MlflowClient()
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    query = f"tags.`mlflow.parentRunId` = '{parent_run_id}'"
    return list(client.search_runs([experiment_id], query, order_by=["attributes.start_time ASC"], max_results=10000))


def where_to_look(run: Run) -> str:
    """How to open a run: its page on a server, or the `mlflow ui` command for a local store; in MLflow 3's "Model
    training" view, which its UI takes from the page's `workflowType`, not from the experiment's kind (3.17.2)."""
    uri = mlflow.get_tracking_uri()
    page = f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}" + ("?workflowType=machine_learning" if LOGGED_MODELS else "")
    if _is_server(uri):
        return f"{uri.rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {uri}  →  http://127.0.0.1:5000/{page}"


def under_mlflow_run() -> bool:
    """True inside `mlflow run`, whose project run (MLFLOW_RUN_ID) is adopted rather than a new one opened
    in an experiment of ptq's choosing (MLflow refuses a run outside the experiment it was started in)."""
    return bool(os.environ.get("MLFLOW_RUN_ID"))


# The experiment tag MLflow 3's UI reads and writes for an experiment's kind (its experiment-kind selector; the demo
# sets "genai_development"): mlflow/server/js/build/static/js (ExperimentKind, "mlflow.experimentKind").
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"


def set_experiment(name: str) -> str:
    """Activate experiment `name`, creating it if needed, and return its id. Safe when many devices create it
    at once (mlflow.set_experiment can then leave a loser in 'Default'); offline, artifacts live beside the database."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = (offline_dir() / "artifacts" / name).as_uri() if mlflow.get_tracking_uri() == offline_uri() else None
        try:
            client.create_experiment(name, artifact_location=location, tags={KIND_TAG: KIND})
        except mlflow.exceptions.MlflowException:  # another device created it first
            pass
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise PtqError(f"could not create or find experiment {name!r} on {mlflow.get_tracking_uri()}")
    if KIND_TAG not in experiment.tags:  # made before ptq declared its kind, or by someone else
        client.set_experiment_tag(experiment.experiment_id, KIND_TAG, KIND)
    mlflow.set_experiment(experiment_id=experiment.experiment_id)
    return str(experiment.experiment_id)


def mark_model_experiment(client: MlflowClient, experiment_id: str) -> None:
    """Declare an experiment that holds ptq runs one of model development (MLflow 3's "Machine learning" kind, not
    GenAI), unless someone chose its kind already (`mlflow run` files runs in experiments ptq did not create)."""
    if KIND_TAG not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, KIND_TAG, KIND)


# MLflow's own run names (mlflow/utils/name_utils.py: predicate-noun-number), which ptq replaces with its own
_GENERATED_NAME = re.compile(r"[a-z]+-[a-z]+-\d{1,4}")


def name_run(client: MlflowClient, run_id: str, name: str) -> None:
    """Give a run that `mlflow run` opened (MLflow's random name, e.g. gentle-snake-11) ptq's name for it; a name
    the user chose (`mlflow run --run-name`) stays."""
    if _GENERATED_NAME.fullmatch(client.get_run(run_id).info.run_name or ""):
        client.set_tag(run_id, "mlflow.runName", name)  # as `mlflow run --run-name` names it (mlflow/projects/__init__.py), MLflow 2 too


CPUINFO = Path("/proc/cpuinfo")
# What a machine's id is read from, first found wins; never logged raw (machine-id(5): hash it with an app-specific key).
MACHINE_ID_FILES = (Path("/etc/machine-id"), Path("/var/lib/dbus/machine-id"))
# The CPU features that decide INT8 (and FP16/BF16) speed, in the order cpu_isa lists them.
X86_ISA = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_int8", "amx_bf16", "amx_fp16")
ARM_ISA = ("neon", "asimd", "asimdhp", "asimddp", "i8mm", "bf16", "sve", "sve2", "svei8mm", "sme")


def _cpuinfo() -> str:
    """/proc/cpuinfo, or '' where there is none (macOS, Windows, a locked-down container)."""
    try:
        return CPUINFO.read_text()
    except OSError:
        return ""


def _cpu_fields(cpuinfo: str) -> dict[str, str]:
    """cpuinfo's `key: value` lines; where every core repeats a key, the last core's value."""
    return {k.strip(): v.strip() for k, sep, v in (line.partition(":") for line in cpuinfo.splitlines()) if sep}


def _cpu_model(cpuinfo: str) -> str:
    """The CPU's marketing name; on ARM, where cpuinfo often has none, its implementer and part codes."""
    fields = _cpu_fields(cpuinfo)
    if fields.get("model name"):
        return fields["model name"]
    if "CPU part" in fields:
        return f"{platform.machine()} (CPU implementer {fields.get('CPU implementer', '?')}, part {fields['CPU part']})"
    return platform.processor() or platform.machine()


def cpu_isa(cpuinfo: str) -> str:
    """The INT8-relevant features that every core has (x86 `flags`, ARM `Features`), as a comma list in a fixed
    order; 'none' if it has none of them, 'unknown' where cpuinfo lists no features."""
    for key, names in (("flags", X86_ISA), ("Features", ARM_ISA)):  # apart: AMD's `sme` is not ARM's SME
        per_core = [set(v.split()) for k, _, v in (line.partition(":") for line in cpuinfo.splitlines()) if k.strip() == key]
        if per_core:
            common = set.intersection(*per_core)
            return ",".join(f for f in names if f in common) or "none"
    return "unknown"


def _raw_machine_id() -> str:
    """The OS's machine id (systemd, then D-Bus), else the network card's MAC address, else the host name."""
    for path in MACHINE_ID_FILES:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text:
            return text
    node = uuid.getnode()
    if not node & (1 << 40):  # the multicast bit marks a random number, drawn anew by every process
        return f"mac:{node:012x}"
    return f"host:{socket.gethostname()}"


def machine_id() -> str:
    """A short stable id of this machine: a keyed hash of its machine id, so two devices with one host name stay
    apart while the raw id (which machine-id(5) says to keep confidential) is never logged."""
    return hmac.new(b"ptq device identity", _raw_machine_id().encode(), hashlib.sha256).hexdigest()[:12]


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
    `device.name` is what reports call the device: `PTQ_DEVICE_NAME` (`xavier-lab-2`), else host name and machine id;
    `device.kind` what makes devices interchangeable for a shared sweep: `PTQ_DEVICE_KIND` (`orin-agx-64-maxn`), else
    CPU, cores, memory, GPU (a Jetson's board model) and architecture."""
    host, mid, cpuinfo = socket.gethostname(), machine_id(), _cpuinfo()
    tags = {
        "device.name": os.environ.get("PTQ_DEVICE_NAME") or f"{host}-{mid[:6]}",
        "device.host": host,
        "device.machine_id": mid,
        "device.cpu": _cpu_model(cpuinfo),
        "device.cpu_isa": cpu_isa(cpuinfo),
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
    ram = round(float(tags["device.ram_gb"]))  # whole GB: boards of one model differ by firmware carve-outs
    tags["device.kind"] = os.environ.get("PTQ_DEVICE_KIND") or f"{tags['device.cpu']} x{tags['device.cores']}, {ram} GB, GPU {tags['device.gpu']}, {tags['device.arch']}"
    return tags


def new_params(run_id: str, params: dict[str, str]) -> dict[str, str]:
    """Params not yet on the run. Under `mlflow run` the MLproject parameters are already logged as the user
    typed them; where ptq's reading differs it is logged beside them as `resolved.<name>`."""
    existing = MlflowClient().get_run(run_id).data.params
    out = {k: v for k, v in params.items() if k not in existing}
    out.update({f"resolved.{k}": v for k, v in params.items() if k in existing and existing[k].strip("'") != v})
    return out



PROCESS_TAG = "ptq.process"  # the process that owns a RUNNING run, to close it if that process is gone
TEMP_TAG = "ptq.temp_dir"  # that process's work folder for the run (temp_prefix), removed when the run is closed for it
PARTIAL_TAG = "ptq.partial_of"  # offline: the server run it continues after the server was lost


def process_id() -> str:
    """This process as `pid:start time`, which no later process on the machine repeats (a pid alone is reused)."""
    return f"{os.getpid()}:{psutil.Process().create_time():.2f}"


def process_alive(ident: str) -> bool:
    """Whether the process that `process_id()` described is still running."""
    pid, _, started = ident.partition(":")
    try:
        return f"{psutil.Process(int(pid)).create_time():.2f}" == started
    except (psutil.Error, ValueError):
        return False


def temp_prefix() -> str:
    """The prefix of a run's work folder in the temp dir: `ptq-run-<pid>-`, so that whoever closes the run of a dead
    process knows the folder was that process's."""
    return f"ptq-run-{os.getpid()}-"


def _remove_work_folder(run: Run) -> None:
    """Remove the work folder (TEMP_TAG) of a run whose process is gone, if it is still there and named for that process."""
    folder, pid = run.data.tags.get(TEMP_TAG), run.data.tags.get(PROCESS_TAG, "").split(":")[0]
    if folder and pid and Path(folder).name.startswith(f"ptq-run-{pid}-") and Path(folder).is_dir():
        shutil.rmtree(folder, ignore_errors=True)
        log.info("removed %s, the work folder of run %s", folder, run.info.run_id)


def close_dead_run(client: MlflowClient, run: Run, status: str, why: str) -> None:
    """Close a run whose process is gone as `status` with `why` as its error, and remove that process's work folder."""
    client.set_tag(run.info.run_id, "ptq.error", why)
    client.set_terminated(run.info.run_id, status)
    _remove_work_folder(run)


def close_stale_runs(client: MlflowClient, experiment_ids: list[str]) -> list[str]:
    """Runs of this machine left RUNNING by a process that is gone (SIGKILL, power loss, a native crash) end KILLED;
    their work folders go too."""
    if not experiment_ids:
        return []
    query = f"attributes.status = 'RUNNING' and tags.`device.machine_id` = '{machine_id()}'"
    closed = []
    for stale in client.search_runs(experiment_ids, query, max_results=1000):
        owner = stale.data.tags.get(PROCESS_TAG)
        if owner is None or process_alive(owner):
            continue
        close_dead_run(client, stale, "KILLED", f"process {owner.split(':')[0]} ended without closing the run (SIGKILL, power loss or a crash)")
        log.warning("run %s was left RUNNING by a process that is gone: marked KILLED", stale.info.run_id)
        closed.append(stale.info.run_id)
    return closed


def close_left_running(client: MlflowClient, experiment_id: str, query: str, status: str, why: str) -> None:
    """Close the RUNNING runs that `query` finds (a sweep's child whose process it stopped or lost) as `status`
    with `why` as their error, removing their work folders."""
    for run in client.search_runs([experiment_id], f"{query} and attributes.status = 'RUNNING'"):
        close_dead_run(client, run, status, why)
        log.warning("run %s %s (%s)", run.info.run_id, status, why)


CLAIM_TAG = "ptq.claim"  # `<ms since epoch>:<machine id>:<pid>:<start>` of the process that created a run to do its work
HEARTBEAT_TAG = "ptq.heartbeat"  # seconds since epoch: the claimer's last sign of life, for claimers on other machines
CLAIM_STALE_S = 600.0  # a claim from another machine with no heartbeat for this long is the claim of a dead process


def beat(client: MlflowClient, run_id: str) -> None:
    """Renew the claim on `run_id` (other machines cannot see whether its claimer's process lives)."""
    client.set_tag(run_id, HEARTBEAT_TAG, f"{time.time():.0f}")


def _claim_time(run: Run) -> int:
    """When the run's claim was made (ms); 0 for a run made without one (it was there first)."""
    try:
        return int(run.data.tags.get(CLAIM_TAG, "0").split(":")[0])
    except ValueError:
        return 0


def claim_order(run: Run) -> tuple[int, str]:
    """The order in which claims win: the earliest claim, then the smallest run id."""
    return _claim_time(run), run.info.run_id


def claim_alive(run: Run) -> bool:
    """Whether the claim on a RUNNING run still holds: its claimer's process lives (this machine), or it beat
    within CLAIM_STALE_S (another machine)."""
    stamp = run.data.tags.get(CLAIM_TAG, "")
    parts = stamp.split(":", 2)
    if len(parts) != 3:
        return False
    if parts[1] == machine_id():
        return process_alive(parts[2])
    try:
        last = max(_claim_time(run) / 1000, float(run.data.tags.get(HEARTBEAT_TAG, "0")))
    except ValueError:
        return False
    return time.time() - last < CLAIM_STALE_S


def logged_models(client: Any, experiment_id: str, run_id: str) -> list[Any]:
    """The logged models that run `run_id` produced (none with MLflow 2, whose models are among the run's artifacts)."""
    if not LOGGED_MODELS:
        return []
    return list(client.search_logged_models([experiment_id], f"source_run_id = '{run_id}'", max_results=1000))


def discard_run(client: MlflowClient, run_id: str, why: str) -> None:
    """Soft-delete a run (a lost claim, an attempt cut off or superseded) with its logged models; KILLED first
    if it is RUNNING, so the trash holds nothing RUNNING. A rival that discarded it already is no error."""
    with suppress(MlflowException):
        run = client.get_run(run_id)
        for model in logged_models(client, run.info.experiment_id, run_id):
            client.delete_logged_model(model.model_id)  # type: ignore[attr-defined]
        if run.info.status == "RUNNING":
            client.set_tag(run_id, "ptq.error", why)
            client.set_terminated(run_id, "KILLED")
        if run.info.lifecycle_stage != "deleted":
            client.delete_run(run_id)


def claim_run(
    client: MlflowClient, experiment_id: str, key_tag: str, key: str, tags: dict[str, str], stands: Callable[[Run], bool],
    run_name: str | None = None, start_time: int | None = None,
) -> tuple[str, bool]:
    """Create a run tagged `key_tag`=`key` and claimed by this process (claim time, machine, process) in one request,
    then search again: of this run and the others with that key that `stands` accepts, the earliest claim (then the
    smallest run id) wins, and this run is discarded if it is not it. Return (the winner's id, whether it is this run).
    Two claimers never both win: the later one's search sees the earlier's claim (up to the machines' clock skew)."""
    stamp = f"{int(time.time() * 1000)}:{machine_id()}:{process_id()}"
    mine = client.create_run(experiment_id, start_time=start_time, run_name=run_name, tags={**tags, key_tag: key, CLAIM_TAG: stamp})
    found = client.search_runs([experiment_id], f"tags.`{key_tag}` = '{key}'", max_results=1000)
    rivals = [r for r in found if r.info.run_id != mine.info.run_id and stands(r)]
    winner = min([mine, *rivals], key=claim_order)
    if winner is not mine:
        discard_run(client, mine.info.run_id, f"run {winner.info.run_id} had claimed {key_tag}={key} first")
        return winner.info.run_id, False
    return mine.info.run_id, True


def _model_folder(folder: Path, meta: Model, path: Path, model_type: str, files: tuple[Path, ...]) -> None:
    """An MLflow model folder: an .onnx file as an `mlflow.onnx` model (pyfunc-loadable), any other file (an engine,
    a state dict) stored as it is under a flavor named `model_type`; `files` go with it."""
    if path.suffix == ".onnx":
        proto = onnx.load(str(path))
        extra = "extra_files" in inspect.signature(mlflow.onnx.save_model).parameters  # MLflow 3
        mlflow.onnx.save_model(
            proto, str(folder), mlflow_model=meta, signature=_onnx_signature(proto),
            pip_requirements=mlflow.onnx.get_default_pip_requirements(),  # else MLflow loads the model in a subprocess to infer them
            onnx_execution_providers=["CPUExecutionProvider"], save_as_external_data=False, **({"extra_files": [str(f) for f in files]} if extra else {}),
        )
        if not extra:  # MLflow 2: beside the model, as extra_files would put them
            for f in files:
                shutil.copyfile(f, folder / f.name)
        return
    folder.mkdir()
    for f in (path, *files):
        shutil.copyfile(f, folder / f.name)
    meta.add_flavor(model_type, data=path.name)
    meta.save(str(folder / "MLmodel"))


def _onnx_signature(model: onnx.ModelProto) -> ModelSignature:
    """The graph's input and output tensors (symbolic dims as -1): pyfunc checks what it is fed against them,
    without the megabytes of JSON an input example of one image would add to every model."""

    def schema(values: Any) -> Schema:
        return Schema([
            TensorSpec(
                np.dtype(onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)),
                tuple(d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim),
                v.name,
            )
            for v in values
        ])

    weights = {w.name for w in model.graph.initializer}
    return ModelSignature(schema([v for v in model.graph.input if v.name not in weights]), schema(model.graph.output))


T = TypeVar("T")


class Recorder:
    """The writer of one run: every param, tag, metric and artifact goes through it as soon as it exists.
    It keeps a journal, so that when the tracking server is lost mid-run the run goes on in the offline store
    with everything it had logged (tag `ptq.partial_of` names the server's run, which `ptq sync` completes)."""

    def __init__(self, client: MlflowClient, run_id: str, experiment: str, run_name: str) -> None:
        self.client, self.run_id, self.experiment, self.run_name = client, run_id, experiment, run_name
        self.journal: list[tuple[str, tuple[Any, ...]]] = []
        self.model_ids: dict[str, str] = {}  # model name -> its id in the current store
        self._names: dict[str, str] = {}  # every id a model had (on the server, then offline) -> its name
        self._linked: str | None = None  # the model whose id metrics() carries

    def params(self, params: dict[str, str]) -> None:
        """Log params (strings)."""
        self._write("params", [Param(k, str(v)) for k, v in params.items()])

    def tags(self, tags: dict[str, str]) -> None:
        """Set tags."""
        self._write("tags", [RunTag(k, str(v)) for k, v in tags.items()])

    def metrics(self, values: dict[str, float], step: int = 0) -> None:
        """Log scalar metrics, timestamped now."""
        now = int(time.time() * 1000)
        self._write("metrics", [Metric(k, float(v), now, step) for k, v in values.items()])

    def series(self, points: list[tuple[str, float, int, int]]) -> None:
        """Log time-series points (metric, value, timestamp in ms, step) with their own timestamps and steps."""
        self._write("series", [Metric(key, value, ts, step) for key, value, ts, step in points])

    def artifact(self, path: Path, folder: str | None = None) -> None:
        """Log a file (it must exist until the run ends: a failover uploads it again)."""
        self._write("artifact", str(path), folder)

    def text(self, text: str, name: str) -> None:
        """Log text as the artifact `name`."""
        self._write("text", text, name)

    def table(self, data: dict[str, list[Any]], name: str) -> None:
        """Log a table (column -> values) as a JSON artifact that MLflow's UI renders (`log_table`)."""
        self._write("table", data, name)

    def model(self, path: Path, name: str, model_type: str, params: dict[str, str], tags: dict[str, str], files: tuple[Path, ...] = ()) -> str:
        """Log `path` as a LoggedModel `name` of this run (its "Logged models" tab) and return its id. An .onnx file
        becomes an `mlflow.onnx` model that `mlflow.pyfunc.load_model("models:/<id>")` runs; any other file (an
        engine, a state dict) is stored as it is. `files` (metadata, calibration) go with it; like `log_model`, it
        carries the run's params, `params` overriding them. The files must exist until the run ends: a failover logs it again."""
        self._write("model", path, name, model_type, params, tags, files)
        return self.model_ids[name]

    def link_metrics(self, model_id: str) -> None:
        """Make later `metrics` (not `series`) carry the model `model_id`, so MLflow's model views show and compare them."""
        self._write("link", self._names[model_id])

    def end(self, status: str) -> None:
        """Close the run as FINISHED, FAILED or KILLED."""
        self._write("end", status)

    def call(self, fn: Callable[[MlflowClient, str], T]) -> T:
        """`fn(client, experiment id)` against this run's store (a sweep's searches and claims); if the tracking
        server is lost, the run fails over to the offline store and `fn` runs there."""
        try:
            return fn(self.client, self.client.get_run(self.run_id).info.experiment_id)
        except PtqError:
            raise
        except Exception:
            self._recover()
            return fn(self.client, self.client.get_run(self.run_id).info.experiment_id)

    def snapshot(self) -> Run:
        """The run as stored so far (params, tags, latest metrics)."""
        try:
            return self.client.get_run(self.run_id)
        except PtqError:
            raise
        except Exception:
            self._recover()
            return self.client.get_run(self.run_id)

    def _write(self, kind: str, *args: Any) -> None:
        self.journal.append((kind, args))
        try:
            self._apply(kind, args)
        except PtqError:
            raise
        except Exception:
            self._recover()

    def _recover(self) -> None:
        """After a failed call: fail over to the offline store if the server is lost, else re-raise."""
        uri = str(self.client.tracking_uri)
        if not _is_server(uri) or not (why := probe(uri)):
            raise
        self._fail_over(uri, why)

    def _apply(self, kind: str, args: tuple[Any, ...]) -> None:
        client, run_id = self.client, self.run_id
        if kind == "params":
            for i in range(0, len(args[0]), 100):
                client.log_batch(run_id, params=args[0][i : i + 100])
        elif kind == "tags":
            for i in range(0, len(args[0]), 100):
                client.log_batch(run_id, tags=args[0][i : i + 100])
        elif kind in ("metrics", "series"):
            metrics = args[0]
            if kind == "metrics" and self._linked and LOGGED_MODELS:
                model_id = self.model_ids[self._linked]
                metrics = [Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id) for m in metrics]  # type: ignore[call-arg]
            for i in range(0, len(metrics), 1000):
                client.log_batch(run_id, metrics=metrics[i : i + 1000])
        elif kind == "artifact":
            client.log_artifact(run_id, args[0], args[1])
        elif kind == "text":
            self._log_text(*args)
        elif kind == "table":
            client.log_table(run_id, data=args[0], artifact_file=args[1])
        elif kind == "model":
            self._log_model(*args)
        elif kind == "link":
            self._linked = args[0]
        elif kind == "end":
            client.set_terminated(run_id, args[0])

    def _log_model(self, path: Path, name: str, model_type: str, params: dict[str, str], tags: dict[str, str], files: tuple[Path, ...]) -> None:
        """What `mlflow.onnx.log_model` does, through this Recorder's client alone: no fluent run is started or used
        (a sweep's parent may be active), the active experiment is neither read nor changed, and no metric the
        run already has is linked to the model behind the caller's back."""
        if not LOGGED_MODELS:
            with tempfile.TemporaryDirectory(prefix="ptq-model-") as tmp:
                folder = Path(tmp) / "model"
                _model_folder(folder, Model(artifact_path=f"models/{name}", run_id=self.run_id), path, model_type, files)
                self.client.log_artifacts(self.run_id, str(folder), f"models/{name}")
            self.model_ids[name] = f"runs:/{self.run_id}/models/{name}"
            self._names[self.model_ids[name]] = name
            return
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus  # type: ignore[attr-defined,unused-ignore]

        client: Any = self.client  # MLflow 3's API
        run = client.get_run(self.run_id)
        model = client.create_logged_model(run.info.experiment_id, name, self.run_id, tags, {**run.data.params, **params}, model_type)
        try:
            with tempfile.TemporaryDirectory(prefix="ptq-model-") as tmp:
                folder = Path(tmp) / "model"
                meta = Model(artifact_path=model.artifact_location, run_id=self.run_id, model_uuid=model.model_id, model_id=model.model_id)  # type: ignore[call-arg]
                _model_folder(folder, meta, path, model_type, files)
                client.log_model_artifacts(model.model_id, str(folder))
        except BaseException:
            with suppress(Exception):  # the server may be gone: the caller's error matters, not this one
                client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
            raise
        client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        client.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, step=0)])
        self.model_ids[name] = model.model_id
        self._names[model.model_id] = name

    def _log_text(self, text: str, name: str) -> None:
        """MLflow stages text in the temp dir: where that is full, write straight into a local artifact folder."""
        try:
            self.client.log_text(self.run_id, text, name)
        except OSError:
            uri = urllib.parse.urlparse(self.client.get_run(self.run_id).info.artifact_uri)
            if uri.scheme not in ("file", ""):
                raise
            target = Path(uri.path) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)

    def _fail_over(self, server: str, why: str) -> None:
        """Re-create the run in the offline store from the journal and go on there; later runs of this process too."""
        server_run = self.run_id
        _go_offline(server)
        log.warning(
            "tracking server %s was lost mid-run (%s): run %s goes on in the offline store %s; `ptq sync` completes it there",
            server, why, server_run, offline_dir(),
        )
        self.client = MlflowClient(offline_uri())
        tags = {"ptq.sync_target": server, PARTIAL_TAG: server_run}
        self.run_id = self.client.create_run(set_experiment(self.experiment), run_name=self.run_name, tags=tags).info.run_id
        self._linked = None  # the journal links again, to the models it logs again
        for kind, args in self.journal:
            self._apply(kind, args)


@contextmanager
def _permission_checked(uri: str, experiment: str) -> Iterator[None]:
    """A user the server lets read but not write (HTTP 403) gets one line saying so, before any work."""
    try:
        yield
    except mlflow.exceptions.MlflowException as exc:
        if getattr(exc, "error_code", "") not in ("PERMISSION_DENIED", "UNAUTHENTICATED") and not re.search(r"error code 40[13]\b", str(exc)):
            raise
        user = os.environ.get("MLFLOW_TRACKING_USERNAME", "this user")
        raise PtqError(
            f"tracking server {uri} does not let {user} write runs in experiment {experiment!r} (permission denied): "
            "ask its admin for EDIT permission, or use an account that has it"
        ) from None


def _owner_tags(tags: dict[str, str]) -> dict[str, str]:
    """What makes a run closable, with its work folder removable, by whoever finds it left RUNNING by a dead process."""
    return {PROCESS_TAG: process_id(), "device.machine_id": machine_id(), **({TEMP_TAG: tags[TEMP_TAG]} if TEMP_TAG in tags else {})}


def _parent_experiment(client: MlflowClient, parent: str, experiment: str) -> str:
    """The experiment of run `parent`. Offline, a sweep's child can start before its sweep noticed the server was
    lost: its parent is then on the server, so the experiment is found by name (`ptq sync` keeps the link)."""
    try:
        return str(client.get_run(parent).info.experiment_id)
    except MlflowException:
        if client.tracking_uri != offline_uri():
            raise
        return set_experiment(experiment)


def _adopt(client: MlflowClient, run_id: str, experiment: str, run_name: str, tags: dict[str, str]) -> tuple[str, str]:
    """Take over run `run_id` that another process created for this one (a sweep's claimed combination, a resumed
    sweep's parent): RUNNING, named `run_name`, owned by this process; (run id, experiment id). If this process
    went offline since, a new offline run continues it (tag ptq.partial_of, which `ptq sync` completes)."""
    try:
        experiment_id = str(client.get_run(run_id).info.experiment_id)
    except MlflowException:
        if client.tracking_uri != offline_uri():
            raise
        experiment_id = set_experiment(experiment)
        return client.create_run(experiment_id, run_name=run_name, tags={**_owner_tags(tags), PARTIAL_TAG: run_id}).info.run_id, experiment_id
    client.update_run(run_id, status="RUNNING", name=run_name)
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in _owner_tags(tags).items()])
    return run_id, experiment_id


@contextmanager
def run(
    experiment: str, run_name: str, params: dict[str, str], tags: dict[str, str], parent_run_id: str | None = None, run_id: str | None = None
) -> Iterator[Recorder]:
    """Open a run (a child of `parent_run_id` or of the active run in a sweep; the project run under `mlflow run`, then
    named `run_name`; run `run_id` if another process created it for this one) and yield its Recorder; on error it
    ends FAILED (KILLED on Ctrl-C, SIGTERM, SIGHUP) with the error, keeping all logged so far. Runs this machine left
    RUNNING in that experiment by a dead process are closed first, with their work folders (tag TEMP_TAG)."""
    client = MlflowClient()
    parent = parent_run_id or (active.info.run_id if (active := mlflow.active_run()) else None)
    with _permission_checked(client.tracking_uri, experiment):
        if run_id is not None:
            run_id, experiment_id = _adopt(client, run_id, experiment, run_name, tags)
        elif under_mlflow_run() and parent is None:
            run_id = os.environ["MLFLOW_RUN_ID"]
            experiment_id = client.get_run(run_id).info.experiment_id
            experiment = client.get_experiment(experiment_id).name
            name_run(client, run_id, run_name)
        else:
            experiment_id = _parent_experiment(client, parent, experiment) if parent else set_experiment(experiment)
            # from the first moment: closable, with its work folder removable, if we die
            run_id = client.create_run(experiment_id, run_name=run_name, tags=_owner_tags(tags)).info.run_id
        mark_model_experiment(client, experiment_id)  # also where `mlflow run` (a sweep's parent too) filed the run
        close_stale_runs(client, [experiment_id])
        rec = Recorder(client, run_id, experiment, run_name)
        run_tags = {**fingerprint(), **offline_tags(), **tags, PROCESS_TAG: process_id()}
        if parent:
            run_tags["mlflow.parentRunId"] = parent
        rec.tags(run_tags)
        rec.params(new_params(run_id, params))
    try:
        yield rec
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        why = disk.explain_full(exc) or (f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        try:
            rec.tags({"ptq.error": why[:5000]})
            rec.text("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)), "error.txt")
            rec.end(status)
        except Exception as inner:  # the store itself failed (disk full, server lost for good): keep the run's own error
            log.warning("could not record the failure of run %s (%s)", rec.run_id, inner)
        log.warning("run %s %s (%s)", rec.run_id, status, why.splitlines()[0][:200])
        raise
    rec.end("FINISHED")
