"""A shared tracking server, for real: concurrent devices, a server outage with `ptq sync`, basic auth,
against SQLite and PostgreSQL backends. Servers and databases run on free loopback ports in temp dirs."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from ptq import tracking
from ptq.errors import PtqError

BIN = Path(sys.executable).parent
PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), None) if Path("/usr/lib/postgresql").is_dir() else None
RUN = ["--model", "mob-s", "--weights", "random", "--calib-size", "8", "--eval-size", "8", "--min-queries", "4", "--min-duration-s", "0", "--blocks", "2", "--warmup", "1", "--progress", "false"]


SERVERS: dict[str, subprocess.Popen] = {}  # uri -> the running server process, for tests that kill it mid-run


def kill_server(uri: str) -> None:
    """Take the server at `uri` down at once (SIGKILL to its process group), as a crash or power loss would."""
    proc = SERVERS[uri]
    os.killpg(proc.pid, 9)
    proc.wait(timeout=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def mlflow_server(backend_uri: str, folder: Path, port: int | None = None, auth: bool = False, default_permission: str = "EDIT") -> Iterator[str]:
    """`mlflow server` serving artifacts from `folder`; stopped (and waited for) on exit."""
    port = port or free_port()
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--backend-store-uri", backend_uri,
           "--artifacts-destination", str(folder / "artifacts"), "--workers", "2"]
    env = {**os.environ, "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret", "MLFLOW_AUTH_ADMIN_PASSWORD": "right-password"}
    env.pop("MLFLOW_TRACKING_URI", None)
    if auth:
        cmd += ["--app-name", "basic-auth"]
        ini = folder / "auth.ini"
        ini.write_text(f"[mlflow]\ndefault_permission = {default_permission}\ndatabase_uri = sqlite:///{folder / 'auth.db'}\nadmin_username = admin\nadmin_password = right-password\nauthorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(ini)
    log = (folder / f"server-{port}.log").open("a")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=folder, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    SERVERS[uri] = proc
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"mlflow server exited: {(folder / f'server-{port}.log').read_text()[-2000:]}")
                time.sleep(0.5)
        time.sleep(1)
        yield uri
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
        proc.wait(timeout=60)


def ptq(args: list[str], uri: str, device: str, cache: Path, data: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PTQ_DEVICE_NAME": device, "PTQ_CACHE_DIR": str(cache), **(extra_env or {})}
    return subprocess.Popen([str(BIN / "ptq"), "run", *args, "--data", str(data)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_complete(client: MlflowClient, run_id: str, with_monitor: bool = False) -> None:
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model"] == "mob-s" and run.data.params["weights"] == "random"
    for metric in ("size/fp32_bytes", "size/model_bytes", "latency/p50_ms", "compress/total_s"):
        assert metric in run.data.metrics
    arts = {a.path for a in client.list_artifacts(run_id)}
    assert {"summary.md", "latency.csv", "split.json"} <= arts
    logged = client.search_logged_models([run.info.experiment_id], f"source_run_id = '{run_id}'")
    assert sorted(m.name for m in logged) == sorted({"fp32-onnx", f"{run.data.params['precision']}-onnx"})  # the models, stored once on the server
    if with_monitor:
        history = client.get_metric_history(run_id, "system/ptq_process_rss_megabytes")
        assert len(history) >= 2 and sorted(m.step for m in history) == list(range(len(history)))  # each sample once, none copied twice


def devices_and_outage(backend_uri: str, folder: Path, data: Path) -> None:
    """Four devices log at once; then the server goes down for one device, whose run arrives after `ptq sync`."""
    port = free_port()
    caches = {f"device-{i}": folder / f"cache-{i}" for i in range(4)}
    with mlflow_server(backend_uri, folder, port) as uri:
        procs = {d: ptq([*RUN, "--precision", "int8", "--monitor", "false"], uri, d, c, data) for d, c in caches.items()}
        for d, p in procs.items():
            out, err = p.communicate(timeout=600)
            assert p.returncode == 0, f"{d}: {err[-2000:]}"
            assert "unreachable" not in err, f"{d} went offline although the server was up: {err[-1000:]}"
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("ptq")
        assert exp is not None
        runs = client.search_runs([exp.experiment_id])
        assert sorted(r.data.tags["device.name"] for r in runs) == sorted(caches)
        for r in runs:
            assert_complete(client, r.info.run_id)
    # the server is down: device-3's next run is recorded offline, with its resource time series
    p = ptq([*RUN, "--precision", "fp32", "--monitor", "true", "--monitor-interval", "0.2"], uri, "device-3", caches["device-3"], data)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-2000:]
    assert "unreachable" in err and "ptq sync" in err
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PTQ_CACHE_DIR": str(caches["device-3"])}
    with mlflow_server(backend_uri, folder, port) as uri:
        for attempt in range(2):  # the second sync must upload nothing: idempotent
            out2 = subprocess.run([str(BIN / "ptq"), "sync"], env=env, capture_output=True, text=True, timeout=300)
            assert out2.returncode == 0, out2.stderr[-2000:]
            assert ("uploaded 1" if attempt == 0 else "uploaded 0") in out2.stderr
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("ptq").experiment_id])  # type: ignore[union-attr]
        assert len(runs) == 5
        synced = [r for r in runs if "ptq.source_run" in r.data.tags]
        assert len(synced) == 1 and synced[0].data.tags["device.name"] == "device-3"
        assert_complete(client, synced[0].info.run_id, with_monitor=True)
        assert "ptq.sync_target" not in synced[0].data.tags


def test_shared_server_sqlite(small_dir: Path, tmp_path: Path) -> None:
    devices_and_outage(f"sqlite:///{tmp_path / 'server.db'}", tmp_path, small_dir)


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[str]:
    """A real PostgreSQL cluster in a temp dir on a free port (Debian's postgresql, run as the postgres user)."""
    if PG_BIN is None or shutil.which("runuser") is None:
        pytest.skip("PostgreSQL server binaries are not installed (apt-get install postgresql)")
    root = Path(f"/tmp/ptq-pg-{os.getpid()}-{free_port()}")
    root.mkdir()
    shutil.chown(root, "postgres")
    port = free_port()
    as_pg = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_pg, str(PG_BIN / "initdb"), "-D", str(root / "data"), "-A", "trust", "-U", "postgres"], check=True, capture_output=True)
    subprocess.run([*as_pg, str(PG_BIN / "pg_ctl"), "-D", str(root / "data"), "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "-l", str(root / "log"), "-w", "start"], check=True, capture_output=True)
    try:
        subprocess.run([*as_pg, str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "mlflow"], check=True, capture_output=True)
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run([*as_pg, str(PG_BIN / "pg_ctl"), "-D", str(root / "data"), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow  # the SQLite twin runs by default; this adds the PostgreSQL backend store (79 s)
def test_shared_server_postgresql(small_dir: Path, tmp_path: Path, postgres: str) -> None:
    devices_and_outage(postgres, tmp_path, small_dir)


def test_basic_auth_right_and_wrong_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path, auth=True) as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "right-password")
        assert tracking.probe(uri) is None
        client = MlflowClient(uri)
        run = client.create_run(client.create_experiment("auth-check"))
        client.log_metric(run.info.run_id, "m", 1.0)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-password")
        with pytest.raises(PtqError, match="refused the credentials.*MLFLOW_TRACKING_USERNAME"):
            tracking.probe(uri)
        mlflow.set_tracking_uri(uri)
        with pytest.raises(PtqError, match="refused the credentials"):
            tracking.check_reachable()


def test_wrong_server_uri_is_a_clear_error_for_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # a refused port whose number contains 401 and 403 is not an auth failure
        s.bind(("127.0.0.1", 40133))
    uri = "http://127.0.0.1:40133"
    mlflow.set_tracking_uri(uri)
    with pytest.raises(PtqError, match="is unreachable.*start it"):
        tracking.check_reachable()
