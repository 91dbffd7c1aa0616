"""What a run logs, by name: series under MLflow's `system/` names, one table of per-phase figures, and a short,
pinned list of scalar metrics; MLflow's own sampler never writes into a ptq run."""

from __future__ import annotations

import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.system_metrics.metrics import cpu_monitor, gpu_monitor

from ptq import monitor, pipeline, report
from ptq.config import RunConfig
from ptq.monitor import MEMORY, PHASE_INDEX, PROCESS_RSS, NvmlSource, PsutilSource, RaplSource

# Every scalar metric of a lite0 INT8 run (ORT, pretrained weights) on a machine without power sensors: adding one is a
# conscious change. The series (system/...) are apart: how many depends on the machine (cores, GPU, power rails).
SCALARS = {
    "size/fp32_bytes", "size/model_bytes", "size/ratio", "model/params",
    "data/calib_images", "data/eval_images", "data/skipped_images",
    "compress/export_s", "compress/preprocess_s", "compress/calibrate_s", "compress/quantize_s", "compress/build_s", "compress/total_s",
    "compress/peak_rss_mb", "compress/peak_rss_delta_mb", "compress/cpu_pct_mean",
    "latency/p50_ms", "latency/p90_ms", "latency/p99_ms", "latency/mean_ms", "latency/block_p50_spread_pct", "throughput/img_s",
    "latency/fp32_p50_ms", "latency/fp32_p90_ms", "latency/fp32_p99_ms", "latency/fp32_mean_ms", "latency/fp32_block_p50_spread_pct",
    "throughput/fp32_img_s", "latency/queries", "latency/blocks", "latency/seconds",
    "speedup/p50", "speedup/p50_ci95_low", "speedup/p50_ci95_high",
    "acc/top1", "acc/top5", "acc/fp32_top1", "acc/fp32_top5", "acc/top1_drop_pt", "acc/top5_drop_pt", "acc/top1_drop_p",
    "fidelity/top1_agreement", "fidelity/kl_mean",
}  # fmt: skip
ENERGY = {"latency/energy_per_img_j", "evaluate/energy_per_img_j"}  # where a power source is on
GPU_COMPUTE = {"latency/gpu_compute_p50_ms", "latency/fp32_gpu_compute_p50_ms", "speedup/gpu_compute_p50"}  # where sessions have a device clock (TensorRT)
PHASES = {
    "export", "load_data", "preprocess", "calibrate", "quantize", "build", "fp32_build",
    "warmup", "fp32_warmup", "latency", "fp32_latency", "evaluate", "fp32_evaluate",
    "idle",  # time between phases
}  # fmt: skip
# Written by MLflow's own sampler and never by ptq: their presence would mean it sampled a ptq run too.
MLFLOW_ONLY = {"system/disk_usage_percentage", "system/disk_usage_megabytes", "system/network_receive_megabytes", "system/gpu_0_power_usage_percentage"}


@pytest.fixture(scope="module")
def lite0_run(small_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """One small real lite0 INT8 run, monitor on, with MLflow's own system metrics switched on in the environment
    (sampling every 0.1 s, so it would show within the run): (tracking URI, run id)."""
    folder = tmp_path_factory.mktemp("store-names")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("PTQ_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ptq-cache"))
        mp.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true")
        mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
        mlflow.set_tracking_uri(uri)
        cfg = RunConfig(model="lite0", data=small_dir, calib_size=8, eval_size=16, min_queries=4, min_duration_s=0, blocks=2, warmup=1,
                        monitor_interval=0.2, progress=False)  # fmt: skip
        yield uri, pipeline.run(cfg)


@pytest.fixture
def run(lite0_run: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> mlflow.entities.Run:
    uri, run_id = lite0_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    return mlflow.get_run(run_id)


def test_series_are_system_metrics_one_step_per_sample(run: mlflow.entities.Run) -> None:
    client = mlflow.MlflowClient()
    series = {k for k in run.data.metrics if k.startswith("system/")}
    assert not set(run.data.metrics) - series - SCALARS - ENERGY - GPU_COMPUTE  # nothing else: no sys/, proc/, gpu/, power/, phase/...
    assert {MEMORY, PROCESS_RSS, PHASE_INDEX, "system/cpu_utilization_percentage", "system/cpu_0_utilization_percentage"} <= series
    assert not series & MLFLOW_ONLY  # MLflow's sampler starts only for runs opened with mlflow.start_run
    samples = int(run.data.tags["monitor.samples"])
    assert samples > 10
    for key in series:
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        steps, times = [m.step for m in history], [m.timestamp for m in history]
        assert len(set(steps)) == len(steps) and set(steps) <= set(range(samples)), key  # one point per sample, no more
        assert times == sorted(times) and run.info.start_time <= times[0] and times[-1] <= run.info.end_time, key  # real times
        if key in (MEMORY, PROCESS_RSS, PHASE_INDEX):  # levels: read at every sample (rates skip intervals under 50 ms)
            assert steps == list(range(samples)), key


def test_phases_table_has_a_row_per_phase_the_run_went_through(run: mlflow.entities.Run) -> None:
    table = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/phases.json")
    frame = pd.DataFrame(table["data"], columns=table["columns"]).set_index("phase")
    assert set(frame.index) == PHASES and len(frame) == len(PHASES)
    assert {"seconds", "images", "cpu_pct_mean", "cpu_pct_max", "proc_cpu_pct_mean", "proc_cpu_pct_max", "peak_rss_mb", "peak_ram_used_mb"} <= set(frame.columns)
    assert (frame["seconds"] > 0).all() and run.data.metrics["compress/total_s"] < frame["seconds"].sum() < (run.info.end_time - run.info.start_time) / 1000
    assert frame.loc["latency", "images"] == run.data.metrics["latency/queries"] and frame.loc["evaluate", "images"] == 16
    assert (frame["peak_rss_mb"] > 100).all() and frame["cpu_pct_max"].max() <= 100
    compress = frame.loc[[p for p in pipeline.COMPRESS_PHASES if p in frame.index]]  # convert: fp16 only
    assert run.data.metrics["compress/peak_rss_mb"] == compress["peak_rss_mb"].max()
    assert compress["cpu_pct_mean"].min() <= run.data.metrics["compress/cpu_pct_mean"] <= compress["cpu_pct_max"].max()
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "monitor")}
    assert artifacts == {"monitor/timeline.csv", "monitor/timeline.png"}


