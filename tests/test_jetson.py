"""Jetson monitoring without jtop: sysfs trees of an Orin NX and an AGX Xavier, tegrastats lines, the Monitor's energy."""

from __future__ import annotations

import os
import shutil
import stat
import time
from pathlib import Path

import pytest

from ptq import jetson
from ptq.jetson import EMC_FREQUENCY, EMC_UTIL, JetsonSysfsSource, TegrastatsSource, parse_tegrastats, readable_sources
from ptq.monitor import BOARD_POWER, GPU_FREQUENCY, GPU_TEMPERATURE, GPU_UTIL, JETSON_CLOCKS, Monitor

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "jetson"
ORIN, XAVIER = FIXTURES / "orin", FIXTURES / "xavier"
approx = pytest.approx

pytestmark = pytest.mark.device


def copy_of(tree: Path, tmp_path: Path) -> Path:
    """A writable copy of a fixture tree."""
    return Path(shutil.copytree(tree, tmp_path / tree.name))


def test_tegrastats_xavier() -> None:
    line = (FIXTURES / "tegrastats_xavier.txt").read_text().splitlines()[0]
    assert parse_tegrastats(line) == {
        GPU_UTIL: 25.0, GPU_FREQUENCY: 1377.0, EMC_UTIL: 0.0, EMC_FREQUENCY: 2133.0,
        GPU_TEMPERATURE: 28.0,  # "GPU@28C"; the PMIC's constant 100 °C is dropped
        "system/temperature_ao_celsius": 26.5, "system/temperature_iwlwifi_celsius": 30.0,
        "system/temperature_tdiode_celsius": 31.25, "system/temperature_aux_celsius": 27.0,
        "system/temperature_cpu_celsius": 28.0, "system/temperature_thermal_celsius": 27.45,
        "system/temperature_tboard_celsius": 27.0,
        "system/power_gpu_watts": approx(1.155), "system/power_cpu_watts": approx(0.385),
        "system/power_soc_watts": approx(2.502), "system/power_cv_watts": 0.0,
        "system/power_vddrq_watts": approx(0.192), "system/power_sys5v_watts": approx(2.692),
        BOARD_POWER: approx(6.926),  # no input rail on an AGX Xavier: the sum of its rails, as jtop's TOT
    }


def test_tegrastats_orin() -> None:
    jp7, jp5 = (FIXTURES / "tegrastats_orin.txt").read_text().splitlines()
    assert parse_tegrastats(jp7) == {
        GPU_UTIL: 12.0, GPU_FREQUENCY: 1300.0,  # "GR3D_FREQ 12%@[1300,1300]" (JetPack 7)
        EMC_UTIL: 3.0, EMC_FREQUENCY: 3199.0,
        "system/temperature_cpu_celsius": 52.968, "system/temperature_soc2_celsius": 48.406,
        "system/temperature_soc0_celsius": 49.531, GPU_TEMPERATURE: 47.625,  # "gpu@47.625C/47.625C"
        "system/power_vdd_gpu_soc_watts": approx(5.139), "system/power_vdd_cpu_cv_watts": approx(3.268),
        "system/power_vin_sys_5v0_watts": approx(5.5),
        BOARD_POWER: approx(13.907),  # "cur/avg/max" in mW: the current value; no input rail on an AGX Orin
    }
    m = parse_tegrastats(jp5)
    assert GPU_TEMPERATURE not in m and "system/temperature_cv0_celsius" not in m  # -256 °C: sensor offline
    assert m[GPU_UTIL] == 30.0 and m["system/temperature_tj_celsius"] == 41.656
    assert not [k for k in m if "nc_watts" in k]  # the "NC" (not connected) channels are left out
    assert m[BOARD_POWER] == approx(2.390 + 0.796 + 3.522 + 0.301)


