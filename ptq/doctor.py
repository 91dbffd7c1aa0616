"""What this device can measure, and what would make its numbers unreliable, before a study runs.

`diagnose` never imports torch (2-10 s, more on a Jetson, and it may pull CUDA in): torch is reported from its
package metadata, its build read from the version's local tag (+cu121, +cpu, +nv...); ptq's torch backend finds
out at run time whether CUDA works. TensorRT and jtop are tried in a subprocess with a timeout, so a broken
install cannot hang or crash the caller; onnxruntime is imported in-process, only inside its own check. Every
problem is one `Check` line, never an exception.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import psutil
from rich.table import Table

from ptq import jetson

OK, WARN, ABSENT = "ok", "warn", "absent"
MB = 1e6
LOW_MEMORY_MB = 1000.0  # less available memory than this: a study's models and tensors may not fit
LOW_DISK_MB = 2000.0  # less free disk than this in the temp dir or the cwd: engines and artifacts may not fit
PACKAGES = {  # check name -> distribution names as importlib.metadata knows them, the first installed reported
    "numpy": ("numpy",), "onnx": ("onnx",), "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "mlflow": ("mlflow", "mlflow-skinny"), "torch": ("torch",), "torchvision": ("torchvision",),
    "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu11"), "cuda bindings": ("pycuda", "cuda-python", "cuda-bindings"),
    "jetson-stats": ("jetson-stats",),
}


@dataclass
class Check:
    """One finding: `status` is ok, warn (works, but numbers may mislead) or absent; `tag` names the run tag
    a warning becomes (see `warnings_for_run`)."""

    area: str
    name: str
    status: str
    detail: str
    tag: str = ""


def installed(module: str) -> bool:
    """Whether `module` can be found, without importing it; a finder that fails counts as not installed."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _version(*dists: str) -> Tuple[str, str]:
    """(distribution, version) of the first of these installed, or ('', '')."""
    from importlib import metadata

    for dist in dists:
        try:
            return dist, metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "", ""


def _subprocess_json(code: str, timeout_s: float) -> Tuple[Optional[dict], str]:
    """Run Python `code` (which prints one JSON object) in a fresh interpreter: (its object, '') or (None, why)."""
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None, f"no answer in {timeout_s:.0f} s"
    except OSError as exc:
        return None, f"{type(exc).__name__}: {exc}"
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        err = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        return None, err[:200]
    try:
        return json.loads(lines[-1]), ""
    except ValueError:
        return None, lines[-1][:200]


def package_checks() -> List[Check]:
    """Python's version and the versions of the packages a study may use, from metadata (nothing imported)."""
    out = [Check("python", "python", OK, f"{platform.python_version()} ({sys.executable})")]
    for name, dists in PACKAGES.items():
        dist, version = _version(*dists)
        out.append(Check("packages", name, OK if dist else ABSENT,
                         f"{dist} {version}" if dist else "not installed (" + " / ".join(dists) + ")"))
    return out


TENSORRT_PROBE = """
import json, tensorrt as trt
out = {"version": trt.__version__, "reached": []}
try:
    from ptq.backends.tensorrt import check_version
    check_version(trt.__version__)
except Exception as exc:
    out["refused"] = str(exc)[:300]
try:
    out["dla_cores"] = trt.Builder(trt.Logger(trt.Logger.ERROR)).num_DLA_cores
except Exception as exc:
    out["dla_error"] = str(exc)[:200]
errors = {}
try:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0:
        raise RuntimeError(f"cudaGetDeviceCount: {err}")
    if count < 1:
        raise RuntimeError("cudaGetDeviceCount: no CUDA device")
    err, props = cudart.cudaGetDeviceProperties(0)
    if int(err) != 0:
        raise RuntimeError(f"cudaGetDeviceProperties: {err}")
    out["gpu"] = props.name.decode(errors="replace").rstrip("\\x00") if isinstance(props.name, bytes) else str(props.name)
    err, driver = cudart.cudaDriverGetVersion()
    if int(err) == 0:
        out["driver_cuda"] = f"{driver // 1000}.{driver % 1000 // 10}"
    out["reached"].append("cuda-python")
except ImportError:
    pass
except Exception as exc:
    errors["cuda-python"] = str(exc)[:200]
try:
    import pycuda.driver as drv
    drv.init()
    if drv.Device.count() < 1:
        raise RuntimeError("no CUDA device")
    out.setdefault("gpu", drv.Device(0).name())
    out["reached"].append("pycuda")
except ImportError:
    pass
except Exception as exc:
    errors["pycuda"] = f"{type(exc).__name__}: {exc}"[:200]
out["errors"] = errors
print(json.dumps(out))
"""


