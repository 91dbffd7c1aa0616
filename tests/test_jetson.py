"""Jetson monitoring without jtop: sysfs trees of real boards' layouts (JetPack 4 AGX Xavier, JetPack 5 Xavier NX,
AGX Xavier and Orin NX, JetPack 6 Orin NX with a power-gated zone), tegrastats lines, jtop's names, the Monitor's energy."""

from __future__ import annotations

import io
import os
import shutil
import stat
import time
from pathlib import Path
from typing import Callable, Iterator, List

import pytest

from ptq import jetson
from ptq.jetson import EMC_FREQUENCY, EMC_UTIL, JetsonSysfsSource, TegrastatsSource, parse_tegrastats, readable_sources
from ptq.monitor import BOARD_POWER, GPU_FREQUENCY, GPU_TEMPERATURE, GPU_UTIL, JETSON_CLOCKS, Monitor, jtop_metrics

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "jetson"
ORIN, XAVIER = FIXTURES / "orin", FIXTURES / "xavier"  # JetPack 5 Orin NX, JetPack 4 AGX Xavier (iio)
ORIN_JP6, XAVIER_NX, AGX_XAVIER = FIXTURES / "orin_jp6", FIXTURES / "xavier_nx_jp5", FIXTURES / "agx_xavier_jp5"
approx = pytest.approx

pytestmark = pytest.mark.device


def copy_of(tree: Path, tmp_path: Path) -> Path:
    """A writable copy of a fixture tree."""
    return Path(shutil.copytree(tree, tmp_path / tree.name))


@pytest.fixture
def eagain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Path], List[Path]]]:
    """Make the files a tree lists in its EAGAIN file fail their reads as a power-gated zone does on JetPack 6
    (the kernel's read returns -EAGAIN: "thermal: tegra-bpmp: Handle offline zones"). Such a file cannot be stored,
    so each is opened, through Path.open, as a FIFO with O_NONBLOCK that a writer holds open and nobody writes:
    read(2) then fails with EAGAIN and CPython's own I/O stack answers exactly as on the board (FileIO.read returns
    None, `Path.read_text()` raises TypeError "can't concat NoneType to bytes"; `readline()` returns '')."""
    fifo = tmp_path / "eagain.fifo"
    os.mkfifo(fifo)
    keep_reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    writer = os.open(fifo, os.O_WRONLY)  # a writer that never writes: reads wait for data (EAGAIN), never see EOF
    real_open = Path.open

    def gate(root: Path) -> List[Path]:
        gated = [root / line.strip() for line in (root / "EAGAIN").read_text().splitlines()
                 if line.strip() and not line.startswith("#")]

        def open_(self: Path, mode: str = "r", *args: object, **kwargs: object) -> object:
            if self in gated:
                return io.open(fifo, mode, opener=lambda path, flags: os.open(path, flags | os.O_NONBLOCK))
            return real_open(self, mode, *args, **kwargs)  # type: ignore[call-overload]

        monkeypatch.setattr(Path, "open", open_)
        return gated

    yield gate
    monkeypatch.undo()
    os.close(writer)
    os.close(keep_reader)


def test_gated_read_fails_as_cpython_fails_on_the_board(eagain: Callable[[Path], List[Path]]) -> None:
    [zone_temp] = eagain(ORIN_JP6)
    with pytest.raises(TypeError, match="can't concat NoneType to bytes"):  # what crashed every JetPack 6 run
        zone_temp.read_text()
    with zone_temp.open() as f:
        assert f.readline() == ""  # why jetson-stats, which reads with readline(), survives (and reports -256)
    with pytest.raises(OSError, match="EAGAIN"):
        jetson.read_text(zone_temp)
    assert (ORIN_JP6 / "sys/class/thermal/thermal_zone0/temp").read_text() == "47250\n"  # other files read as usual