def test_orin_sysfs_reads_exact_values() -> None:
    src = JetsonSysfsSource(ORIN)
    src.open()
    assert src.read() == {
        BOARD_POWER: approx(5040 * 880 / 1e6),  # VDD_IN: mV x mA, and the board total only (not also a rail)
        "system/power_vdd_cpu_gpu_cv_watts": approx(5032 * 96 / 1e6),
        "system/power_vdd_soc_watts": approx(5032 * 279 / 1e6),
        GPU_UTIL: approx(12.3),  # load 123 per mille
        GPU_FREQUENCY: 306.0,
        "system/temperature_cpu_celsius": 47.25, GPU_TEMPERATURE: 46.187,  # "gpu-thermal" (JetPack 6 naming)
        "system/temperature_soc0_celsius": 45.5, "system/temperature_tj_celsius": 47.5,  # cv0 reads -256: offline
        EMC_FREQUENCY: 2133.0, EMC_UTIL: approx(3.0),
        JETSON_CLOCKS: 0.0,
    }
    assert src.tags() == {
        "device.nvpmodel": "15W", "device.jetson_clocks": "off",
        "device.jetson_model": "NVIDIA Jetson Orin NX Engineering Reference Developer Kit",
        "device.l4t": "R35.4.1", "device.power_total": "VDD_IN rail (board input)",
    }


def test_xavier_sysfs_reads_exact_values() -> None:
    src = JetsonSysfsSource(XAVIER)
    src.open()
    values = src.read()
    assert values[BOARD_POWER] == approx(6.926)  # GPU+CPU+SOC+CV+VDDRQ+SYS5V in_power (mW), counted once each
    assert {k: v for k, v in values.items() if k.startswith("system/power_") and k != BOARD_POWER} == {
        "system/power_gpu_watts": approx(1.155), "system/power_cpu_watts": approx(0.385),
        "system/power_soc_watts": approx(2.502), "system/power_cv_watts": 0.0,
        "system/power_vddrq_watts": approx(0.192), "system/power_sys5v_watts": approx(2.692),
    }
    assert values[GPU_UTIL] == 25.0 and values[GPU_FREQUENCY] == 1377.0 and values[GPU_TEMPERATURE] == 28.0
    assert "system/temperature_pmic_celsius" not in values and values[JETSON_CLOCKS] == 1.0
    assert EMC_UTIL not in values  # no debugfs: absent, not zero
    assert src.tags()["device.nvpmodel"] == "MAXN" and src.tags()["device.jetson_clocks"] == "on"
    assert src.tags()["device.l4t"] == "R32.7.1"


def test_unreadable_rail_is_absent_with_a_reason(tmp_path: Path) -> None:
    root = copy_of(XAVIER, tmp_path)
    soc = root / "sys/bus/i2c/drivers/ina3221x/1-0040/iio:device0/in_power2_input"
    soc.unlink()
    soc.mkdir()  # unreadable even as root, where chmod 000 would not stop a read
    listing = {r.source: r for r in readable_sources(root)}
    assert not listing["rail SOC"].ok and "IsADirectoryError" in listing["rail SOC"].detail
    assert listing["rail GPU"].ok and listing["rail GPU"].detail == "1.155 W"
    src = JetsonSysfsSource(root)
    src.open()
    values = src.read()
    assert "system/power_soc_watts" not in values  # never a fake zero
    assert BOARD_POWER not in values  # a sum without SOC would understate the board
    assert "SOC: IsADirectoryError" in src.tags()["device.power_rails_unreadable"]


def test_missing_rail_file_mid_run_drops_it_from_that_sample(tmp_path: Path) -> None:
    root = copy_of(ORIN, tmp_path)
    src = JetsonSysfsSource(root)
    src.open()
    (root / "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3/curr3_input").unlink()
    values = src.read()
    assert "system/power_vdd_soc_watts" not in values
    assert values[BOARD_POWER] == approx(5040 * 880 / 1e6)  # the input rail still measures the whole board