def tensorrt_check() -> List[Check]:
    """Can the tensorrt backend run: TensorRT imports and its version is one `ptq run` accepts (the backend's own
    check_version), and pycuda or cuda-python really reaches the driver (every call's error code checked), all
    tried in a subprocess; the GPU's name, the driver's CUDA version and the DLA cores."""
    if not installed("tensorrt"):
        return [Check("backends", "tensorrt", ABSENT, "tensorrt is not installed (on a Jetson it comes with JetPack: "
                                                      "apt install python3-libnvinfer)")]
    found, why = _subprocess_json(TENSORRT_PROBE, 60.0)
    if found is None and not _version(*PACKAGES["tensorrt"])[0] and _version("tensorrt-stubs")[0]:
        return [Check("backends", "tensorrt", ABSENT, "tensorrt is not installed (only its type stubs, tensorrt-stubs)")]
    if found is None:
        return [Check("backends", "tensorrt", ABSENT, f"tensorrt is installed but does not import: {why}")]
    if "refused" in found:
        return [Check("backends", "tensorrt", WARN, found["refused"], "doctor.tensorrt")]
    detail = f"TensorRT {found['version']}, GPU {found.get('gpu', 'unknown')}"
    detail += f" (driver CUDA {found['driver_cuda']})" if "driver_cuda" in found else ""
    detail += f", {found['dla_cores']} DLA cores" if "dla_cores" in found else f", DLA unknown ({found.get('dla_error')})"
    failed = "; ".join(f"{name}: {err}" for name, err in found.get("errors", {}).items())
    if not found.get("reached"):
        hint = ("; CUDA bindings cannot reach the driver: " + failed) if failed else "; no CUDA bindings (pip install cuda-python, or pycuda)"
        return [Check("backends", "tensorrt", WARN, detail + hint + ": the tensorrt backend cannot run (cuda-python's major.minor "
                                                                    "must not exceed the driver's CUDA: 11.4 on JetPack 5)", "doctor.tensorrt")]
    return [Check("backends", "tensorrt", OK, detail + f"; CUDA reached through {', '.join(found['reached'])}" + (f" ({failed})" if failed else ""))]


def ort_check() -> List[Check]:
    """Can the ort backend run: onnxruntime's version and execution providers (imported only here)."""
    if not installed("onnxruntime"):
        return [Check("backends", "ort", ABSENT, "onnxruntime is not installed")]
    try:
        import onnxruntime as ort

        return [Check("backends", "ort", OK, f"onnxruntime {ort.__version__}, providers "
                                              + ", ".join(ort.get_available_providers()))]
    except Exception as exc:  # a broken wheel (wrong CUDA, missing libs) is reported, not raised
        return [Check("backends", "ort", ABSENT, f"onnxruntime does not import: {type(exc).__name__}: {exc}"[:240])]


def torch_check() -> List[Check]:
    """The torch backend from metadata alone (see the module's docstring): version, and a warning for a
    pre-release or NVIDIA Jetson build (version with a0/b1/rc/dev or +nv), whose kernels and timings may differ."""
    dist, version = _version("torch")
    if not dist:
        return [Check("backends", "torch", ABSENT, "torch is not installed")]
    local = version.split("+", 1)[1] if "+" in version else ""
    build = ("CUDA " + local[2:] if local.startswith("cu") else "CPU only" if local == "cpu"
             else "NVIDIA build" if local.startswith("nv") else f"build '{local}'" if local else "build unknown")
    detail = f"torch {version} ({build}; CUDA availability not probed: importing torch takes seconds)"
    if re.search(r"(a|b|rc)\d|dev", version.split("+")[0]) or local.startswith("nv"):
        return [Check("backends", "torch", WARN, detail + "; a pre-release or NVIDIA build: note it beside its numbers",
                      "doctor.torch")]
    return [Check("backends", "torch", OK, detail)]


