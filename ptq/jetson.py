"""NVIDIA Jetson monitoring straight from the board's files, without jetson-stats' (jtop) service.

Reads what jetson-stats reads (https://github.com/rbonghi/jetson_stats, jtop/core/*.py): INA3221 power rails,
the integrated GPU's devfreq node and load, thermal zones, EMC activity, nvpmodel's mode and whether
jetson_clocks holds the clocks; or, where those are not readable, parses `tegrastats` lines. Series names are
those of ptq.monitor (the jtop mapping's), so a run measured either way logs the same metrics.

Every path is taken under `root` (default "/"), so tests point it at a copy of a board's file tree.

The board total (BOARD_POWER) never double counts: where the board has an input rail (VIN, POM_5V_IN or
VDD_IN, in jetson-stats' order of preference) that rail alone is the total and is not also logged as a rail;
where it has none (AGX Xavier, AGX Orin: every rail feeds one part of the module) the total is the sum of the
rails, as jetson-stats' "Power TOT" is. The Monitor takes BOARD_POWER as the energy total when present.
"""

from __future__ import annotations

import errno
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ptq.monitor import BOARD_POWER, GPU_FREQUENCY, GPU_UTIL, JETSON_CLOCKS, Source, jtop_metrics

EMC_UTIL = "system/jetson_emc_utilization_percentage"  # tegrastats' "EMC_FREQ x%" (NVIDIA's own figure)
EMC_FREQUENCY = "system/jetson_emc_frequency_megahertz"
INPUT_RAILS = ("VIN", "POM_5V_IN", "VDD_IN")  # a board's input rail, jetson-stats' order (jtop/core/power.py)
GPU_NAMES = ("gv11b", "gp10b", "ga10b", "gb10b", "gpu")  # devfreq of_node names of Jetson GPUs (jtop/core/gpu.py)
OFFLINE_CELSIUS = -256.0  # what a powered-down sensor reads (jtop/core/temperature.py)

INA3221_HWMON = "sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*"  # JetPack 5+ (kernel 5.10+): in<N>_label, mV, mA
INA3221_IIO = "sys/bus/i2c/drivers/ina3221x/*/iio:device*"  # JetPack 4: rail_name_<N>, in_power<N>_input mW
DEVFREQ = "sys/class/devfreq"
THERMAL = "sys/class/thermal"
CPUS = "sys/devices/system/cpu"
EMC_RATE = "sys/kernel/debug/bpmp/debug/clk/emc/rate"  # Hz; debugfs, root only
EMC_MAX_RATE = "sys/kernel/debug/bpmp/debug/clk/emc/max_rate"  # Hz; what jetson_clocks raises the rate to
EMC_CAP = "sys/kernel/nvpmodel_emc_cap/emc_iso_cap"  # Hz; nvpmodel's cap on max_rate, 0 = none (jtop/core/memory.py)
EMC_ACTIVITY = (  # jetson-stats' order (jtop/core/memory.py)
    "sys/kernel/debug/cactmon/mc_all",
    "sys/kernel/debug/bpmp/debug/actmon/mc_all_avg_activity",
    "sys/kernel/actmon_avg_activity/mc_all",
)
NVPMODEL_CONF = "etc/nvpmodel.conf"
NVPMODEL_STATUS = "var/lib/nvpmodel/status"  # "pmode:0002 fmode:quiet": what nvpmodel writes when setting a mode
MODEL = "proc/device-tree/model"
L4T_RELEASE = "etc/nv_tegra_release"


def read_text(path: Path) -> str:
    """A board file's whole text; every way a read can fail is an OSError, so one unreadable file is one reason,
    never a crash. A power-gated thermal zone fails its read with EAGAIN on JetPack 6 (kernel patch
    "thermal: tegra-bpmp: Handle offline zones"); CPython's FileIO then returns None and `read_text()` raises
    TypeError ("can't concat NoneType to bytes"), which this turns into OSError(EAGAIN). Undecodable bytes
    (ValueError) become an OSError too."""
    try:
        return path.read_text()
    except TypeError as exc:
        raise OSError(errno.EAGAIN, "read failed with EAGAIN (sensor powered off)", str(path)) from exc
    except ValueError as exc:
        raise OSError(errno.EIO, f"not text: {exc}", str(path)) from exc