def test_jetpack6_orin_gated_zone_is_left_out_and_the_rest_is_read(eagain: Callable[[Path], List[Path]]) -> None:
    eagain(ORIN_JP6)
    src = JetsonSysfsSource(ORIN_JP6)
    src.open()
    values = src.read()  # before: TypeError at the first sample, and the whole Jetson source dropped
    assert {k: v for k, v in values.items() if "temperature" in k} == {
        "system/temperature_cpu_celsius": 47.25, GPU_TEMPERATURE: 46.187,  # "gpu-thermal" under the GPU's name
        "system/temperature_soc0_celsius": 45.5, "system/temperature_tj_celsius": 47.5,
    }  # cv0 (gated) absent: neither a crash nor a fake value
    assert values[BOARD_POWER] == approx(5040 * 880 / 1e6) and values[GPU_UTIL] == approx(12.3)
    assert values[GPU_FREQUENCY] == 306.0  # the JetPack 6 GPU node 17000000.gpu (of_node "gpu")
    assert src.gpu is not None and src.gpu.devfreq.name == "17000000.gpu"
    assert src.tags()["device.l4t"] == "R36.3.0"
    listing = {r.source: r for r in readable_sources(ORIN_JP6)}
    assert listing["thermal"].ok and listing["thermal"].detail == (
        "cpu, gpu, soc0, tj; cv0 offline (BlockingIOError: [Errno 11] read failed with EAGAIN (sensor powered off): "
        f"'{ORIN_JP6}/sys/class/thermal/thermal_zone2/temp'), left out")


def test_jtop_jetpack6_names_and_offline_sensors() -> None:
    """jtop's stats on JetPack 6: zone "gpu-thermal" is "Temp gpu" (jtop/core/temperature.py takes the type's head),
    a sensor it cannot read is -256 (TEMPERATURE_OFFLINE; a gated zone reads '' through readline)."""
    stats = {"Temp cpu": 47.25, "Temp gpu": 46.187, "Temp cv0": -256, "Temp soc0": 45.5, "Temp nvme Composite": 38.85,
             "GPU": 12.3, "EMC": 3, "Power TOT": 4435}
    assert jtop_metrics(stats) == {
        "system/temperature_cpu_celsius": 47.25, GPU_TEMPERATURE: 46.187,  # the sysfs reader's series names
        "system/temperature_soc0_celsius": 45.5, "system/temperature_nvme_composite_celsius": 38.85,
        GPU_UTIL: 12.3, BOARD_POWER: approx(4.435),
    }  # no -256 °C; jtop's EMC quotient (unit unverified) is not logged
    assert jtop_metrics({"Temp GPU": 41.25}) == {GPU_TEMPERATURE: 41.25}  # JetPack 5's name: the same series


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


def test_tegrastats_gpu_clock_is_the_fastest_gpc() -> None:
    """GR3D_FREQ lists one clock per GPC on JetPack 7; a gated GPC reads 0. jetson-stats takes the max
    (jtop/core/tegra_parse.py), which is what the devfreq target (sysfs, jtop's freq.cur) means."""
    assert parse_tegrastats("GR3D_FREQ 12%@[0,1300]")[GPU_FREQUENCY] == 1300.0
    assert parse_tegrastats("GR3D_FREQ @[1000,998,1000]") == {GPU_FREQUENCY: 1000.0}  # Thor: no load figure


def test_tegrastats_datadog_agx_xavier_and_xavier_nx() -> None:
    """Real lines from DataDog's agent tests (agXSample, xavierNxSample in jetson_test.go)."""
    agx, nx = (FIXTURES / "tegrastats_xavier.txt").read_text().splitlines()[1:]
    assert parse_tegrastats(agx) == {
        GPU_UTIL: 0.0, GPU_FREQUENCY: 318.0, EMC_UTIL: 0.0, EMC_FREQUENCY: 665.0,
        "system/temperature_ao_celsius": 37.5, GPU_TEMPERATURE: 37.5, "system/temperature_tdiode_celsius": 40.0,
        "system/temperature_aux_celsius": 36.0, "system/temperature_cpu_celsius": 37.5,
        "system/temperature_thermal_celsius": 36.9, "system/temperature_tboard_celsius": 37.0,
        "system/power_gpu_watts": 0.0, "system/power_cpu_watts": approx(0.311), "system/power_soc_watts": approx(0.932),
        "system/power_cv_watts": 0.0, "system/power_vddrq_watts": approx(0.621), "system/power_sys5v_watts": approx(1.482),
        BOARD_POWER: approx(3.346),  # no input rail on AGX Xavier: the sum
    }
    m = parse_tegrastats(nx)
    assert m[BOARD_POWER] == approx(4.067) and "system/power_vdd_in_watts" not in m  # VDD_IN is the total only
    assert (m[GPU_UTIL], m[GPU_FREQUENCY], m[EMC_UTIL], m[EMC_FREQUENCY]) == (62.0, 306.0, 10.0, 1600.0)
    assert m["system/power_vdd_cpu_gpu_cv_watts"] == approx(0.738) and m["system/power_vdd_soc_watts"] == approx(1.353)