def test_not_a_jetson(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a Jetson"):
        JetsonSysfsSource(tmp_path).open()
    laptop = copy_of(ORIN, tmp_path / "laptop")  # thermal zones alone are any Linux machine's, not a Jetson's
    shutil.rmtree(laptop / "sys" / "bus")
    shutil.rmtree(laptop / "sys" / "class" / "devfreq")
    with pytest.raises(FileNotFoundError, match="not a Jetson: no INA3221 rails or Jetson GPU devfreq"):
        JetsonSysfsSource(laptop).open()
    listing = {r.source: r for r in readable_sources(tmp_path)}
    assert not listing["rails"].ok and "no INA3221 rails" in listing["rails"].detail
    assert not listing["GPU load"].ok and not listing["nvpmodel"].ok
    assert jetson.jetson_clocks_state(tmp_path)[0] == "unknown"


def test_jetson_clocks_from_min_and_max(tmp_path: Path) -> None:
    assert jetson.jetson_clocks_state(XAVIER) == ("on", "CPU and GPU minimum clocks equal their maximum")
    assert jetson.jetson_clocks_state(ORIN) == ("off", "cpu0 scales 729600..1984000 kHz")
    root = copy_of(ORIN, tmp_path)
    for c in (0, 1):  # CPUs locked, the GPU still scaling: not on
        (root / f"sys/devices/system/cpu/cpu{c}/cpufreq/scaling_min_freq").write_text("1984000\n")
    assert jetson.jetson_clocks_state(root) == ("off", "GPU ga10b scales 306..918 MHz")
    (root / "sys/class/devfreq/17000000.ga10b/min_freq").write_text("918000000\n")
    assert jetson.jetson_clocks_state(root)[0] == "on"
    (root / "sys/devices/system/cpu/cpu1/online").write_text("0\n")  # an offline core does not count
    (root / "sys/devices/system/cpu/cpu1/cpufreq/scaling_min_freq").write_text("729600\n")
    assert jetson.jetson_clocks_state(root)[0] == "on"


def test_power_mode_max(tmp_path: Path) -> None:
    orin = jetson.power_mode(ORIN)
    assert (orin.current_id, orin.current_name, orin.max_id, orin.max_name, orin.is_max) == (2, "15W", 0, "MAXN", False)
    assert jetson.power_mode(XAVIER).is_max is True
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nvpmodel.conf").write_text(  # Orin Nano Super: the fastest mode is not id 0
        "< POWER_MODEL ID=0 NAME=15W >\n< POWER_MODEL ID=1 NAME=25W >\n< POWER_MODEL ID=2 NAME=MAXN_SUPER >\n"
        "< PM_CONFIG DEFAULT=2 >\n")
    mode = jetson.power_mode(tmp_path)  # no status file: the default applies
    assert (mode.current_id, mode.max_id, mode.is_max) == (2, 2, True)
    (tmp_path / "etc/nvpmodel.conf").write_text("< POWER_MODEL ID=0 NAME=15W >\n< POWER_MODEL ID=1 NAME=7W >\n")
    (tmp_path / "var/lib/nvpmodel").mkdir(parents=True)
    (tmp_path / "var/lib/nvpmodel/status").write_text("pmode:0001 fmode:quiet\n")
    mode = jetson.power_mode(tmp_path)  # no MAXN at all: id 0 is the fastest
    assert (mode.current_name, mode.max_name, mode.is_max) == ("7W", "15W", False)


def test_monitor_energy_per_phase_is_power_times_time() -> None:
    monitor = Monitor(0.05, sources=[JetsonSysfsSource(XAVIER)])
    monitor.start()
    for phase, seconds in (("warmup", 0.12), ("infer", 0.2), ("report", 0.06)):
        monitor.on_phase(phase)
        time.sleep(seconds)
    monitor.on_phase(None)
    monitor.stop()
    assert "monitor.jetson-sysfs" in monitor.tags() and monitor.tags()["monitor.jetson-sysfs"] == "on"
    rows = {r["phase"]: r for r in monitor.phase_rows()}
    for phase in ("warmup", "infer", "report"):
        row = rows[phase]
        samples = [s for s in monitor.samples if s.phase == phase]
        assert row["seconds"] == approx(sum(s.dt for s in samples)) and row["seconds"] > 0
        assert row["energy_total_j"] == approx(6.926 * row["seconds"])
        assert row["energy_j"] == row["energy_total_j"]  # the board total, not total + rails
        assert row["energy_gpu_j"] == approx(1.155 * row["seconds"])


def fake_tegrastats(tmp_path: Path, line: str) -> Path:
    """A `tegrastats` on PATH that prints `line` every interval, like the real one."""
    folder = tmp_path / "bin"
    folder.mkdir()
    exe = folder / "tegrastats"
    exe.write_text(f"#!/bin/sh\nwhile true; do echo '{line}'; sleep 0.05; done\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return folder


def test_tegrastats_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    line = (FIXTURES / "tegrastats_xavier.txt").read_text().strip()
    monkeypatch.setenv("PATH", f"{fake_tegrastats(tmp_path, line)}{os.pathsep}{os.environ['PATH']}")
    src = TegrastatsSource(interval_ms=50)
    src.open()
    try:
        assert src.read() == parse_tegrastats(line)
        proc = src.proc
    finally:
        src.close()
    assert proc is not None and proc.poll() is not None and src.proc is None  # the subprocess is gone


def test_tegrastats_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="tegrastats not found"):
        TegrastatsSource().open()