def _text(path: Path) -> str:
    """A sysfs/procfs file's text without the trailing newline or device-tree NUL."""
    return read_text(path).strip().strip("\x00").strip()


def _why(exc: BaseException) -> str:
    """An exception as one short line for a report."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


@dataclass
class Rail:
    """One INA3221 channel: either a power file (mW) or a voltage (mV) and current (mA) pair."""

    name: str
    power: Optional[Path] = None
    volt: Optional[Path] = None
    curr: Optional[Path] = None

    def read_mw(self) -> float:
        """The rail's power now in mW; raises OSError/ValueError where a file cannot be read."""
        if self.power is not None:
            return float(_text(self.power))
        if self.volt is None or self.curr is None:
            raise FileNotFoundError(f"rail {self.name} has no power file and no voltage/current pair")
        return float(_text(self.volt)) * float(_text(self.curr)) / 1e3


def find_rails(root: Path = Path("/")) -> List[Rail]:
    """Every labelled INA3221 channel, in both kernel layouts; 'NC' (not connected) channels and the hwmon
    driver's "sum of shunt voltages" channel (in7) are left out as jetson-stats does."""
    rails: List[Rail] = []
    for folder in sorted(root.glob(INA3221_HWMON)):
        for label in sorted(folder.glob("in*_label")):
            match = re.fullmatch(r"in(\d+)_label", label.name)
            try:
                name = _text(label)
            except OSError:
                continue
            if match is None or re.search(r"\bNC\b", name) or match.group(1) == "7" or name.lower().startswith("sum"):
                continue
            n = match.group(1)
            rails.append(Rail(name, volt=folder / f"in{n}_input", curr=folder / f"curr{n}_input"))
    for folder in sorted(root.glob(INA3221_IIO)):
        for label in sorted(folder.glob("rail_name_*")):
            n = label.name[len("rail_name_"):]
            try:
                name = _text(label)
            except OSError:
                continue
            if re.search(r"\bNC\b", name):
                continue
            power = folder / f"in_power{n}_input"
            rails.append(Rail(name, power=power if power.exists() else None,
                              volt=folder / f"in_voltage{n}_input", curr=folder / f"in_current{n}_input"))
    return rails


def power_series(rails_mw: Dict[str, float]) -> Dict[str, float]:
    """Rail readings (name -> mW) as series in W: the input rail alone as BOARD_POWER where the board has one,
    else every rail plus their sum as BOARD_POWER (see the module's docstring)."""
    total_name = next((n for n in INPUT_RAILS if n in rails_mw), None)
    parts = {n: mw for n, mw in rails_mw.items() if n != total_name}
    out = jtop_metrics({f"Power {n}": mw for n, mw in parts.items()})
    total = rails_mw[total_name] if total_name is not None else sum(parts.values())
    if rails_mw:
        out[BOARD_POWER] = total / 1e3
    return out


def total_rail_description(names: List[str]) -> str:
    """How BOARD_POWER is obtained from these rails, for a run tag."""
    total_name = next((n for n in INPUT_RAILS if n in names), None)
    if total_name is not None:
        return f"{total_name} rail (board input)"
    return "sum of rails " + "+".join(names) + " (no board input rail)" if names else "none"


@dataclass
class Gpu:
    """The integrated GPU's devfreq node (frequencies in Hz) and its device folder (load in per-mille)."""

    name: str
    devfreq: Path

    @property
    def load(self) -> Path:
        """The load file: 0..1000 (jetson-stats divides by 10 for %)."""
        return self.devfreq / "device" / "load"


def find_gpu(root: Path = Path("/")) -> Optional[Gpu]:
    """The devfreq entry whose device-tree node is a Jetson GPU (gv11b on Xavier, ga10b on Orin), else None."""
    base = root / DEVFREQ
    if not base.is_dir():
        return None
    for entry in sorted(base.iterdir()):
        try:
            name = _text(entry / "device" / "of_node" / "name")
        except OSError:
            continue
        if name.lower() in GPU_NAMES or "gpu" in name.lower():
            return Gpu(name, entry)
    return None


