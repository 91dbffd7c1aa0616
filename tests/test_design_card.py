"""The design card's flow as a new user types it: `mlflow run .` (no --experiment-name: MLflow's 'Default'
experiment), then `mlflow run . -e report`; the run is named as `ptq run` names it, its experiment declares
itself one of model development, each model file is stored once, and a short evaluation folder is said so."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import psutil
import pytest
from mlflow.tracking import MlflowClient

from ptq import pipeline, tracking
from ptq.config import RunConfig

PROJECT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def twelve_images(sample_dir: Path, tmp_path: Path) -> Path:
    """12 real images: 8 calibrate, so eval_size=50 gets 4."""
    folder = tmp_path / "twelve"
    folder.mkdir()
    for f in sorted(sample_dir.iterdir())[:12]:
        (folder / f.name).symlink_to(f)
    return folder


def mlflow_run(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`mlflow run <project> --env-manager local ARGS` in the test's store, as a user types it; its temp dir is
    store/tmp (`mlflow run` leaves a folder of its own there each time)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    env["TMPDIR"] = str(store / "tmp")
    (store / "tmp").mkdir(exist_ok=True)
    out = subprocess.run([str(BIN / "mlflow"), "run", str(PROJECT), "--env-manager", "local", *args], capture_output=True, text=True,
                         timeout=600, env=env, cwd=store)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_design_card_mlflow_run_then_report(twelve_images: Path, store: Path, tmp_path: Path) -> None:
    mlflow_run(store, "-P", "model=lite0", "-P", "precision=int8", "-P", f"data={twelve_images}", "-P", "calib_size=8", "-P", "eval_size=50",
               "-P", "min_queries=4", "-P", "min_duration_s=0", "-P", "blocks=2", "-P", "warmup=1", "-P", "monitor=false")
    client = MlflowClient()
    (run,) = client.search_runs(["0"])  # MLflow's Default experiment: where `mlflow run` files it without --experiment-name
    tags = run.data.tags
    assert run.info.status == "FINISHED" and run.info.run_name == "lite0-int8-ort" and tags["mlflow.runName"] == "lite0-int8-ort"
    assert client.get_experiment("0").tags[tracking.KIND_TAG] == "custom_model_development"  # MLflow 3's "Machine learning" kind

    # a short folder: said in the headline and as a warning tag
    note = "only 4 evaluation images of eval_size=50: the data folder has 12 images, 8 of them calibrate"
    assert tags["ptq.warning.eval_images"] == note and run.data.metrics["data/eval_images"] == 4
    assert f"| evaluation images | {note} |" in mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/summary.md")

    # each model file once: as a logged model, not again among the run's artifacts
    assert "model" not in {a.path for a in client.list_artifacts(run.info.run_id)}
    models = tracking.download_models(run.info.run_id, tmp_path / "models")
    assert set(models) == {"fp32-onnx", "int8-onnx"}
    assert (models["int8-onnx"] / "model.onnx").stat().st_size < (models["fp32-onnx"] / "model.onnx").stat().st_size / 3

    # its work folder was named for its process, tagged, and is gone
    pid = tags[tracking.PROCESS_TAG].split(":")[0]
    assert Path(tags[tracking.TEMP_TAG]).parent == store / "tmp" and Path(tags[tracking.TEMP_TAG]).name.startswith(f"ptq-run-{pid}-")
    assert not list((store / "tmp").glob("ptq-*"))

    # `ptq run` files its runs in 'ptq': the report reads both experiments and says so
    pipeline.run(RunConfig(model="mob-s", weights="random", precision="fp32", data=twelve_images, calib_size=4, eval_size=4, min_queries=2,
                           min_duration_s=0, blocks=2, warmup=0, monitor=False, progress=False))
    assert client.get_experiment_by_name("ptq").tags[tracking.KIND_TAG] == "custom_model_development"  # type: ignore[union-attr]
    out = mlflow_run(store, "-e", "report", "-P", f"out={tmp_path / 'report'}")
    assert "runs read from experiments Default (1 run), ptq (1 run)" in out.stderr
    md = (tmp_path / "report" / "report.md").read_text()
    assert "Runs read from experiments: Default (1 run), ptq (1 run)." in md
    assert re.search(r"^\| [^|]+ \| lite0 \| int8 \| ort \| minmax \|", md, re.M) and re.search(r"^\| [^|]+ \| mob-s \(random\) \| fp32 \| ort \|", md, re.M)
    report_run = next(r for r in client.search_runs(["0"]) if r.data.tags.get("ptq.kind") == "report")
    assert report_run.info.run_name == "report" and report_run.data.params["runs"] == "2"
    params = report_run.data.params  # what `mlflow run` logged as typed (empty: every experiment), and what it read
    assert params.get("resolved.experiments", params.get("experiments")) == "Default,ptq"


def test_mlflow_run_keeps_a_run_name_the_user_chose(store: Path) -> None:
    """Only MLflow's random names (predicate-noun-number) give way to ptq's."""
    client = MlflowClient()
    chosen = client.create_run("0", run_name="baseline").info.run_id
    generated = client.create_run("0").info.run_id
    for run_id in (chosen, generated):
        tracking.name_run(client, run_id, "lite0-int8-ort")
    assert client.get_run(chosen).info.run_name == "baseline" and client.get_run(generated).info.run_name == "lite0-int8-ort"


def dead_process() -> str:
    """`tracking.process_id()` of a process that has ended."""
    proc = psutil.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    ident = f"{proc.pid}:{proc.create_time():.2f}"
    proc.wait()
    assert not tracking.process_alive(ident)
    return ident


def test_closing_a_dead_process_run_removes_its_work_folder_and_nothing_else(store: Path, tmp_path: Path) -> None:
    """The next run on the machine (close_stale_runs) and a sweep whose child died (close_left_running) remove the
    folder the run's tag names, if it is named for that process; a live process's run and folder stay."""
    client = MlflowClient()
    experiment = client.create_experiment("ptq-stale")

    def left_running(owner: str, folder: Path, combo: str) -> str:
        folder.mkdir()
        (folder / "model_fp32.onnx").write_bytes(b"x" * 1000)
        tags = {tracking.PROCESS_TAG: owner, tracking.TEMP_TAG: str(folder), "device.machine_id": tracking.machine_id(), "ptq.combo_key": combo}
        return client.create_run(experiment, tags=tags).info.run_id

    dead, other_dead = dead_process(), dead_process()
    pid = dead.split(":")[0]
    killed = left_running(dead, tmp_path / f"ptq-run-{pid}-abc", "a")
    not_its_own = left_running(other_dead, tmp_path / "ptq-run-1-zzz", "b")  # a tag naming a folder of another pid
    alive = left_running(tracking.process_id(), tmp_path / f"ptq-run-{os.getpid()}-live", "c")
    assert set(tracking.close_stale_runs(client, [experiment])) == {killed, not_its_own}
    assert client.get_run(killed).info.status == "KILLED" and client.get_run(alive).info.status == "RUNNING"
    assert not (tmp_path / f"ptq-run-{pid}-abc").exists()
    assert (tmp_path / "ptq-run-1-zzz").is_dir() and (tmp_path / f"ptq-run-{os.getpid()}-live").is_dir()

    child = dead_process()  # a sweep's child that died (SIGKILL, a native crash)
    failed = left_running(child, tmp_path / f"ptq-run-{child.split(':')[0]}-child", "d")
    tracking.close_left_running(client, experiment, f"tags.`ptq.combo_key` = 'd' and tags.`{tracking.PROCESS_TAG}` LIKE '{child.split(':')[0]}:%'",
                                "FAILED", "child process died of SIGKILL")
    run = client.get_run(failed)
    assert run.info.status == "FAILED" and run.data.tags["ptq.error"] == "child process died of SIGKILL"
    assert not (tmp_path / f"ptq-run-{child.split(':')[0]}-child").exists()
