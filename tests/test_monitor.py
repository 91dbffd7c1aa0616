"""Monitor: phase labelling, per-phase summaries, energy, failing and absent sources, the jtop mapping."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import mlflow
import psutil
import pytest

from ptq import pipeline, tracking
from ptq.monitor import Monitor, PsutilSource, Source, jtop_gpu_freq_mhz, jtop_metrics, jtop_tags
from ptq.phases import Phases

# A `jtop.stats` dictionary as jetson-stats 4.x returns it on a Jetson AGX Orin (values as documented:
# CPU/GPU in %, RAM/SWAP as fractions, power in mW, temperatures in °C).
ORIN_STATS = {
    "time": "2024-05-01 10:00:00",
    "uptime": "1 day",
    "CPU1": 29, "CPU2": 25, "CPU3": "OFF", "CPU4": 31,
    "RAM": 0.296, "SWAP": 0.0, "EMC": 3, "GPU": 47.5,
    "APE": "OFF", "NVDEC": "OFF", "NVENC": "OFF",
    "Fan pwmfan0": 21.96,
    "Temp CPU": 42.0, "Temp GPU": 41.25, "Temp tj": 43.5,
    "Power VDD_CPU_GPU_CV": 4720, "Power VDD_SOC": 1181, "Power TOT": 7252,
    "jetson_clocks": "ON", "nvp model": "MAXN",
}


def test_jtop_mapping() -> None:
    m = jtop_metrics(ORIN_STATS)
    assert m["gpu/util_pct"] == 47.5
    assert m["sys/ram_used_pct"] == pytest.approx(29.6)
    assert m["power/total_w"] == pytest.approx(7.252)
    assert m["power/vdd_cpu_gpu_cv_w"] == pytest.approx(4.72)
    assert m["power/vdd_soc_w"] == pytest.approx(1.181)
    assert m["temp/gpu_c"] == 41.25 and m["temp/tj_c"] == 43.5
    assert m["jetson/cpu1_pct"] == 29 and "jetson/cpu3_pct" not in m  # an offline core is absent, not zero
    assert m["jetson/emc_pct"] == 3 and m["jetson/clocks_on"] == 1.0
    assert "power/tot_w" not in m  # the board total maps to one name only
    assert jtop_tags(ORIN_STATS) == {"device.nvpmodel": "MAXN", "device.jetson_clocks": "ON"}


# `jtop.gpu` on an Orin (jetson-stats 4.x): keyed by the GPU's name, frequencies in kHz.
ORIN_GPU = {
    "ga10b": {
        "type": "integrated",
        "status": {"railgate": False, "tpc_pg_mask": False, "3d_scaling": True, "load": 47.5},
        "freq": {"governor": "nvhost_podgov", "cur": 1300500, "max": 1300500, "min": 306000, "GPC": [1300500, 1300500]},
        "power_control": "auto",
    }
}


def test_jtop_gpu_frequency() -> None:
    assert jtop_gpu_freq_mhz(ORIN_GPU) == pytest.approx(1300.5)
    assert jtop_gpu_freq_mhz({"gv11b": {"type": "integrated", "status": {}, "freq": {"cur": 1377000}}}) == 1377.0  # Xavier
    assert jtop_gpu_freq_mhz({"0": {"type": "discrete", "freq": {}}}) is None and jtop_gpu_freq_mhz(None) is None


class ConstantPower(Source):
    name = "fake-power"

    def open(self) -> None:
        pass

    def read(self) -> dict[str, float]:
        return {"power/total_w": 10.0}


class Flaky(Source):
    name = "flaky"

    def __init__(self) -> None:
        self.reads = 0

    def open(self) -> None:
        pass

    def read(self) -> dict[str, float]:
        self.reads += 1
        if self.reads > 2:
            raise PermissionError("GPU vanished")
        return {"gpu/util_pct": 50.0}


class Absent(Source):
    name = "absent"

    def open(self) -> None:
        raise FileNotFoundError("no such sensor")

    def read(self) -> dict[str, float]:
        raise AssertionError("never read")


def test_every_phase_gets_its_own_figures_even_when_short() -> None:
    phases = Phases()
    mon = Monitor(1.0, phases, [PsutilSource(), ConstantPower()])
    mon.start()
    with phases("export"):
        time.sleep(0.12)
    with phases("calibrate"):
        end = time.perf_counter() + 0.15
        while time.perf_counter() < end:  # busy: CPU shows up
            pass
    mon.count_images("latency", 40)
    with phases("latency"):
        time.sleep(0.2)
    mon.stop()
    s = mon.summary()
    for phase in ("export", "calibrate", "latency"):
        assert s[f"phase/{phase}/seconds"] == pytest.approx(phases.seconds[phase], abs=0.02)
        assert s[f"phase/{phase}/rss_mb_peak"] > 10
        assert s[f"phase/{phase}/energy_j"] == pytest.approx(10.0 * s[f"phase/{phase}/seconds"], rel=1e-6)
    assert s["phase/calibrate/proc_cpu_pct_mean"] > 20
    assert s["phase/latency/energy_per_img_j"] == pytest.approx(s["phase/latency/energy_j"] / 40)
    assert {smp.phase for smp in mon.samples} >= {"export", "calibrate", "latency"}


def test_cpu_rates_cover_each_interval_whichever_thread_samples() -> None:
    """Ticks come from the sampler thread and boundaries from the run's thread; psutil.cpu_percent keeps a
    baseline per thread, which made the first tick of a run read 0 % and later ones span the wrong interval."""
    phases = Phases()
    mon = Monitor(0.15, phases, [PsutilSource()])
    mon.start()
    for name in ("busy1", "busy2", "busy3"):
        with phases(name):
            end = time.perf_counter() + 0.4
            while time.perf_counter() < end:  # one core fully busy: system CPU is at least 1/cores of the machine
                pass
    mon.stop()
    busy = [s for s in mon.samples if s.phase.startswith("busy") and "sys/cpu_pct" in s.values]
    assert len(busy) >= 6
    floor = 100 / psutil.cpu_count() * 0.6
    assert all(s.values["sys/cpu_pct"] > floor for s in busy), [(s.phase, round(s.dt, 3), s.values["sys/cpu_pct"]) for s in busy]


def test_failing_source_warns_once_and_run_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    phases = Phases()
    mon = Monitor(0.05, phases, [PsutilSource(), Flaky(), Absent()])
    with caplog.at_level(logging.WARNING):
        mon.start()
        with phases("work"):
            time.sleep(0.4)
        mon.stop()
    assert caplog.text.count("monitor source flaky failed") == 1
    assert sum("gpu/util_pct" in s.values for s in mon.samples) == 2
    assert len(mon.samples) > 4 and all("proc/rss_mb" in s.values for s in mon.samples)
    tags = mon.tags()
    assert tags["monitor.flaky"].startswith("absent (failed mid-run")
    assert tags["monitor.absent"].startswith("absent (FileNotFoundError") and tags["monitor.psutil"] == "on"


def test_sampler_thread_never_outlives_stop() -> None:
    mon = Monitor(0.01, None, [PsutilSource()])
    mon.start()
    time.sleep(0.05)
    mon.stop()
    mon.stop()  # idempotent
    assert not [t for t in threading.enumerate() if t.name == "ptq-monitor"]
    assert mon.own_cpu_pct() >= 0


def test_logs_series_summaries_and_artifacts(tmp_path: Path) -> None:
    phases = Phases()
    mon = Monitor(0.05, phases, [PsutilSource(), ConstantPower()])
    mon.start()
    with phases("quantize"):
        time.sleep(0.3)
    mon.stop()
    client = mlflow.MlflowClient()
    run = client.create_run("0")
    pipeline._log_monitor(tracking.Recorder(client, run.info.run_id, "Default", "monitor"), mon, tmp_path)
    history = client.get_metric_history(run.info.run_id, "proc/rss_mb")
    assert len(history) == len(mon.samples) and all(m.timestamp > 0 for m in history)
    data = client.get_run(run.info.run_id).data
    assert data.metrics["phase/quantize/energy_j"] > 0 and "monitor/own_cpu_pct" in data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id, "monitor")} == {"monitor/timeline.csv", "monitor/timeline.png"}