def zone_name(zone_type: str) -> str:
    """A thermal zone's short name as jetson-stats and tegrastats print it: 'CPU-therm' -> 'CPU',
    'Tboard_tegra' -> 'Tboard', 'cpu-thermal' -> 'cpu'."""
    return zone_type.split("-")[0] if "-" in zone_type else zone_type.split("_")[0]


def find_thermal_zones(root: Path = Path("/")) -> Dict[str, Path]:
    """Short name -> zone folder for every zone with a type and a temperature; the PMIC's (a constant 100 °C on
    TX/Xavier boards) is left out as jetson-stats does; a repeated name gets the zone's number appended."""
    zones: Dict[str, Path] = {}
    for folder in sorted((root / THERMAL).glob("thermal_zone*"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0)):
        try:
            name = zone_name(_text(folder / "type"))
        except OSError:
            continue
        if "PMIC" in name or not (folder / "temp").exists():
            continue
        zones[name if name not in zones else f"{name}{folder.name[len('thermal_zone'):]}"] = folder
    return zones


def temperature_series(celsius: Dict[str, float]) -> Dict[str, float]:
    """Zone name -> °C as series, the GPU's under GPU_TEMPERATURE whatever its case ('GPU' on Xavier, 'gpu' on
    JetPack 6 Orin), the others as system/temperature_<name>_celsius, as the jtop mapping names them."""
    return jtop_metrics({f"Temp {'GPU' if n.lower() == 'gpu' else n}": v for n, v in celsius.items()})


def read_celsius(zone: Path) -> Optional[float]:
    """A zone's temperature in °C, None where the sensor is offline (-256 °C or below)."""
    value = float(_text(zone / "temp")) / 1e3
    return None if value <= OFFLINE_CELSIUS else value


def first_passive_trip(zone: Path) -> Optional[float]:
    """The lowest 'passive' trip point of a zone in °C (where the kernel starts throttling), None if it has none."""
    temps = []
    for kind in zone.glob("trip_point_*_type"):
        try:
            if _text(kind) == "passive":
                temps.append(float(_text(zone / kind.name.replace("_type", "_temp"))) / 1e3)
        except (OSError, ValueError):
            continue
    return min(temps) if temps else None


def read_emc(root: Path = Path("/")) -> Dict[str, float]:
    """EMC (memory controller) frequency in MHz where readable (debugfs is root only). No utilisation: the
    public formulas for actmon's mc_all disagree 100-fold (jetson-stats jtop/core/memory.py: mc_all // rate_kHz;
    MangoHud: mc_all / rate_MHz / 10) and no capture pairs mc_all with tegrastats' EMC_FREQ %, so its unit is
    unverified; `emc_raw` gives both numbers to the field check (`ptq doctor --check`), which sets them beside
    tegrastats' percentage."""
    try:
        return {EMC_FREQUENCY: float(_text(root / EMC_RATE)) / 1e6}
    except (OSError, ValueError):
        return {}


def emc_raw(root: Path = Path("/")) -> Dict[str, str]:
    """The EMC rate (Hz) and actmon's mc_all exactly as the files say, or why each cannot be read."""
    out = {}
    for key, rel in (("rate_hz", EMC_RATE), ("max_rate_hz", EMC_MAX_RATE)):
        try:
            out[key] = _text(root / rel)
        except OSError as exc:
            out[key] = f"unreadable: {_why(exc)}"
    for rel in EMC_ACTIVITY:
        try:
            out["mc_all"], out["mc_all_file"] = _text(root / rel), "/" + rel
            break
        except OSError:
            continue
    else:
        out["mc_all"] = "unreadable: none of " + ", ".join(EMC_ACTIVITY)
    return out


@dataclass
class PowerMode:
    """nvpmodel's current mode and the board's fastest one, from /etc/nvpmodel.conf and nvpmodel's status file."""

    current_id: Optional[int]
    current_name: str
    max_id: Optional[int]
    max_name: str
    why_unknown: str = ""

    @property
    def is_max(self) -> Optional[bool]:
        """Whether the board runs its fastest mode; None where either is unknown."""
        if self.current_id is None or self.max_id is None:
            return None
        return self.current_id == self.max_id


POWER_MODEL_RE = re.compile(r"<\s*POWER_MODEL\s+ID=(\d+)\s+NAME=(\S+)\s*>")


