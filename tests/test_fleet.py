"""A lab's fleet against real `mlflow server`s (SQLite-backed, on loopback): concurrent `ptq sync`s upload each offline
run once, a SIGTERMed sync leaves nothing half uploaded or RUNNING, a server lost mid-sweep moves the rest of the
sweep offline and `ptq sync` completes it, and identical sweeps at once share their combinations. Each test counts
runs, logged models and artifact bytes on the server before and after."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from unittest import mock
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from ptq import sweep, sync, tracking
from ptq.config import RunConfig
from test_server import kill_server, mlflow_server, postgres  # noqa: F401 (postgres: a fixture)

BIN = Path(sys.executable).parent
ARTIFACT_BYTES = 300_000  # each offline run's file artifact; its model file is a third of it


def counts(uri: str, folder: Path) -> tuple[int, int, int]:
    """(active runs, their logged models, bytes of their artifacts and models on the server's disk)."""
    client = MlflowClient(uri)
    runs, models, size = 0, 0, 0
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id], max_results=1000):
            runs += 1
            size += sum(f.stat().st_size for f in (folder / "artifacts" / exp.experiment_id / run.info.run_id).rglob("*") if f.is_file())
            for model in tracking.logged_models(client, exp.experiment_id, run.info.run_id):
                models += 1
                size += sum(f.stat().st_size for f in (folder / "artifacts" / exp.experiment_id / "models" / model.model_id).rglob("*") if f.is_file())
    return runs, models, size