def test_xavier_nx_jetpack5_hwmon() -> None:
    src = JetsonSysfsSource(XAVIER_NX)
    src.open()
    assert src.read() == {
        BOARD_POWER: approx(4.067),  # VDD_IN at 7-0040: 4900 mV x 830 mA, as DataDog's line reads 4067 mW
        "system/power_vdd_cpu_gpu_cv_watts": approx(0.738), "system/power_vdd_soc_watts": approx(1.353),
        GPU_UTIL: 62.0, GPU_FREQUENCY: 306.0,
        "system/temperature_ao_celsius": 41.5, GPU_TEMPERATURE: 43.0, "system/temperature_aux_celsius": 41.5,
        "system/temperature_cpu_celsius": 43.5, "system/temperature_thermal_celsius": 42.55,  # PMIC-Die left out
        JETSON_CLOCKS: 0.0,
    }
    assert src.tags()["device.nvpmodel"] == "MODE_20W_6CORE" and src.tags()["device.l4t"] == "R35.4.1"


def test_agx_xavier_jetpack5_hwmon_two_devices() -> None:
    src = JetsonSysfsSource(AGX_XAVIER)
    src.open()
    values = src.read()
    assert {k: v for k, v in values.items() if k.startswith("system/power_")} == {
        "system/power_gpu_watts": 0.0, "system/power_cpu_watts": approx(0.31), "system/power_soc_watts": approx(0.93),
        "system/power_cv_watts": 0.0, "system/power_vddrq_watts": approx(0.62), "system/power_sys5v_watts": approx(1.48),
        BOARD_POWER: approx(3.34),  # 1-0040 (GPU, CPU, SOC) + 1-0041 (CV, VDDRQ, SYS5V): no input rail, the sum
    }
    assert src.tags()["device.power_total"] == "sum of rails GPU+CPU+SOC+CV+VDDRQ+SYS5V (no board input rail)"
    mode = jetson.power_mode(AGX_XAVIER)
    assert (mode.current_name, mode.max_name, mode.is_max) == ("MODE_30W_ALL", "MAXN", False)


def test_emc_utilisation_is_not_logged_from_sysfs() -> None:
    """mc_all's unit is unverified (jetson-stats: mc_all // rate_kHz; MangoHud: 100x that): the frequency is
    logged, the raw numbers go to the field check only."""
    assert jetson.read_emc(ORIN) == {EMC_FREQUENCY: 2133.0}
    assert jetson.emc_raw(ORIN) == {"rate_hz": "2133000000", "max_rate_hz": "3199000000", "mc_all": "6399000",
                                    "mc_all_file": "/sys/kernel/actmon_avg_activity/mc_all"}
    assert jetson.emc_raw(XAVIER)["rate_hz"].startswith("unreadable: FileNotFoundError")


