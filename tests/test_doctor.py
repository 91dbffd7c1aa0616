"""ptq doctor: what a device can measure, and the warnings a run should carry, on fixture Jetsons and on this machine."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import pytest
from rich.console import Console
from test_jetson import ORIN_JP6, XAVIER_NX, eagain  # noqa: F401  (eagain: the gated-zone fixture)

from ptq import doctor, field_check
from ptq.doctor import ABSENT, OK, WARN, Check, diagnose, render, warnings_for_run

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "jetson"
ORIN, XAVIER = FIXTURES / "orin", FIXTURES / "xavier"

pytestmark = pytest.mark.device


def by_name(checks: list, *areas: str) -> Dict[str, Tuple[str, str]]:
    """name -> (status, detail) for the checks of these areas."""
    return {c.name: (c.status, c.detail) for c in checks if c.area in areas}


def test_orin_fixture() -> None:
    checks = diagnose(ORIN)
    assert by_name(checks, "jetson", "power") == {
        "rail VDD_IN": (OK, "4.435 W"),
        "rail VDD_CPU_GPU_CV": (OK, "0.483 W"),
        "rail VDD_SOC": (OK, "1.404 W"),
        "GPU load": (OK, f"{ORIN}/sys/class/devfreq/17000000.ga10b/device/load: 123"),
        "GPU frequency": (OK, f"{ORIN}/sys/class/devfreq/17000000.ga10b/cur_freq: 306000000"),
        "thermal": (OK, "CPU, GPU, SOC0, tj; CV0 offline (reads -256 °C), left out"),
        "EMC": (OK, "2133 MHz (utilisation not read: unit unverified)"),
        "nvpmodel": (WARN, "15W (id 2), not the fastest mode MAXN (id 0)"),
        "jetson_clocks": (WARN, "off: cpu0 scales 729600..1984000 kHz"),
        "thermal throttling": (OK, "no thermal zone at or above its first passive trip point"),
    }
    assert by_name(checks, "resources")["swap"] == (WARN, "537 MB in use")  # 524288 kB of swap used
    assert warnings_for_run(checks) == {
        "doctor.power_mode": "15W (id 2), not the fastest mode MAXN (id 0)",
        "doctor.clocks": "off: cpu0 scales 729600..1984000 kHz",
        "doctor.swap": "537 MB in use",
    }


def test_xavier_fixture() -> None:
    checks = diagnose(XAVIER)
    jetson = by_name(checks, "jetson", "power")
    assert {n: s for n, (s, _) in jetson.items()} == {
        "rail GPU": OK, "rail CPU": OK, "rail SOC": OK, "rail CV": OK, "rail VDDRQ": OK, "rail SYS5V": OK,
        "GPU load": OK, "GPU frequency": OK, "thermal": OK,
        "EMC": ABSENT,  # no debugfs: a reason, not a failure
        "nvpmodel": OK, "jetson_clocks": OK, "thermal throttling": OK,
    }
    assert jetson["nvpmodel"] == (OK, "MAXN (id 0), the fastest mode")
    assert jetson["jetson_clocks"][1].startswith("on: CPU and GPU minimum clocks equal their maximum; EMC not checked")
    assert "debugfs" in jetson["EMC"][1]
    assert warnings_for_run(checks) == {}  # locked clocks, MAXN, cool, no swap: nothing to warn about


def test_throttling_and_unreadable_rail(tmp_path: Path) -> None:
    root = Path(shutil.copytree(XAVIER, tmp_path / "xavier"))
    (root / "sys/class/thermal/thermal_zone1/temp").write_text("97500\n")  # CPU-therm above its 96 °C passive trip
    rail = root / "sys/bus/i2c/drivers/ina3221x/1-0041/iio:device1/in_power2_input"
    rail.unlink()
    rail.mkdir()
    tags = warnings_for_run(diagnose(root))
    assert tags["doctor.thermal"] == "throttling: CPU 97.5 °C >= passive trip 96.0 °C"
    assert tags["doctor.power"].startswith("unreadable: IsADirectoryError")  # rail SYS5V: one line, no crash


def test_jetpack6_gated_zone_neither_aborts_a_run_nor_doctor(eagain: Callable[[Path], List[Path]]) -> None:
    eagain(ORIN_JP6)
    assert doctor.run_warnings(ORIN_JP6)["doctor.power_mode"] == "15W (id 2), not the fastest mode MAXN (id 0)"  # before: TypeError
    checks = by_name(diagnose(ORIN_JP6), "jetson", "power")
    assert checks["thermal"][1].startswith("cpu, gpu, soc0, tj; cv0 offline (BlockingIOError: [Errno 11]")
    assert checks["thermal throttling"] == (OK, "no thermal zone at or above its first passive trip point")


def test_xavier_nx_in_20w_6core_is_not_warned_about_power_mode() -> None:
    checks = diagnose(XAVIER_NX)
    assert by_name(checks, "power")["nvpmodel"] == (OK, "MODE_20W_6CORE (id 8), the fastest mode")
    assert "doctor.power_mode" not in warnings_for_run(checks)  # before: "not the fastest mode MODE_15W_2CORE (id 0)"


def test_field_check_here_says_what_it_cannot_check(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    report = field_check.run_check(Path("/"), None, out, seconds=0.5)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report, default=str))
    assert report["sources"]["skipped"].startswith("not a Jetson")  # this x86 machine
    assert set(report["build"]) == {"fp32", "fp16", "int8", "fp16 dla_core=0"} or "skipped" in report["build"]
    assert all("refused" in v or "skipped" in v for v in report["build"].values())  # no TensorRT here, and why
    assert any(c["name"] == "tensorrt" for c in report["doctor"])
    lines = field_check.summary_lines(report)
    assert lines[1].startswith("sources: not checked (not a Jetson") and any(line.startswith("tensorrt fp32: ") for line in lines)


def test_field_check_on_the_jetpack6_fixture(eagain: Callable[[Path], List[Path]], tmp_path: Path) -> None:
    eagain(ORIN_JP6)
    report = field_check.run_check(ORIN_JP6, None, tmp_path / "check.json", seconds=0.2)
    sysfs = report["sources"]["jetson-sysfs"]
    assert sysfs["values"]["system/temperature_tj_celsius"] == 47.5 and sysfs["tags"]["device.l4t"] == "R36.3.0"
    assert "tegrastats" in report["sources"]["comparison"]["skipped"]  # no tegrastats on this machine: said, not compared
    assert report["power_mode"]["max_name"] == "MAXN"


def test_this_machine() -> None:
    start = time.monotonic()
    checks = diagnose()
    assert time.monotonic() - start < 10
    names = {(c.area, c.name): c for c in checks}
    trt = names[("backends", "tensorrt")]
    assert trt.status == ABSENT and "not installed" in trt.detail  # x86 without TensorRT: said so, with a reason
    assert names[("backends", "ort")].status == OK and "CPUExecutionProvider" in names[("backends", "ort")].detail
    assert names[("python", "python")].status == OK
    assert all(c.status in (OK, WARN, ABSENT) and c.detail for c in checks)
    assert set(warnings_for_run(checks)) <= {"doctor.clocks", "doctor.swap", "doctor.thermal", "doctor.torch"}


def test_torch_prerelease_warns(monkeypatch) -> None:
    monkeypatch.setattr(doctor, "_version", lambda *dists: ("torch", "2.4.0a0+3bcc3cddb5.nv24.07"))
    [check] = doctor.torch_check()
    assert check.status == WARN and check.tag == "doctor.torch" and "NVIDIA build" in check.detail


def test_render() -> None:
    checks = [Check("power", "jetson_clocks", WARN, "off: cpu0 scales", "doctor.clocks"), Check("python", "python", OK, "3.11")]
    console = Console(width=120, record=True)
    console.print(render(checks))
    text = console.export_text()
    assert "jetson_clocks" in text and "warn" in text and "off: cpu0 scales" in text