def mode_rank(name: str, body: str) -> Tuple[int, int, int, float]:
    """How fast a mode of nvpmodel.conf is, for `max()`: named MAXN* first; then the power budget its name
    states (MODE_20W_6CORE -> 20, 15W -> 15); then the CPU cores its block brings online ("CPU_ONLINE CORE_n 1",
    else the name's 6CORE); then its GPU MAX_FREQ (-1 = uncapped). jetson-stats (jtop/core/nvpmodel.py) only lists
    the modes and PM_CONFIG DEFAULT and never ranks them; the default is not the fastest (Orin NX: 15W)."""
    watts = re.search(r"(\d+)W(?=_|$)", name)
    cores = len(re.findall(r"^\s*CPU_ONLINE\s+CORE_\d+\s+1\s*$", body, re.M))
    named_cores = re.search(r"(\d+)CORE", name)
    gpu = re.search(r"^\s*GPU\s+MAX_FREQ\s+(-?\d+)", body, re.M)
    gpu_max = float("inf") if gpu is None or int(gpu.group(1)) < 0 else float(gpu.group(1))
    return (int(name.upper().startswith("MAXN")), int(watts.group(1)) if watts else 0,
            cores or (int(named_cores.group(1)) if named_cores else 0), gpu_max)


def power_mode(root: Path = Path("/")) -> PowerMode:
    """The current nvpmodel mode: the id in /var/lib/nvpmodel/status (written by `nvpmodel -m`), else the conf's
    PM_CONFIG DEFAULT (what nvpmodel applies at boot when there is no status), else `nvpmodel -q` on the real
    board. The fastest mode: the highest `mode_rank` in /etc/nvpmodel.conf (Xavier NX has no MAXN: MODE_20W_6CORE),
    the lowest id among equals."""
    ranks: Dict[int, Tuple[int, int, int, float]] = {}
    modes: Dict[int, str] = {}
    default: Optional[int] = None
    why = ""
    try:
        conf = read_text(root / NVPMODEL_CONF)
        heads = list(POWER_MODEL_RE.finditer(conf))
        for head, after in zip(heads, heads[1:] + [None]):
            body = conf[head.end():after.start() if after is not None else len(conf)].split("<", 1)[0]
            modes[int(head.group(1))] = head.group(2)
            ranks[int(head.group(1))] = mode_rank(head.group(2), body)
        found = re.search(r"<\s*PM_CONFIG\s+DEFAULT=(\d+)\s*>", conf)
        default = int(found.group(1)) if found else None
    except OSError as exc:
        why = _why(exc)
    current: Optional[int] = None
    try:
        found = re.search(r"pmode:(\d+)", read_text(root / NVPMODEL_STATUS))
        current = int(found.group(1)) if found else None
    except OSError:
        current = default
    name = modes.get(current, "") if current is not None else ""
    if current is None and root == Path("/") and shutil.which("nvpmodel"):
        current, name = _nvpmodel_query()
    max_id = max(ranks, key=lambda i: (ranks[i], -i)) if ranks else None
    if current is None and not why:
        why = f"no {NVPMODEL_STATUS}, no PM_CONFIG DEFAULT, no nvpmodel"
    return PowerMode(current, name, max_id, modes.get(max_id, "") if max_id is not None else "", why)


def _nvpmodel_query() -> Tuple[Optional[int], str]:
    """`nvpmodel -q` prints 'NV Power Mode: <name>' then the id on the next line (jtop/core/nvpmodel.py)."""
    try:
        lines = subprocess.run(["nvpmodel", "-q"], capture_output=True, text=True, timeout=4).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return None, ""
    for i, line in enumerate(lines):
        found = re.search(r"NV Power Mode:\s*(\S+)", line)
        if found and i + 1 < len(lines) and lines[i + 1].strip().isdigit():
            return int(lines[i + 1].strip()), found.group(1)
    return None, ""


def _emc_below_max(root: Path) -> Tuple[Optional[bool], str]:
    """(whether the EMC runs below its maximum, why); None where debugfs cannot be read (root only). The maximum is
    max_rate capped by nvpmodel's emc_iso_cap where that is set, as jetson-stats reads them (jtop/core/memory.py)."""
    try:
        rate, top = int(_text(root / EMC_RATE)), int(_text(root / EMC_MAX_RATE))
    except (OSError, ValueError) as exc:
        return None, f"EMC not checked ({_why(exc)}; debugfs is root only)"
    try:
        cap = int(_text(root / EMC_CAP))
    except (OSError, ValueError):
        cap = 0
    top = cap if 0 < cap < top else top
    return rate != top, f"EMC at {rate // 1000000} of {top // 1000000} MHz"


