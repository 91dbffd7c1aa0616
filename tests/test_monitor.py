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
from ptq.monitor import (
    BOARD_POWER,
    CPU,
    GPU_TEMPERATURE,
    GPU_UTIL,
    PHASE_INDEX,
    PROCESS_CPU,
    PROCESS_RSS,
    Monitor,
    PsutilSource,
    Source,
    jtop_gpu_freq_mhz,
    jtop_metrics,
    jtop_tags,
)
from ptq.phases import Phases

pytestmark = pytest.mark.device  # torch-free: the Jetson lanes of .ci/run run it too

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
    assert m == {
        GPU_UTIL: 47.5,
        GPU_TEMPERATURE: 41.25,  # NVML's name for the same quantity on a discrete GPU
        BOARD_POWER: pytest.approx(7.252),  # mW -> W; the board total maps to one name only
        "system/power_vdd_cpu_gpu_cv_watts": pytest.approx(4.72),
        "system/power_vdd_soc_watts": pytest.approx(1.181),
        "system/temperature_cpu_celsius": 42.0,
        "system/temperature_tj_celsius": 43.5,
        "system/jetson_clocks_on": 1.0,
    }  # EMC utilisation is not logged: its unit is unverified (jtop's mc_all/rate, MangoHud's 100x that); CPU cores, RAM and swap are psutil's (the same kernel counters); 'OFF' engines and the fan's PWM are not numbers to log
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
        return {BOARD_POWER: 10.0}


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
        return {GPU_UTIL: 50.0}


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
    rows = {r["phase"]: r for r in mon.phase_rows()}
    assert set(rows) - {"idle"} == {"export", "calibrate", "latency"}  # idle: between phases, where that took a millisecond
    for phase in ("export", "calibrate", "latency"):
        r = rows[phase]
        assert r["seconds"] == pytest.approx(phases.seconds[phase], abs=0.02)
        assert r["peak_rss_mb"] > 10
        assert r["power_total_w_mean"] == 10.0 and r["energy_j"] == r["energy_total_j"] == pytest.approx(10.0 * r["seconds"], rel=1e-6)
    cores = psutil.cpu_count()
    assert rows["calibrate"]["proc_cpu_pct_mean"] > 60 / cores  # one core busy: 100 / cores % of the machine
    assert rows["calibrate"]["proc_cpu_pct_max"] <= 100 * 1.05 and rows["calibrate"]["cpu_pct_max"] <= 100
    assert rows["latency"]["images"] == 40 and rows["latency"]["energy_per_img_j"] == pytest.approx(rows["latency"]["energy_j"] / 40)
    assert rows["export"]["images"] == 0 and rows["export"]["energy_per_img_j"] is None
    both = mon.headline("work", ("export", "calibrate"), ("seconds", "peak_rss_mb", "cpu_pct_mean", "energy_j", "gpu_util_pct_mean"))
    assert both["work/seconds"] == pytest.approx(rows["export"]["seconds"] + rows["calibrate"]["seconds"])
    assert both["work/peak_rss_mb"] == max(rows["export"]["peak_rss_mb"], rows["calibrate"]["peak_rss_mb"])
    assert min(rows["export"]["cpu_pct_mean"], rows["calibrate"]["cpu_pct_mean"]) <= both["work/cpu_pct_mean"] <= rows["calibrate"]["cpu_pct_mean"]
    assert both["work/energy_j"] == pytest.approx(10.0 * both["work/seconds"]) and "work/gpu_util_pct_mean" not in both  # not measured: absent
    assert mon.headline("latency", ("latency",), ("energy_per_img_j",)) == {"latency/energy_per_img_j": rows["latency"]["energy_per_img_j"]}
    assert mon.headline("never", ("convert",), ("peak_rss_mb",)) == {}


class ScriptedRss(Source):
    """The process's RSS as a script of levels, one per read (the monitor reads at every phase boundary)."""

    name = "scripted-rss"

    def __init__(self, levels: list[float]) -> None:
        self.levels = iter(levels)

    def open(self) -> None:
        pass

    def read(self) -> dict[str, float]:
        return {PROCESS_RSS: next(self.levels)}