def test_scalar_metrics_are_few_and_pinned(run: mlflow.entities.Run) -> None:
    scalars = {k for k in run.data.metrics if not k.startswith("system/")}
    power = any(run.data.tags.get(f"monitor.{source}", "").startswith("on") for source in ("nvml", "jetson", "rapl"))  # jetson: "on (jtop)"...
    assert scalars == SCALARS | (ENERGY if power else set())
    assert len(SCALARS) <= 43 and not any(k.startswith("phase/") for k in run.data.metrics)


def test_report_reads_the_phases_table(run: mlflow.entities.Run, tmp_path: Path) -> None:
    runs = mlflow.search_runs(experiment_ids=[run.info.experiment_id])
    table = report.add_phase_figures(report.tidy(runs), tmp_path)
    row = table.iloc[0]
    phases = report._artifact_table(run.info.run_id, "phases.json", tmp_path).set_index("phase")  # type: ignore[union-attr]
    assert (row.calib_cpu_pct, row.calib_rss_mb_peak) == (phases.loc["calibrate", "cpu_pct_mean"], phases.loc["calibrate", "peak_rss_mb"])
    assert row.latency_rss_mb_peak == phases.loc["latency", "peak_rss_mb"]
    if run.data.tags["monitor.nvml"] != "on" and not run.data.tags["monitor.jetson"].startswith("on"):
        assert pd.isna(row.latency_gpu_util_pct)  # not measured: a gap
    older = report.add_phase_figures(report.tidy(runs.assign(run_id="no-such-run")), tmp_path)  # an older run without phases.json
    assert older[["calib_cpu_pct", "calib_rss_mb_peak", "latency_cpu_pct", "latency_rss_mb_peak"]].isna().all().all()


class FakeNvml(types.ModuleType):
    """The parts of `pynvml` that ptq's and MLflow's samplers call, for one GPU with fixed readings."""

    NVML_TEMPERATURE_GPU, NVML_CLOCK_SM = 0, 1

    class NVMLError(Exception):
        pass

    def __init__(self) -> None:
        super().__init__("pynvml")
        self.nvmlInit = self.nvmlShutdown = lambda: None
        self.nvmlDeviceGetCount = lambda: 1
        self.nvmlDeviceGetHandleByIndex = lambda i: f"gpu{i}"
        self.nvmlDeviceGetName = lambda h: "Fake GPU"
        self.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=40, memory=15)
        self.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=3_000_000_000, total=8_000_000_000)
        self.nvmlDeviceGetTemperature = lambda h, sensor: 55
        self.nvmlDeviceGetClockInfo = lambda h, clock: 1410
        self.nvmlDeviceGetPowerUsage = lambda h: 120_000  # mW
        self.nvmlDeviceGetEnforcedPowerLimit = lambda h: 300_000

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: str) -> int:
        raise self.NVMLError("not supported")  # older GPUs: power is read instead


def test_names_and_meanings_match_mlflows_sampler(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Where ptq and MLflow's own sampler measure the same quantity they use one name, and the same definition."""
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(gpu_monitor, "pynvml", fake, raising=False)
    sources = [PsutilSource(), NvmlSource()]
    for source in sources:
        source.open()
    time.sleep(0.1)  # rates need 50 ms
    ours = {k: v for source in sources for k, v in source.read().items()}
    mlflows: dict[str, float] = {}
    for sampler in (cpu_monitor.CPUMonitor(), gpu_monitor.GPUMonitor()):
        sampler.collect_metrics()
        mlflows.update({f"system/{k}": v[-1] for k, v in sampler._metrics.items()})
    shared = set(ours) & set(mlflows)
    assert shared == {
        "system/cpu_utilization_percentage", "system/system_memory_usage_megabytes", "system/system_memory_usage_percentage",
        "system/gpu_0_utilization_percentage", "system/gpu_0_memory_usage_megabytes", "system/gpu_0_memory_usage_percentage",
        "system/gpu_0_power_usage_watts",
    }  # fmt: skip
    for key in shared - {"system/cpu_utilization_percentage"}:  # CPU: a rate over each sampler's own interval
        assert ours[key] == pytest.approx(mlflows[key], rel=0.02), key
    assert all(k.startswith("system/") for k in ours)
    zone = tmp_path / "intel-rapl:0"  # RAPL's files as the kernel lays them out
    zone.mkdir()
    (zone / "energy_uj").write_text("1000000")
    (zone / "max_energy_range_uj").write_text("262143328850")
    monkeypatch.setattr(RaplSource, "root", tmp_path)
    rapl = RaplSource()
    rapl.open()
    (zone / "energy_uj").write_text("3000000")
    assert list(rapl.read()) == [monitor.CPU_PACKAGE_POWER] and monitor.CPU_PACKAGE_POWER.endswith(monitor.POWER_SUFFIX)