def offline_runs(cache: Path, server: str, n: int, work: Path) -> list[str]:
    """`n` FINISHED runs in the offline store under `cache`, meant for `server`: params, a metric, a file and a logged model each."""
    assert tracking.offline_dir() == cache / "offline"
    tracking.ready_store(tracking.offline_uri())
    client = MlflowClient(tracking.offline_uri())
    experiment_id = client.create_experiment("ptq", artifact_location=(tracking.offline_dir() / "artifacts" / "ptq").as_uri())
    ids = []
    for i in range(n):
        run_id = client.create_run(experiment_id, run_name=f"offline-{i}", tags={"ptq.sync_target": server, "device.name": "device-0"}).info.run_id
        rec = tracking.Recorder(client, run_id, "ptq", f"offline-{i}")
        rec.params({"model": "mob-s", "precision": "int8", "index": str(i)})
        blob, engine = work / f"blob-{i}.bin", work / f"engine-{i}.plan"
        blob.write_bytes(os.urandom(ARTIFACT_BYTES))
        engine.write_bytes(os.urandom(ARTIFACT_BYTES // 3))
        rec.artifact(blob)
        rec.link_metrics(rec.model(engine, "int8-engine", "tensorrt", {}, {}))
        rec.metrics({"acc/top1": 0.5 + i / 100})
        rec.end("FINISHED")
        ids.append(run_id)
    return ids


def run_ptq_sync(cache: Path, uri: str, extra: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PTQ_CACHE_DIR": str(cache), **(extra or {})}
    return subprocess.Popen([str(BIN / "ptq"), "sync"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def uploaded_count(err: str) -> tuple[int, int]:
    found = re.search(r"^uploaded (\d+), already there (\d+), still running 0$", err, re.M)
    assert found, err[-2000:]
    return int(found[1]), int(found[2])


@pytest.mark.parametrize("stores", [pytest.param("one store", marks=pytest.mark.slow), "a copy per machine"])  # the lock is the simpler half
def test_two_syncs_at_once_upload_each_offline_run_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stores: str, backend_store: str) -> None:
    """One store: its per-run lock serializes them. A copy per machine (no file shared): the server claim does."""
    monkeypatch.setenv("PTQ_CACHE_DIR", str(tmp_path / "cache"))
    with mlflow_server(backend_store, tmp_path) as uri:
        ids = offline_runs(tmp_path / "cache", uri, 3, tmp_path)
        caches = [tmp_path / "cache", tmp_path / "cache"]
        if stores == "a copy per machine":
            shutil.copytree(tmp_path / "cache", tmp_path / "cache-copy")
            caches[1] = tmp_path / "cache-copy"
        before = counts(uri, tmp_path)
        procs = [run_ptq_sync(c, uri) for c in caches]
        results = []
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-2000:]
            results.append(uploaded_count(err))
        after = counts(uri, tmp_path)
        assert before == (0, 0, 0)
        model_bytes = after[2] - 3 * ARTIFACT_BYTES  # each model folder: its file and MLmodel
        assert after[:2] == (3, 3) and 3 * (ARTIFACT_BYTES // 3) < model_bytes < 3 * (ARTIFACT_BYTES // 3 + 4000), after
        assert sum(up for up, _ in results) == 3 and all(up + already == 3 for up, already in results), results
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("ptq").experiment_id])  # type: ignore[union-attr]
        assert sorted(r.data.tags[sync.SOURCE_TAG] for r in runs) == sorted(ids) and {r.info.status for r in runs} == {"FINISHED"}
        assert client.search_runs([runs[0].info.experiment_id], run_view_type=ViewType.DELETED_ONLY) == [] or stores != "one store"
        for deleted in client.search_runs([runs[0].info.experiment_id], run_view_type=ViewType.DELETED_ONLY):
            assert deleted.info.status == "KILLED"  # a lost claim goes to the trash closed
        again = sync.sync()
        assert (again.uploaded, sorted(again.already)) == ([], sorted(ids)) and counts(uri, tmp_path) == after
    print(f"\n[{stores}] before {before}, after {after}, syncs (uploaded, already) {results}")


def test_a_live_upload_from_another_machine_is_left_alone_a_dead_one_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PTQ_CACHE_DIR", str(tmp_path / "cache"))
    with mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path) as uri:
        (rid,) = offline_runs(tmp_path / "cache", uri, 1, tmp_path)
        server = MlflowClient(uri)
        exp_id = server.create_experiment("ptq")
        other = f"{int(time.time() * 1000)}:another-box:4242:1.00"  # a sync on another machine: its process cannot be checked
        live = server.create_run(exp_id, tags={sync.SOURCE_TAG: rid, tracking.CLAIM_TAG: other}).info.run_id
        tracking.beat(server, live)
        assert sync.sync().already == [rid] and counts(uri, tmp_path) == (1, 0, 0)  # not uploaded again beside it
        assert server.get_run(live).info.status == "RUNNING"
        server.set_tag(live, tracking.HEARTBEAT_TAG, f"{time.time() - tracking.CLAIM_STALE_S - 60:.0f}")
        server.set_tag(live, tracking.CLAIM_TAG, f"{int((time.time() - tracking.CLAIM_STALE_S - 60) * 1000)}:another-box:4242:1.00")
        assert sync.sync().uploaded == [rid]  # its uploader went silent: replaced
        runs, models, size = counts(uri, tmp_path)
        assert (runs, models) == (1, 1) and size > ARTIFACT_BYTES
        (trashed,) = server.search_runs([exp_id], run_view_type=ViewType.DELETED_ONLY)
        assert trashed.info.run_id == live and trashed.info.status == "KILLED" and trashed.data.tags["ptq.error"] == "its upload was cut off; uploaded again"


SLOW_ARTIFACTS = """
import time
from mlflow.tracking import MlflowClient
real = MlflowClient.log_artifacts
def slow(self, *args, **kwargs):
    time.sleep(60)
    return real(self, *args, **kwargs)
MlflowClient.log_artifacts = slow
"""


def test_a_sigtermed_sync_says_so_exits_143_and_leaves_nothing_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PTQ_CACHE_DIR", str(tmp_path / "cache"))
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent(SLOW_ARTIFACTS))  # the upload stalls at its artifacts, models already up
    with mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path) as uri:
        (rid,) = offline_runs(tmp_path / "cache", uri, 1, tmp_path)
        proc = run_ptq_sync(tmp_path / "cache", uri, {"PYTHONPATH": str(hook)})
        server = MlflowClient(uri)
        deadline = time.time() + 120
        while not ((exp := server.get_experiment_by_name("ptq")) and (runs := server.search_runs([exp.experiment_id])) and "acc/top1" in runs[0].data.metrics):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.2)
        during = counts(uri, tmp_path)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"ptq sync stopped (SIGTERM) while uploading offline run {rid}"), err[-2000:]
        after = counts(uri, tmp_path)
        (trashed,) = server.search_runs([runs[0].info.experiment_id], run_view_type=ViewType.DELETED_ONLY)
        assert trashed.info.status == "KILLED" and trashed.data.tags["ptq.error"] == "its upload was stopped"
        assert during[:2] == (1, 1) and after == (0, 0, 0)
        assert sync.sync().uploaded == [rid]
        final = counts(uri, tmp_path)
        assert final[:2] == (1, 1) and final[2] > ARTIFACT_BYTES
    print(f"\nduring the upload {during}, after SIGTERM {after}, after the next sync {final}")