def test_orin_sysfs_reads_exact_values() -> None:
    src = JetsonSysfsSource(ORIN)
    src.open()
    assert src.read() == {
        BOARD_POWER: approx(5040 * 880 / 1e6),  # VDD_IN: mV x mA, and the board total only (not also a rail)
        "system/power_vdd_cpu_gpu_cv_watts": approx(5032 * 96 / 1e6),
        "system/power_vdd_soc_watts": approx(5032 * 279 / 1e6),
        GPU_UTIL: approx(12.3),  # load 123 per mille
        GPU_FREQUENCY: 306.0,
        "system/temperature_cpu_celsius": 47.25, GPU_TEMPERATURE: 46.187,  # "GPU-therm" (JetPack 5 naming)
        "system/temperature_soc0_celsius": 45.5, "system/temperature_tj_celsius": 47.5,  # CV0 reads -256: offline
        EMC_FREQUENCY: 2133.0,  # and no utilisation: its unit is unverified
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
    assert jetson.jetson_clocks_state(XAVIER) == (
        "on", "CPU and GPU minimum clocks equal their maximum; EMC not checked (FileNotFoundError: [Errno 2] No such "
        f"file or directory: '{XAVIER}/sys/kernel/debug/bpmp/debug/clk/emc/rate'; debugfs is root only)")
    assert jetson.jetson_clocks_state(ORIN) == ("off", "cpu0 scales 729600..1984000 kHz")
    root = copy_of(ORIN, tmp_path)
    for c in (0, 1):  # CPUs locked, the GPU still scaling: not on
        (root / f"sys/devices/system/cpu/cpu{c}/cpufreq/scaling_min_freq").write_text("1984000\n")
    assert jetson.jetson_clocks_state(root) == ("off", "GPU ga10b scales 306..918 MHz")
    (root / "sys/class/devfreq/17000000.ga10b/min_freq").write_text("918000000\n")
    assert jetson.jetson_clocks_state(root) == ("off", "EMC at 2133 of 3199 MHz")  # jetson_clocks also maxes the EMC
    (root / "sys/kernel/nvpmodel_emc_cap").mkdir(parents=True)
    (root / "sys/kernel/nvpmodel_emc_cap/emc_iso_cap").write_text("2133000000\n")  # nvpmodel caps it: at its max
    assert jetson.jetson_clocks_state(root) == ("on", "CPU and GPU minimum clocks equal their maximum; EMC at 2133 of 2133 MHz")
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
    mode = jetson.power_mode(tmp_path)  # no MAXN at all: the highest power budget
    assert (mode.current_name, mode.max_name, mode.is_max) == ("7W", "15W", False)


def test_xavier_nx_has_no_maxn_its_fastest_is_20w_6core(tmp_path: Path) -> None:
    mode = jetson.power_mode(XAVIER_NX)  # before: id 0 (MODE_15W_2CORE) taken as the fastest
    assert (mode.current_id, mode.current_name, mode.max_id, mode.max_name, mode.is_max) == (8, "MODE_20W_6CORE", 8, "MODE_20W_6CORE", True)
    assert jetson.mode_rank("MODE_20W_4CORE", "") < jetson.mode_rank("MODE_20W_6CORE", "") < jetson.mode_rank("MAXN", "")
    root = copy_of(XAVIER_NX, tmp_path)
    (root / "var/lib/nvpmodel/status").write_text("pmode:0002 fmode:quiet\n")
    assert jetson.power_mode(root).is_max is False  # MODE_15W_6CORE: a real warning


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
    line = (FIXTURES / "tegrastats_xavier.txt").read_text().splitlines()[0]
    monkeypatch.setenv("PATH", f"{fake_tegrastats(tmp_path, line)}{os.pathsep}{os.environ['PATH']}")
    src = TegrastatsSource(interval_ms=50)
    src.open()
    try:
        assert src.read() == parse_tegrastats(line)
        proc = src.proc
    finally:
        src.close()
    assert proc is not None and proc.poll() is not None and src.proc is None  # the subprocess is gone


def test_dead_tegrastats_stops_reporting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    line = (FIXTURES / "tegrastats_xavier.txt").read_text().splitlines()[2]
    folder = tmp_path / "bin"
    folder.mkdir()
    exe = folder / "tegrastats"
    exe.write_text(f"#!/bin/sh\necho '{line}'\nsleep 0.3\nexit 3\n")  # one line, then it dies
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    src = TegrastatsSource(interval_ms=50)
    src.open()
    try:
        assert src.read()[GPU_UTIL] == 62.0
        assert src.proc is not None
        src.proc.wait(timeout=5)
        with pytest.raises(RuntimeError, match=r"tegrastats exited \(status 3\)"):
            src.read()  # before: its last line, forever
    finally:
        src.close()


def test_tegrastats_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="tegrastats not found"):
        TegrastatsSource().open()