def jetson_clocks_state(root: Path = Path("/")) -> Tuple[str, str]:
    """("on" | "off" | "unknown", why), decided as jetson-stats does (jtop/core/jetson_clocks.py,
    jetson_clocks_alive): on when every online CPU's scaling_min_freq equals its scaling_max_freq, the GPU's devfreq
    min_freq equals max_freq and the EMC runs at its maximum rate, which is what jetson_clocks sets; off at the first
    clock that still scales. Where debugfs is unreadable the EMC is skipped, as jetson-stats skips it, and said so."""
    checked = 0
    for cpufreq in sorted((root / CPUS).glob("cpu[0-9]*/cpufreq")):
        online = cpufreq.parent / "online"
        try:
            if online.exists() and _text(online) != "1":
                continue
            low, high = _text(cpufreq / "scaling_min_freq"), _text(cpufreq / "scaling_max_freq")
        except OSError as exc:
            return "unknown", _why(exc)
        if low != high:
            return "off", f"{cpufreq.parent.name} scales {low}..{high} kHz"
        checked += 1
    gpu = find_gpu(root)
    if gpu is not None:
        try:
            low, high = _text(gpu.devfreq / "min_freq"), _text(gpu.devfreq / "max_freq")
        except OSError as exc:
            return "unknown", _why(exc)
        if low != high:
            return "off", f"GPU {gpu.name} scales {int(low) // 1000000}..{int(high) // 1000000} MHz"
        checked += 1
    if not checked:
        return "unknown", f"no cpufreq under {root / CPUS} and no Jetson GPU devfreq"
    below, emc = _emc_below_max(root)
    if below:
        return "off", emc
    return "on", "CPU and GPU minimum clocks equal their maximum; " + emc


def l4t_release(root: Path = Path("/")) -> str:
    """The L4T release from /etc/nv_tegra_release ('# R35 (release), REVISION: 4.1, ...' -> 'R35.4.1'), or ''."""
    try:
        found = re.search(r"#\s*(R\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", read_text(root / L4T_RELEASE))
    except OSError:
        return ""
    return f"{found.group(1)}.{found.group(2)}" if found else ""


def jetson_model(root: Path = Path("/")) -> str:
    """The board's name from the device tree, or ''."""
    try:
        return _text(root / MODEL)
    except OSError:
        return ""


@dataclass
class Readable:
    """Whether one source of figures can be read here, and why not."""

    source: str
    ok: bool
    detail: str


def _probe(source: str, path: Path) -> Readable:
    """Read one file once: ok with its content, or the reason it cannot be read."""
    try:
        return Readable(source, True, f"{path}: {_text(path)}")
    except OSError as exc:
        return Readable(source, False, _why(exc))


def readable_sources(root: Path = Path("/")) -> List[Readable]:
    """Per source (each rail, GPU load, GPU frequency, thermal, EMC, nvpmodel, jetson_clocks): readable or why not.
    A rail that cannot be read is reported with its reason, never as a zero."""
    out: List[Readable] = []
    rails = find_rails(root)
    for rail in rails:
        try:
            out.append(Readable(f"rail {rail.name}", True, f"{rail.read_mw() / 1e3:.3f} W"))
        except (OSError, ValueError) as exc:
            out.append(Readable(f"rail {rail.name}", False, _why(exc)))
    if not rails:
        out.append(Readable("rails", False, f"no INA3221 rails under {root / INA3221_HWMON} or {root / INA3221_IIO}"))
    gpu = find_gpu(root)
    if gpu is None:
        out += [Readable(s, False, f"no Jetson GPU under {root / DEVFREQ}") for s in ("GPU load", "GPU frequency")]
    else:
        out += [_probe("GPU load", gpu.load), _probe("GPU frequency", gpu.devfreq / "cur_freq")]
    zones = find_thermal_zones(root)
    offline = {}
    for name, zone in zones.items():
        try:
            if read_celsius(zone) is None:
                offline[name] = "reads -256 °C"
        except (OSError, ValueError) as exc:
            offline[name] = _why(exc)
    detail = ", ".join(n for n in zones if n not in offline) or f"no thermal zones under {root / THERMAL}"
    detail += "".join(f"; {n} offline ({why}), left out" for n, why in offline.items())
    out.append(Readable("thermal", len(zones) > len(offline), detail))
    emc = read_emc(root)
    out.append(Readable("EMC", bool(emc), f"{emc[EMC_FREQUENCY]:.0f} MHz (utilisation not read: unit unverified)"
                        if emc else f"needs {root / EMC_RATE} (debugfs, root only)"))
    mode = power_mode(root)
    out.append(Readable("nvpmodel", mode.current_id is not None,
                        f"{mode.current_name} (id {mode.current_id})" if mode.current_id is not None else mode.why_unknown))
    state, why = jetson_clocks_state(root)
    out.append(Readable("jetson_clocks", state != "unknown", f"{state}: {why}"))
    return out


