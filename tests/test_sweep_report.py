"""Sweeps (interrupt and resume without duplicates) and the report (tables, statistics, plots, gaps)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from ptq import bench, pipeline, report, sweep
from ptq.config import RunConfig
from ptq.errors import PtqError

BASE = dict(weights="random", calib_size=8, eval_size=16, min_queries=4, min_duration_s=0, blocks=2, warmup=1, monitor=False, progress=False)


def children(experiment: str = "ptq") -> pd.DataFrame:
    runs = mlflow.search_runs(experiment_names=[experiment])
    return runs[runs["tags.mlflow.parentRunId"].notna()]


def ctrl_c_while_timing_int8(job: sweep.ChildJob) -> str:
    """In the child process: Ctrl-C at a terminal while int8 is timed, which reaches the sweep and its child alike."""
    if job.cfg.precision == "int8":

        def ctrl_c(*_: object, **__: object) -> None:
            os.kill(os.getppid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

        bench.time_blocks = ctrl_c  # type: ignore[assignment]
    return sweep.run_child(job)


def test_sweep_interrupted_then_resumed_leaves_no_duplicates(small_dir: Path) -> None:
    base = RunConfig(model="mob-s", data=small_dir, **BASE)  # type: ignore[arg-type]
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep("t", base, ["mob-s"], ["fp32", "fp16", "int8"], target=ctrl_c_while_timing_int8)
    interrupted = children()
    assert sorted(interrupted["status"]) == ["FINISHED", "FINISHED", "KILLED"]  # the int8 run, stopped mid-run, ends KILLED
    assert interrupted[interrupted["status"] == "KILLED"].iloc[0]["tags.ptq.error"] == "KeyboardInterrupt"
    runs = mlflow.search_runs(experiment_names=["ptq"])
    parent = runs[runs["tags.mlflow.parentRunId"].isna()].iloc[0]
    assert parent.status == "KILLED" and parent["metrics.sweep/finished"] == 2  # Ctrl-C, not a failure

    result = sweep.run_sweep("t", base, ["mob-s"], ["fp32", "fp16", "int8"])
    assert len(result.skipped) == 2 and len(result.passed) == 1 and not result.failed
    again = sweep.run_sweep("t", base, ["mob-s"], ["fp32", "fp16", "int8"])
    assert len(again.skipped) == 3 and again.parent_run_id == result.parent_run_id
    runs = children()
    assert sorted(runs["params.precision"]) == ["fp16", "fp32", "int8"] and (runs["status"] == "FINISHED").all()
    assert set(runs["tags.mlflow.parentRunId"]) == {result.parent_run_id}
    parent = mlflow.get_run(result.parent_run_id)
    assert parent.data.metrics["sweep/finished"] == 3 and parent.data.metrics["sweep/failed"] == 0


def fail_fp16(job: sweep.ChildJob) -> str:
    """In the child process: the fp16 run raises while it is timed."""
    if job.cfg.precision == "fp16":

        def crash(*_: object, **__: object) -> None:
            raise RuntimeError("simulated crash")

        bench.time_blocks = crash  # type: ignore[assignment]
    return sweep.run_child(job)


def test_failed_combination_does_not_stop_the_others_and_is_rerun(small_dir: Path) -> None:
    base = RunConfig(model="mob-s", data=small_dir, **BASE)  # type: ignore[arg-type]
    first = sweep.run_sweep("f", base, ["mob-s"], ["fp16", "fp32"], target=fail_fp16)
    assert first.failed == ["mob-s/fp16/ort"] and first.passed == ["mob-s/fp32/ort"]
    failed = children()
    failed = failed[failed["status"] == "FAILED"].iloc[0]
    assert failed["tags.ptq.error"] == "RuntimeError: simulated crash"
    second = sweep.run_sweep("f", base, ["mob-s"], ["fp16", "fp32"])
    assert second.passed == ["mob-s/fp16/ort"] and len(second.skipped) == 1
    runs = children()
    assert len(runs) == 2 and (runs["status"] == "FINISHED").all()  # the failed attempt was superseded


def test_sweep_refuses_unknown_model_before_running(small_dir: Path) -> None:
    with pytest.raises(PtqError, match="unknown model 'nope'"):
        sweep.run_sweep("x", RunConfig(model="mob-s", data=small_dir), ["mob-s", "nope"])
    assert mlflow.search_runs(search_all_experiments=True).empty


def test_presets() -> None:
    assert sweep.PRESETS["study"] == ("mob-s", "mob-l", "r18", "r50", "d169", "d201")
    assert len(sweep.combinations(list(sweep.PRESETS["edge-lite"]), ["fp32", "fp16", "int8"], ["ort"], ["minmax", "entropy"])) == 12


def test_mcnemar() -> None:
    preds = pd.DataFrame({"correct": [1] * 90 + [0] * 10, "fp32_correct": [1] * 100})
    assert report.mcnemar(preds) == pytest.approx(0.001953125)  # 10 discordant pairs, all one way
    same = pd.DataFrame({"correct": [1, 0, 1], "fp32_correct": [1, 0, 1]})
    assert report.mcnemar(same) == 1.0


def fake_runs(*runs: dict[str, str]) -> pd.DataFrame:
    """search_runs-shaped rows, newest first, on one device unless a run says otherwise."""
    common = {"tags.device.name": "dev-a", "tags.device.host": "dev", "params.weights": "pretrained", "params.backend": "ort"}
    return pd.DataFrame([{**common, "run_id": f"r{i}", **{k if k.startswith("tags.") else f"params.{k}": v for k, v in r.items()}} for i, r in enumerate(runs)])


def test_tidy_keeps_one_row_per_configuration_newest_first() -> None:
    runs = fake_runs(
        dict(model="m", precision="int8", calib_method="percentile", percentile="99.99", batch_size="1", min_queries="1000", data="/a"),
        dict(model="m", precision="int8", calib_method="minmax", percentile="99.99", batch_size="1", min_queries="1000", data="/a"),
        dict(model="m", precision="int8", calib_method="minmax", percentile="99.9", batch_size="1", min_queries="10", data="/b"),  # same config, older
        dict(model="m", precision="int8", calib_method="minmax", percentile="99.9", batch_size="16", min_queries="10", data="/b"),
        dict(model="m", precision="int8", calib_method="minmax", percentile="99.9", batch_size="2", min_queries="10", data="/b"),
        dict(model="m", precision="fp32", calib_method="entropy", percentile="99.9", batch_size="1", min_queries="10", data="/b"),
        dict(model="m", precision="fp32", calib_method="minmax", percentile="99.99", batch_size="1", min_queries="10", data="/c"),  # older fp32
    )
    table = report.tidy(runs)
    assert report.config_columns(table) == ["calib_method", "batch_size"]  # percentile only means something with percentile calibration
    assert table[["precision", "calib_method", "batch_size", "run_id"]].fillna("—").values.tolist() == [
        ["fp32", "—", "1", "r5"],  # fp32 runs log a calib_method too: it neither splits nor labels them
        ["int8", "minmax", "1", "r1"],
        ["int8", "minmax", "2", "r4"],
        ["int8", "minmax", "16", "r3"],
        ["int8", "percentile", "1", "r0"],
    ]


def test_tidy_reads_resolved_params_and_keeps_devices_apart() -> None:
    runs = fake_runs(
        {"model": "m", "precision": "fp32", "calib_size": "100.0", "resolved.calib_size": "100", "tags.device.name": "vm-aaaaaa"},  # mlflow run
        {"model": "m", "precision": "fp32", "calib_size": "100", "tags.device.name": "vm-bbbbbb"},
        {"model": "m", "precision": "fp32", "calib_size": "100", "tags.device.name": "vm-aaaaaa", "threads": "2", "threads_used": "2"},
        {"model": "m", "precision": "fp32", "calib_size": "50", "tags.device.name": None, "tags.device.host": "old-host"},  # before device.name
    )
    table = report.tidy(runs)
    assert report.config_columns(table) == ["calib_method", "calib_size"]
    assert table[["device", "calib_size", "run_id"]].values.tolist() == [["old-host", "50", "r3"], ["vm-aaaaaa", "100", "r0"], ["vm-bbbbbb", "100", "r1"]]
    md = report.markdown(table.assign(mcnemar_p=np.nan))
    assert "| device | model | precision | backend | calibration | calib_size | size MB (ratio) |" in md
    assert "| vm-aaaaaa | m | fp32 | ort | — | 100 | — (—x) |" in md


def test_report_from_real_runs_with_gaps(small_dir: Path, tmp_path: Path) -> None:
    """A sweep over two calibration methods gives two lite0 int8 rows, each with its own drop, p-value and interval."""
    lite = RunConfig(model="lite0", data=small_dir, calib_size=24, eval_size=100, min_queries=20, min_duration_s=0, blocks=4, warmup=2, progress=False)
    swept = sweep.run_sweep("calib", lite, ["lite0"], ["int8"], calib_methods=["minmax", "percentile"])
    assert swept.passed == ["lite0/int8/ort/minmax", "lite0/int8/ort/percentile"]
    pipeline.run(RunConfig(model="mob-s", precision="int8", data=small_dir, **BASE))  # type: ignore[arg-type]
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("ptq").experiment_id, run_name="older"):  # type: ignore[union-attr]
        mlflow.log_params({"model": "r18", "precision": "fp16", "weights": "pretrained", "backend": "ort"})  # no metrics at all
    rep = report.build(["ptq"], tmp_path / "rep")
    table = rep.table
    assert report.config_columns(table) == ["calib_method", "calib_size"]  # eval_size means nothing for random weights
    assert table[["model", "precision", "calib_method", "calib_size"]].fillna("—").values.tolist() == [
        ["lite0", "int8", "minmax", "24"],
        ["lite0", "int8", "percentile", "24"],
        ["mob-s", "int8", "minmax", "8"],
        ["r18", "fp16", "—", "—"],
    ]
    client = mlflow.MlflowClient()
    predictions = []
    for _, row in table[table["model"] == "lite0"].iterrows():
        run = client.get_run(row.run_id)
        assert run.data.params["calib_method"] == row.calib_method and run.data.tags["mlflow.parentRunId"] == swept.parent_run_id
        m = run.data.metrics
        assert row.drop_pt == m["acc/top1_drop_pt"] == pytest.approx(100 * (m["acc/fp32_top1"] - m["acc/top1"]))
        preds = report._artifact_table(row.run_id, "predictions.csv", tmp_path / "artifacts")
        assert preds is not None and len(preds) == 100
        assert row.mcnemar_p == report.mcnemar(preds) and 0 < row.mcnemar_p <= 1
        assert (row.speedup_ci_low, row.speedup_ci_high) == (m["speedup/p50_ci95_low"], m["speedup/p50_ci95_high"])  # the run's own interval
        assert row.speedup_ci_low <= row.speedup <= row.speedup_ci_high
        predictions.append(preds["top5"].tolist())
        for artifact in ("latency.csv", "monitor/timeline.csv"):  # what the plots read
            frame = report._artifact_table(row.run_id, artifact, tmp_path / "artifacts")
            assert frame is not None and len(frame) > 0, artifact
        latency = report._artifact_table(row.run_id, "latency.csv", tmp_path / "artifacts")
        assert latency is not None and set(latency["precision"]) == {"int8", "fp32"}
    assert predictions[0] != predictions[1]  # two calibrations, two models: neither row is the other's copy
    mob = table[table["model"] == "mob-s"].iloc[0]
    assert np.isnan(mob.drop_pt) and np.isnan(mob.mcnemar_p)  # random weights: no accuracy, a gap
    assert np.isnan(table[table["model"] == "r18"].iloc[0].p50_ms)
    md = (tmp_path / "rep" / "report.md").read_text()
    device = table.iloc[0].device
    assert "| device | model | precision | backend | calibration | calib_size | size MB (ratio) |" in md
    assert f"| {device} | lite0 | int8 | ort | minmax | 24 |" in md and f"| {device} | lite0 | int8 | ort | percentile | 24 |" in md
    assert f"| {device} | mob-s (random) | int8 | ort | minmax | 8 |" in md and "| — | r18 | fp16 | ort | — | — |" in md
    csv = pd.read_csv(tmp_path / "rep" / "runs.csv")
    assert csv.shape[0] == 4 and csv["calib_method"].fillna("—").tolist() == ["minmax", "percentile", "minmax", "—"]
    for png in ("drop_vs_speedup", "size_vs_accuracy", "compression_time", "latency_distributions", "resource_timelines"):
        assert (tmp_path / "rep" / f"{png}.png").stat().st_size > 10_000
    logged = mlflow.search_runs(experiment_names=["ptq-reports"])
    assert len(logged) == 1 and "report.md" in {a.path for a in mlflow.MlflowClient().list_artifacts(logged.iloc[0].run_id)}


def test_report_filter_matching_nothing_says_so(small_dir: Path, tmp_path: Path) -> None:
    pipeline.run(RunConfig(model="mob-s", precision="fp32", data=small_dir, **BASE))  # type: ignore[arg-type]
    with pytest.raises(PtqError, match="no finished runs in ptq match \\(device=jetson-orin\\)"):
        report.build(["ptq"], tmp_path, device="jetson-orin")
    with pytest.raises(PtqError, match="no experiment named elsewhere"):
        report.build(["elsewhere"], tmp_path)


def test_example_analysis_script_runs(small_dir: Path, tmp_path: Path) -> None:
    pipeline.run(RunConfig(model="mob-s", precision="int8", data=small_dir, **BASE))  # type: ignore[arg-type]
    script = Path(__file__).resolve().parents[1] / "examples" / "analysis.py"
    out = subprocess.run([sys.executable, str(script), "ptq", str(tmp_path / "plot.png")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "mob-s" in out.stdout and (tmp_path / "plot.png").stat().st_size > 5000


def test_cli_sweep_passes_run_options_to_every_run(small_dir: Path, store: Path) -> None:
    ptq = Path(sys.executable).parent / "ptq"
    args = ["sweep", "--models", "mob-s", "--precisions", "fp32", "--weights", "random", "--data", str(small_dir),
            "--calib-size", "4", "--min-queries", "3", "--min-duration-s", "0", "--blocks", "2", "--warmup", "1", "--monitor", "false"]
    out = subprocess.run([str(ptq), *args], capture_output=True, text=True, timeout=300, cwd=store)
    assert out.returncode == 0, out.stderr[-2000:]
    run = children().iloc[0]
    assert run["params.calib_size"] == "4" and run["params.min_queries"] == "3" and run["params.blocks"] == "2" and run["params.weights"] == "random"
    bad = subprocess.run([str(ptq), "sweep", "--models", "mob-s", "--calib-sise", "4"], capture_output=True, text=True, timeout=120, cwd=store)
    assert bad.returncode != 0 and "calib-sise" in bad.stderr


def test_report_and_sweep_entry_points(small_dir: Path, tmp_path: Path, store: Path) -> None:
    """`mlflow run -e sweep` and `mlflow run -e report`: each logs into the run that `mlflow run` opened."""
    project = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["TMPDIR"] = str(tmp_path)  # `mlflow run` leaves a folder of its own in the temp dir each time
    mlflow_run = [str(Path(sys.executable).parent / "mlflow"), "run", str(project), "--env-manager", "local"]
    sweep_args = ["-e", "sweep", "--experiment-name", "ptq", "-P", "preset=", "-P", "models=mob-s", "-P", "weights=random",
                  "-P", "precisions=fp32", "-P", f"data={small_dir}", "-P", "calib_size=4", "-P", "eval_size=8", "-P", "min_queries=4", "-P", "min_duration_s=0", "-P", "monitor=false"]
    out = subprocess.run([*mlflow_run, *sweep_args], capture_output=True, text=True, timeout=600, env=env, cwd=store)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(children()) == 1 and children().iloc[0]["status"] == "FINISHED"
    out = subprocess.run([*mlflow_run, "-e", "report", "-P", f"out={tmp_path / 'rep'}"], capture_output=True, text=True, timeout=600, env=env, cwd=store)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| mob-s (random) | fp32 |" in (tmp_path / "rep" / "report.md").read_text()
    project_run = mlflow.search_runs(experiment_ids=["0"]).iloc[0]  # the report entry point's own run
    assert project_run.status == "FINISHED" and project_run["params.runs"] == "1"
    assert "report.md" in {a.path for a in mlflow.MlflowClient().list_artifacts(project_run.run_id)}
    # a report run filed beside the study runs is never read as one of them
    out = subprocess.run([*mlflow_run, "-e", "report", "--experiment-name", "ptq", "-P", f"out={tmp_path / 'rep2'}"], capture_output=True, text=True, timeout=600, env=env, cwd=store)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(report.build(["ptq"], tmp_path / "rep3", log_run=False).table) == 1