def fake_child(job: sweep.ChildJob) -> str:
    """In the child process: a cheap run of the combination; the server (process group FLEET_SERVER_PGID) is killed
    during (FLEET_LOSE=during) or right after (after) the fp32 run."""
    if os.environ.get("FLEET_BOARD"):  # the board the sweep runs on (see SWEEP_SCRIPT)
        tracking._raw_machine_id = lambda: os.environ["FLEET_BOARD"]  # type: ignore[assignment]
    tracking.select_store()  # as pipeline.run does
    lose = os.environ.get("FLEET_LOSE", "") if job.cfg.precision == "fp32" else ""
    params = {"model": job.cfg.model, "precision": job.cfg.precision, "backend": job.cfg.backend}
    with tracking.run(job.cfg.experiment, f"{job.cfg.model}-{job.cfg.precision}", params, job.tags, job.parent_run_id, job.run_id) as rec:
        rec.metrics({"fake/first": 1.0})
        if lose == "during":
            os.killpg(int(os.environ["FLEET_SERVER_PGID"]), signal.SIGKILL)
        time.sleep(float(os.environ.get("FLEET_WORK_S", "0")))
        rec.metrics({"fake/second": 2.0})
    if lose == "after":
        os.killpg(int(os.environ["FLEET_SERVER_PGID"]), signal.SIGKILL)
    return rec.run_id


@pytest.mark.parametrize("lose", [pytest.param("after", marks=pytest.mark.slow), "during"])  # during: the child fails over too
def test_server_lost_mid_sweep_goes_on_offline_and_sync_completes_it(small_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lose: str) -> None:
    monkeypatch.setenv("PTQ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FLEET_LOSE", lose)
    monkeypatch.setattr(tracking, "_sync_target", None)
    backend = f"sqlite:///{tmp_path / 'server.db'}"
    base = RunConfig(model="mob-s", weights="random", data=small_dir, monitor=False, progress=False)
    with mlflow_server(backend, tmp_path) as uri:
        port = int(uri.rsplit(":", 1)[1])
        from test_server import SERVERS

        monkeypatch.setenv("FLEET_SERVER_PGID", str(SERVERS[uri].pid))
        mlflow.set_tracking_uri(uri)
        result = sweep.run_sweep("outage", base, ["mob-s"], ["fp32", "fp16", "int8"], target=fake_child)
        kill_server(uri) if SERVERS[uri].poll() is None else None
    assert result.passed == ["mob-s/fp32/ort", "mob-s/fp16/ort", "mob-s/int8/ort"] and mlflow.get_tracking_uri() == tracking.offline_uri()
    offline = MlflowClient(tracking.offline_uri())
    parent_offline = offline.get_run(result.parent_run_id)
    assert parent_offline.info.status == "FINISHED" and parent_offline.data.metrics["sweep/finished"] == 3
    server_parent = parent_offline.data.tags[tracking.PARTIAL_TAG]
    with mlflow_server(backend, tmp_path, port) as uri:
        server = MlflowClient(uri)
        exp_id = server.get_experiment_by_name("ptq").experiment_id  # type: ignore[union-attr]
        before = [(r.info.run_name, r.info.status) for r in server.search_runs([exp_id], order_by=["attributes.start_time ASC"])]
        before_counts = counts(uri, tmp_path)
        synced = sync.sync()
        runs = server.search_runs([exp_id], order_by=["attributes.start_time ASC"])
        after_counts = counts(uri, tmp_path)
        parent = server.get_run(server_parent)
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == server_parent]
        assert parent.info.status == "FINISHED" and parent.data.metrics["sweep/finished"] == 3 and parent.data.metrics["sweep/failed"] == 0
        assert sorted(r.data.params["precision"] for r in children) == ["fp16", "fp32", "int8"]
        assert {r.info.status for r in runs} == {"FINISHED"} and len(runs) == 4
        assert all(r.data.metrics == {"fake/first": 1.0, "fake/second": 2.0} for r in children)
        assert sync.sync().uploaded == []
    print(f"\n[lost {lose} fp32] before sync {before} {before_counts}; sync uploaded {len(synced.uploaded)}; after {after_counts}")
    if lose == "after":  # fp32 finished on the server; the parent and two children waited offline
        assert before == [("sweep-outage", "RUNNING"), ("mob-s-fp32", "FINISHED")] and len(synced.uploaded) == 3
    else:  # fp32 was cut off mid-run too: completed, like its parent, as the same server run
        assert before == [("sweep-outage", "RUNNING"), ("mob-s-fp32", "RUNNING")] and len(synced.uploaded) == 4