class JetsonSysfsSource(Source):
    """Jetson power rails, GPU load and clock, temperatures and EMC read from sysfs: no jtop service needed."""

    name = "jetson-sysfs"

    def __init__(self, root: Path = Path("/")) -> None:
        self.root = root
        self.rails: List[Rail] = []
        self.unreadable: Dict[str, str] = {}
        self.gpu: Optional[Gpu] = None
        self.zones: Dict[str, Path] = {}

    def open(self) -> None:
        self.gpu, self.zones = find_gpu(self.root), find_thermal_zones(self.root)
        for rail in find_rails(self.root):
            try:
                rail.read_mw()
                self.rails.append(rail)
            except (OSError, ValueError) as exc:  # reported in the tags, never logged as zero
                self.unreadable[rail.name] = _why(exc)
        if not (self.rails or self.gpu):  # thermal zones alone: any Linux machine has them, not a Jetson
            if self.unreadable:
                raise PermissionError(f"Jetson power rails found under {self.root} but none readable: {self.unreadable}")
            raise FileNotFoundError(f"not a Jetson: no INA3221 rails or Jetson GPU devfreq under {self.root}")

    def read(self) -> Dict[str, float]:
        rails_mw: Dict[str, float] = {}
        complete = not self.unreadable  # a sum without a rail would understate the total
        for rail in self.rails:
            try:
                rails_mw[rail.name] = rail.read_mw()
            except (OSError, ValueError):
                complete = False  # this sample lacks the rail
        out = power_series(rails_mw)
        if not complete and not any(n in rails_mw for n in INPUT_RAILS):
            out.pop(BOARD_POWER, None)
        if self.gpu is not None:
            try:
                out[GPU_UTIL] = float(_text(self.gpu.load)) / 10.0
            except (OSError, ValueError):
                pass
            try:
                out[GPU_FREQUENCY] = float(_text(self.gpu.devfreq / "cur_freq")) / 1e6
            except (OSError, ValueError):
                pass
        temps: Dict[str, float] = {}
        for name, zone in self.zones.items():
            try:
                value = read_celsius(zone)
            except (OSError, ValueError):
                continue
            if value is not None:
                temps[name] = value
        out.update(temperature_series(temps))
        out.update(read_emc(self.root))
        state, _ = jetson_clocks_state(self.root)
        if state != "unknown":
            out[JETSON_CLOCKS] = 1.0 if state == "on" else 0.0
        return out

    def tags(self) -> Dict[str, str]:
        mode = power_mode(self.root)
        state, why = jetson_clocks_state(self.root)
        tags = {
            "device.nvpmodel": mode.current_name or (f"id {mode.current_id}" if mode.current_id is not None
                                                     else f"unknown ({mode.why_unknown})"),
            "device.jetson_clocks": state if state != "unknown" else f"unknown ({why})",
            "device.jetson_model": jetson_model(self.root) or "unknown",
            "device.l4t": l4t_release(self.root) or "unknown",
            "device.power_total": total_rail_description([r.name for r in self.rails]),
        }
        if self.unreadable:
            tags["device.power_rails_unreadable"] = "; ".join(f"{n}: {why}" for n, why in self.unreadable.items())
        return tags