def test_memory_figures_come_with_their_increase_over_the_level_before() -> None:
    """Issue 23: what a phase added, apart from what the process held already. With no tick in between, the
    samples are: idle (until export) 100, export 180, idle 120, calibrate 300, idle (at stop) 110."""
    phases = Phases()
    mon = Monitor(3600.0, phases, [ScriptedRss([100.0, 180.0, 120.0, 300.0, 110.0])])
    mon.start()
    with phases("export"):
        pass
    with phases("calibrate"):
        pass
    mon.stop()
    assert [(s.phase, s.values[PROCESS_RSS]) for s in mon.samples] == [("idle", 100.0), ("export", 180.0), ("idle", 120.0), ("calibrate", 300.0), ("idle", 110.0)]
    rows = {r["phase"]: (r["peak_rss_mb"], r["peak_rss_delta_mb"]) for r in mon.phase_rows()}
    assert rows == {"idle": (120.0, 20.0), "export": (180.0, 80.0), "calibrate": (300.0, 180.0)}  # idle: from the run's first reading
    assert mon.headline("compress", ("export", "calibrate"), ("peak_rss_mb", "peak_rss_delta_mb")) == {
        "compress/peak_rss_mb": 300.0, "compress/peak_rss_delta_mb": 200.0,  # over the 100 MB before export began
    }  # fmt: skip
    table = mon.phase_table()
    columns = list(table)
    assert columns[columns.index("peak_rss_mb") + 1] == "peak_rss_delta_mb"
    assert table["peak_rss_delta_mb"] == [20.0, 80.0, 180.0]


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
    busy = [s for s in mon.samples if s.phase.startswith("busy") and CPU in s.values]
    assert len(busy) >= 6
    floor = 100 / psutil.cpu_count() * 0.6
    assert all(s.values[CPU] > floor for s in busy), [(s.phase, round(s.dt, 3), s.values[CPU]) for s in busy]
    # the process's share in the same unit, % of the whole machine: one busy core is about 100/cores, never ~100 per core
    # (its interval and the system's differ by the sampling's own microseconds, so no tighter bound than that)
    assert all(floor < s.values[PROCESS_CPU] <= 100 / psutil.cpu_count() * 1.5 for s in busy), [(round(s.dt, 3), s.values[PROCESS_CPU]) for s in busy]


def test_failing_source_warns_once_and_run_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    phases = Phases()
    mon = Monitor(0.05, phases, [PsutilSource(), Flaky(), Absent()])
    with caplog.at_level(logging.WARNING):
        mon.start()
        with phases("work"):
            time.sleep(0.4)
        mon.stop()
    assert caplog.text.count("monitor source flaky failed") == 1
    assert sum(GPU_UTIL in s.values for s in mon.samples) == 2
    assert len(mon.samples) > 4 and all(PROCESS_RSS in s.values for s in mon.samples)
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


def test_logs_series_table_headline_and_artifacts(tmp_path: Path) -> None:
    phases = Phases()
    mon = Monitor(0.05, phases, [PsutilSource(), ConstantPower()])
    mon.start()
    with phases("quantize"):
        time.sleep(0.3)
    mon.count_images("latency", 8)
    with phases("latency"):
        time.sleep(0.1)
    mon.stop()
    client = mlflow.MlflowClient()
    run = client.create_run("0")
    started = time.time() * 1000
    pipeline._log_monitor(tracking.Recorder(client, run.info.run_id, "Default", "monitor"), mon, tmp_path)
    history = client.get_metric_history(run.info.run_id, PROCESS_RSS)
    assert [m.step for m in history] == list(range(len(mon.samples)))  # one step per sample: a line, not a zigzag
    assert all(started - 5000 < m.timestamp <= started for m in history)  # real times
    table = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/phases.json")
    rows = [row[0] for row in table["data"]]  # in the order the run first entered them
    assert set(rows) - {"idle"} == {"quantize", "latency"} and rows.index("quantize") < rows.index("latency")
    assert table["columns"][:3] == ["phase", "seconds", "images"] and "energy_per_img_j" in table["columns"]
    index = client.get_metric_history(run.info.run_id, PHASE_INDEX)  # a sample's phase, as its row in phases.json
    assert [m.value for m in index] == [float(rows.index(s.phase)) for s in mon.samples]
    data = client.get_run(run.info.run_id).data
    assert set(data.metrics) - {k for k in data.metrics if k.startswith("system/")} == {
        "compress/peak_rss_mb", "compress/peak_rss_delta_mb", "compress/cpu_pct_mean", "latency/energy_per_img_j",
    }
    assert data.metrics["latency/energy_per_img_j"] == pytest.approx(10.0 * phases.seconds["latency"] / 8, rel=0.2)
    assert data.tags["monitor.samples"] == str(len(mon.samples)) and float(data.tags["monitor.own_cpu_pct_of_one_core"]) >= 0
    assert {a.path for a in client.list_artifacts(run.info.run_id, "monitor")} == {"monitor/timeline.csv", "monitor/timeline.png"}


def test_peak_rss_is_this_process_own_from_vmhwm(tmp_path: Path) -> None:
    from ptq.monitor import peak_rss_bytes

    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmPeak:\t 9000000 kB\nVmHWM:\t  123456 kB\nVmRSS:\t  100000 kB\n")
    assert peak_rss_bytes(status) == 123456 * 1024  # not getrusage's ru_maxrss, which a fork+exec child inherits