SWEEP_SCRIPT = """
import logging, os, sys, time
sys.path.insert(0, {tests!r})
from ptq import sweep, tracking
from ptq.config import RunConfig
from test_fleet import fake_child
if os.environ.get("FLEET_BOARD"):  # another board: its own machine id (the sweep claims with it), one kind for all
    tracking._raw_machine_id = lambda: os.environ["FLEET_BOARD"]
logging.basicConfig(level=logging.WARNING)
started = time.monotonic()
result = sweep.run_sweep({name!r}, RunConfig(model="mob-s", weights="random", data={data!r}, split_seed={seed}, monitor=False, progress=False),
                         ["mob-s", "mob-l"], ["fp32", "fp16"], fleet={fleet!r}, target=fake_child)
print(len(result.passed), len(result.skipped), len(result.failed), f"{{time.monotonic() - started:.1f}}", result.parent_run_id)
"""


def concurrent_sweeps(n: int, name: str, uri: str, data: Path, cache: Path, boards: bool = False) -> tuple[float, list[list[str]]]:
    """`n` identical sweeps of 4 combinations started at once (fake children that work 3 s each), each on a board of
    its own (`boards`: a machine id each, shared with `--fleet`); (wall s, their reports)."""
    script = SWEEP_SCRIPT.format(tests=str(Path(__file__).parent), name=name, data=str(data), seed=n, fleet=boards)  # combinations of its own
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PTQ_CACHE_DIR": str(cache), "FLEET_WORK_S": "3", "FLEET_LOSE": ""}
    started = time.monotonic()
    procs = [
        subprocess.Popen([sys.executable, "-c", script], env={**env, "FLEET_BOARD": f"board-{i}" if boards else ""}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(n)
    ]
    reports = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        reports.append(out.splitlines()[-1].split())  # MLflow prints "View run" lines too
    return time.monotonic() - started, reports


def check_shared(uri: str, name: str, n: int, reports: list[list[str]]) -> None:
    client = MlflowClient(uri)
    exp_id = client.get_experiment_by_name("ptq").experiment_id  # type: ignore[union-attr]
    (parent,) = client.search_runs([exp_id], f"tags.`ptq.sweep` = '{name}' and tags.`ptq.sweep_key` != ''")  # one parent, joined by all
    children = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 4 and {r.info.status for r in children} == {"FINISHED"}
    assert len({r.data.tags["ptq.combo_key"] for r in children}) == 4  # exactly one run per combination
    assert {r[4] for r in reports} == {parent.info.run_id} and len(reports) == n
    assert sum(int(r[0]) for r in reports) == 4 and all(int(r[0]) + int(r[1]) == 4 and r[2] == "0" for r in reports), reports
    assert parent.info.status == "FINISHED" and parent.data.metrics["sweep/finished"] == 4


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def backend_store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The server's backend store: SQLite by default, a real PostgreSQL cluster in the slow set."""
    return f"sqlite:///{tmp_path / 'server.db'}" if request.param == "sqlite" else str(request.getfixturevalue("postgres"))


def test_two_identical_sweeps_at_once_share_the_combinations(small_dir: Path, tmp_path: Path, backend_store: str) -> None:
    with mlflow_server(backend_store, tmp_path) as uri:
        before = counts(uri, tmp_path)
        wall, reports = concurrent_sweeps(2, "pair", uri, small_dir, tmp_path / "cache")
        check_shared(uri, "pair", 2, reports)
        after = counts(uri, tmp_path)
        assert before == (0, 0, 0) and after == (5, 0, 0)  # a parent and 4 children, nothing more
    print(f"\n2 sweeps at once: {wall:.1f} s wall, (ran, skipped, failed) per sweep {[r[:3] for r in reports]}, runs {before[0]} -> {after[0]}")


def board_id(board: str) -> str:
    """The machine id a board with this raw id logs."""
    with mock.patch.object(tracking, "_raw_machine_id", lambda: board):
        return tracking.machine_id()


def test_two_boards_of_one_kind_split_a_fleet_sweep(small_dir: Path, tmp_path: Path, backend_store: str) -> None:
    with mlflow_server(backend_store, tmp_path) as uri:
        wall, reports = concurrent_sweeps(2, "fleet", uri, small_dir, tmp_path / "cache", boards=True)
        check_shared(uri, "fleet", 2, reports)
        assert counts(uri, tmp_path) == (5, 0, 0)  # a parent and 4 children, not a sweep per board
        client = MlflowClient(uri)
        children = client.search_runs([client.get_experiment_by_name("ptq").experiment_id], "tags.`ptq.combo_key` != ''")  # type: ignore[union-attr]
        ran_on = {board_id(f"board-{i}") for i, r in enumerate(reports) if int(r[0])}
        assert {r.data.tags["device.machine_id"] for r in children} == ran_on  # each child was run by the board that claimed it
    print(f"\n2 boards, one fleet sweep: {wall:.1f} s wall, (ran, skipped, failed) per board {[r[:3] for r in reports]}")


@pytest.mark.slow  # up to four sweep processes on this machine's cores
def test_one_two_and_four_identical_sweeps_wall_times(small_dir: Path, tmp_path: Path) -> None:
    with mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path) as uri:
        walls = {}
        for n, name in ((1, "alone"), (2, "pair"), (4, "quad")):
            before = counts(uri, tmp_path)[0]
            walls[n], reports = concurrent_sweeps(n, name, uri, small_dir, tmp_path / "cache")
            check_shared(uri, name, n, reports)
            assert counts(uri, tmp_path)[0] - before == 5
            print(f"\n{n} sweep(s) at once: {walls[n]:.1f} s wall, (ran, skipped, failed) per sweep {[r[:3] for r in reports]}")