# One tegrastats line's fields. Rails: "VDD_IN 4500mW/4500mW" (JetPack 5+, and "cur/avg/max" on JetPack 7) or
# "GPU 1155/1155" (JetPack 4); the lookahead keeps "RAM 2448/31919MB" out. Temperatures: "GPU@38.5C",
# "cpu@52.968C/52.968C". GR3D_FREQ: "0%", "0%@1377", "12%@[1300,1300]" or, on Thor, "@[1000,1000]".
RAIL_RE = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?:/\d+(?:mW)?)?(?=\s|$)")
TEMP_RE = re.compile(r"\b([A-Za-z][A-Za-z0-9_]*)@(-?[\d.]+)C\b")
GR3D_RE = re.compile(r"\bGR3D_FREQ (?:(\d+)%)?(?:@\[?([\d,]+))?")
EMC_RE = re.compile(r"\bEMC_FREQ (\d+)%(?:@(\d+))?")


def parse_tegrastats(line: str) -> Dict[str, float]:
    """One `tegrastats` line as series: GPU load and clock (the highest GPC clock where it lists several; a gated
    GPC reads 0 where devfreq keeps its target), EMC load and clock, temperatures (offline -256 °C sensors and the
    PMIC's constant dropped), and power rails with the board total as in `power_series`."""
    out: Dict[str, float] = {}
    gr3d = GR3D_RE.search(line)
    if gr3d and gr3d.group(1) is not None:
        out[GPU_UTIL] = float(gr3d.group(1))
    if gr3d and gr3d.group(2) is not None:  # per-GPC clocks: the fastest, as jetson-stats (jtop/core/tegra_parse.py)
        out[GPU_FREQUENCY] = max(float(f) for f in gr3d.group(2).split(",") if f)
    emc = EMC_RE.search(line)
    if emc:
        out[EMC_UTIL] = float(emc.group(1))
        if emc.group(2) is not None:
            out[EMC_FREQUENCY] = float(emc.group(2))
    out.update(temperature_series({name: float(v) for name, v in TEMP_RE.findall(line)
                                   if "PMIC" not in name.upper() and float(v) > OFFLINE_CELSIUS}))
    rails = {name: float(cur) for name, cur, _ in RAIL_RE.findall(line) if name != "NC"}
    out.update(power_series(rails))
    return out


class TegrastatsSource(Source):
    """NVIDIA's `tegrastats` run as a subprocess: a reader thread keeps its latest line, `read` parses it.
    The fallback where sysfs is not readable (tegrastats reads the rails through its own setuid helpers)."""

    name = "tegrastats"

    def __init__(self, interval_ms: int = 500, command: str = "tegrastats", first_line_timeout_s: float = 5.0) -> None:
        self.interval_ms = interval_ms
        self.command = command
        self.first_line_timeout_s = first_line_timeout_s
        self.latest = ""
        self.latest_at = 0.0  # time.monotonic() of the latest line
        self._got_line = threading.Event()
        self.proc: Optional[subprocess.Popen] = None

    def open(self) -> None:
        exe = shutil.which(self.command)
        if exe is None:
            raise FileNotFoundError(f"{self.command} not found on PATH (it ships with L4T as /usr/bin/tegrastats)")
        self.proc = subprocess.Popen([exe, "--interval", str(self.interval_ms)], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, bufsize=1)
        threading.Thread(target=self._follow, name="ptq-tegrastats", daemon=True).start()
        if not self._got_line.wait(self.first_line_timeout_s):
            self.close()
            raise RuntimeError(f"{exe} printed nothing in {self.first_line_timeout_s:.0f} s")

    def _follow(self) -> None:
        """Keep the newest line until the process ends."""
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip():
                self.latest, self.latest_at = line.strip(), time.monotonic()
                self._got_line.set()

    def read(self) -> Dict[str, float]:
        """The latest line's figures; raises once tegrastats has exited or fallen silent (no line for 4 intervals,
        at least 2 s), so a dead tegrastats is never reported as its last line (the Monitor drops a failing source)."""
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"tegrastats exited (status {self.proc.returncode})")
        silent = time.monotonic() - self.latest_at
        if silent > max(4 * self.interval_ms / 1e3, 2.0):
            raise RuntimeError(f"tegrastats printed nothing for {silent:.1f} s")
        return parse_tegrastats(self.latest)

    def close(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None

