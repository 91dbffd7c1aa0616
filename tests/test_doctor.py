"""ptq doctor: what a device can measure, and the warnings a run should carry, on fixture Jetsons and on this machine."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Dict, Tuple

import pytest
from rich.console import Console

from ptq import doctor
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
        "thermal": (OK, "cpu, gpu, cv0, soc0, tj"),
        "EMC": (OK, "readable"),
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
    assert jetson["jetson_clocks"] == (OK, "on: CPU and GPU minimum clocks equal their maximum")
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