def _nvml_check() -> Check:
    """NVML (discrete NVIDIA GPUs; Jetsons have no NVML before JetPack 7): the GPU's name, or why not."""
    if not installed("pynvml"):
        return Check("sources", "nvml", ABSENT, "pynvml not installed (pip install nvidia-ml-py)")
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return Check("sources", "nvml", OK, str(pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))))
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:
        return Check("sources", "nvml", ABSENT, f"{type(exc).__name__}: {exc}"[:200])


def _rapl_check(root: Path) -> Check:
    """x86 package energy (RAPL): readable or why not (root only on most distributions)."""
    zones = sorted((root / "sys/class/powercap").glob("intel-rapl:[0-9]"))
    if not zones:
        return Check("sources", "rapl", ABSENT, f"no RAPL zones under {root / 'sys/class/powercap'}")
    try:
        (zones[0] / "energy_uj").read_text()
        return Check("sources", "rapl", OK, f"{len(zones)} package(s)")
    except OSError as exc:
        return Check("sources", "rapl", ABSENT, f"{type(exc).__name__}: {exc}"[:200])


JTOP_PROBE = """
import json
from jtop import jtop
j = jtop()
try:
    j.start()
    print(json.dumps({"ok": True}))
except Exception as exc:
    print(json.dumps({"ok": False, "why": " ".join(str(exc).split())}))
finally:
    try:
        j.close()
    except Exception:
        pass
"""


def _jtop_check(root: Path) -> Check:
    """jetson-stats: installed, its service running (/run/jtop.sock), and accepting this client: the client
    refuses a service of another version, which says so in one line."""
    version = _version("jetson-stats")[1]
    if not installed("jtop"):
        return Check("sources", "jtop", ABSENT, "jetson-stats not installed (not needed: ptq reads sysfs itself)")
    if not (root / "run/jtop.sock").exists():
        return Check("sources", "jtop", ABSENT, f"jetson-stats {version} installed, its service is not running "
                                                  "(no /run/jtop.sock); ptq reads sysfs instead")
    if root != Path("/"):
        return Check("sources", "jtop", OK, f"jetson-stats {version}, service socket present (not contacted)")
    found, why = _subprocess_json(JTOP_PROBE, 15.0)
    if found is None or not found.get("ok"):
        why = why if found is None else found.get("why", "")
        if "Mismatch version" in why:
            why = why.split(". Please")[0] + ": restart the service after upgrading (sudo systemctl restart jtop)"
        return Check("sources", "jtop", WARN, f"jetson-stats {version} client refused by its service: {why}"[:300])
    return Check("sources", "jtop", OK, f"jetson-stats {version}, service reachable")


def source_checks(root: Path) -> List[Check]:
    """Which power, GPU and thermal sources are readable here: the Jetson's own files (each rail, GPU, thermal,
    EMC), tegrastats, NVML, RAPL and jtop."""
    out = []
    for item in jetson.readable_sources(root):
        if item.source in ("nvpmodel", "jetson_clocks"):
            continue  # reported under `power` with their warnings
        status = OK if item.ok else ABSENT
        tag = "doctor.power" if item.source.startswith("rail ") and not item.ok else ""
        out.append(Check("jetson", item.source, WARN if tag else status,
                         item.detail if item.ok else f"unreadable: {item.detail}" if tag else item.detail, tag))
    exe = shutil.which("tegrastats") or (str(root / "usr/bin/tegrastats") if (root / "usr/bin/tegrastats").exists() else "")
    out.append(Check("sources", "tegrastats", OK if exe else ABSENT, exe or "tegrastats not found (it ships with L4T)"))
    return out + [_nvml_check(), _rapl_check(root), _jtop_check(root)]


def _is_jetson(root: Path) -> bool:
    """A Jetson has an L4T release file or a Jetson GPU devfreq node."""
    return bool(jetson.l4t_release(root)) or jetson.find_gpu(root) is not None