def test_the_preflight_check_covers_the_databases_disk(small_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil as real_shutil

    from ptq import disk, pipeline
    from ptq.errors import PtqError

    database = tmp_path / "db" / "mlflow.db"
    mlflow.set_tracking_uri(f"sqlite:///{database}")
    usage = real_shutil.disk_usage("/")
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda _path: usage._replace(free=30 << 20))
    with pytest.raises(PtqError, match=rf"not enough free disk space for this run in .*{database.parent}.*: 30 MB free, about \d+ MB needed"):
        pipeline.run(RunConfig(model="mob-s", weights="random", precision="fp32", data=small_dir, progress=False))
    assert MlflowClient().search_runs(["0"]) == []


def test_a_database_that_fills_up_mid_run_names_its_path_and_free_space(small_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlite3

    from mlflow.exceptions import MlflowException

    from ptq import pipeline

    real = MlflowClient.log_batch

    def full_on_metrics(self: MlflowClient, run_id: str, metrics: object = (), **kwargs: object) -> None:
        if metrics:  # as SQLAlchemy reports sqlite's error, with the original as its cause
            raise MlflowException("(raised as a result of Query-invoked autoflush; ...)") from sqlite3.OperationalError("database or disk is full")
        real(self, run_id, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(MlflowClient, "log_batch", full_on_metrics)
    with pytest.raises(MlflowException):
        pipeline.run(RunConfig(model="mob-s", weights="random", precision="fp32", data=small_dir, calib_size=4, eval_size=4, min_queries=2,
                               min_duration_s=0, blocks=2, warmup=0, monitor=False, progress=False))
    run = mlflow.search_runs(search_all_experiments=True).iloc[0]
    database = mlflow.get_tracking_uri()[len("sqlite:///") :]
    assert run.status == "FAILED"
    assert re.fullmatch(rf"disk full: the tracking database {re.escape(database)} could not be written \(\d+ MB free\): free some space, "
                        r"or point MLFLOW_TRACKING_URI at a larger disk", run["tags.ptq.error"]), run["tags.ptq.error"]