def power_checks(root: Path) -> List[Check]:
    """Power mode, clock locking and thermal throttling: the settings that change a device's numbers."""
    out: List[Check] = []
    if _is_jetson(root):
        mode = jetson.power_mode(root)
        if mode.current_id is None:
            out.append(Check("power", "nvpmodel", ABSENT, f"unknown ({mode.why_unknown})"))
        elif mode.is_max is False:
            out.append(Check("power", "nvpmodel", WARN, f"{mode.current_name} (id {mode.current_id}), not the fastest "
                             f"mode {mode.max_name} (id {mode.max_id})", "doctor.power_mode"))
        else:
            out.append(Check("power", "nvpmodel", OK, f"{mode.current_name} (id {mode.current_id})"
                             + (", the fastest mode" if mode.is_max else ", fastest mode unknown")))
        state, why = jetson.jetson_clocks_state(root)
        out.append(Check("power", "jetson_clocks", {"on": OK, "off": WARN}.get(state, ABSENT), f"{state}: {why}",
                         "doctor.clocks" if state == "off" else ""))
    else:
        governor = root / "sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"
        try:
            name = governor.read_text().strip()
            out.append(Check("power", "cpu governor", OK if name == "performance" else WARN, name if name == "performance"
                             else f"{name}, not performance: clocks not locked", "" if name == "performance" else "doctor.clocks"))
        except OSError:
            out.append(Check("power", "cpu governor", ABSENT, f"no {governor} (no cpufreq here)"))
    hot = []
    for name, zone in jetson.find_thermal_zones(root).items():
        try:
            temp, trip = jetson.read_celsius(zone), jetson.first_passive_trip(zone)
        except (OSError, ValueError):
            continue
        if temp is not None and trip is not None and temp >= trip:
            hot.append(f"{name} {temp:.1f} °C >= passive trip {trip:.1f} °C")
    out.append(Check("power", "thermal throttling", WARN if hot else OK,
                     "throttling: " + "; ".join(hot) if hot else "no thermal zone at or above its first passive trip point",
                     "doctor.thermal" if hot else ""))
    return out


def _swap_used_mb(root: Path) -> float:
    """Swap in use in MB from <root>/proc/meminfo (SwapTotal - SwapFree, as psutil counts it), else psutil."""
    try:
        fields = dict(re.findall(r"^(\w+):\s+(\d+) kB", (root / "proc/meminfo").read_text(), re.M))
        return (int(fields["SwapTotal"]) - int(fields["SwapFree"])) * 1024 / MB
    except (OSError, KeyError):
        return psutil.swap_memory().used / MB


def resource_checks(root: Path) -> List[Check]:
    """Available memory, free disk in the temp dir and the cwd, and swap in use (swapping skews timings)."""
    available = psutil.virtual_memory().available / MB
    out = [Check("resources", "memory", OK if available >= LOW_MEMORY_MB else WARN, f"{available:.0f} MB available")]
    for label, folder in (("disk (temp)", tempfile.gettempdir()), ("disk (cwd)", os.getcwd())):
        free = shutil.disk_usage(folder).free / MB
        out.append(Check("resources", label, OK if free >= LOW_DISK_MB else WARN, f"{free:.0f} MB free in {folder}"))
    swap = _swap_used_mb(root)
    out.append(Check("resources", "swap", WARN if swap > 0 else OK, f"{swap:.0f} MB in use" if swap > 0 else "none in use",
                     "doctor.swap" if swap > 0 else ""))
    return out


def diagnose(root: Path = Path("/")) -> List[Check]:
    """Everything above, in report order: what is installed, which backends and sources work, and the warnings
    that make numbers unreliable."""
    return (package_checks() + tensorrt_check() + ort_check() + torch_check() + source_checks(root)
            + power_checks(root) + resource_checks(root))


def warnings_for_run(checks: List[Check]) -> Dict[str, str]:
    """The tags a run should carry for what doctor warns about (e.g. doctor.clocks, doctor.swap); nothing for ok."""
    return {c.tag: c.detail for c in checks if c.status == WARN and c.tag}


def run_warnings(root: Path = Path("/")) -> Dict[str, str]:
    """What doctor would warn about that changes a run's numbers (clocks, power mode, heat, swap, memory, disk), as
    the run's tags; only the cheap checks, no subprocess."""
    return warnings_for_run(power_checks(root) + resource_checks(root))


def render(checks: List[Check]) -> Table:
    """The checks as a rich table for the CLI, status coloured."""
    table = Table(title="ptq doctor")
    for column in ("area", "check", "status", "detail"):
        table.add_column(column, overflow="fold")
    colour = {OK: "green", WARN: "yellow", ABSENT: "dim"}
    for c in checks:
        table.add_row(c.area, c.name, f"[{colour[c.status]}]{c.status}[/]", c.detail)
    return table
