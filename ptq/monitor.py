"""Background resource sampler with phase labels: psutil everywhere, NVML on NVIDIA GPUs, jtop on Jetson, RAPL on x86.

Each sample covers the interval since the previous one and is labelled with the phase that ran during it;
a sample is also taken at every phase boundary, so even a sub-second phase has its own figures. Rates
(CPU %, power from energy counters) are averages over the interval; levels (RSS, memory) are read at its end.
"""

from __future__ import annotations

import csv
import io
import logging
import resource
import threading
import time
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from ptq.phases import Phases

log = logging.getLogger(__name__)

BETWEEN = "idle"  # label for time outside any phase


class Source(ABC):
    """One kind of sensor. `open` raises where absent; `read` returns metric name -> value."""

    name: str

    @abstractmethod
    def open(self) -> None:
        """Connect to the sensor; raise if it is not present on this machine."""

    @abstractmethod
    def read(self) -> dict[str, float]:
        """Current values under ptq's metric names."""

    def tags(self) -> dict[str, str]:
        """Static facts worth tagging the run with (power mode, GPU name...)."""
        return {}

    def close(self) -> None:
        """Release the sensor."""


def busy_pct(before: Any, after: Any) -> float:
    """CPU busy % of one core between two `psutil.cpu_times` readings (idle and iowait count as not busy;
    guest time is already inside user time on Linux)."""
    delta = {f: getattr(after, f) - getattr(before, f) for f in after._fields if f not in ("guest", "guest_nice")}
    total = sum(delta.values())
    idle = delta.get("idle", 0.0) + delta.get("iowait", 0.0)
    return 100.0 * (total - idle) / total if total > 0 else 0.0


class PsutilSource(Source):
    """System and process CPU, memory, swap and disk I/O.

    System CPU % is computed from this source's own `cpu_times` readings, not `psutil.cpu_percent`, whose
    baseline is kept per calling thread: samples come from the sampler thread and from the run's thread
    (phase boundaries), and each must cover exactly the interval since the previous sample."""

    name = "psutil"

    def open(self) -> None:
        self.proc = psutil.Process()
        self.proc.cpu_percent(None)
        self.cores = psutil.cpu_times(percpu=True)
        self.io = psutil.disk_io_counters()
        self.t = time.monotonic()

    # CPU times tick every 10 ms: rates over a shorter interval are noise, so they are left out, not zeroed.
    MIN_RATE_INTERVAL_S = 0.05

    def read(self) -> dict[str, float]:
        now = time.monotonic()
        dt = max(now - self.t, 1e-6)
        cores = psutil.cpu_times(percpu=True)
        per_core = [busy_pct(a, b) for a, b in zip(self.cores, cores)]
        self.cores = cores
        proc_cpu = self.proc.cpu_percent(None)
        io = psutil.disk_io_counters()
        vm, swap, mem = psutil.virtual_memory(), psutil.swap_memory(), self.proc.memory_info()
        out = {
            "proc/rss_mb": mem.rss / 2**20,
            "proc/rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "proc/threads": float(self.proc.num_threads()),
            "sys/ram_used_mb": (vm.total - vm.available) / 2**20,
            "sys/swap_used_mb": swap.used / 2**20,
        }
        if dt >= self.MIN_RATE_INTERVAL_S:
            out["sys/cpu_pct"] = sum(per_core) / len(per_core)
            out["proc/cpu_pct"] = proc_cpu
            out.update({f"sys/cpu{i}_pct": v for i, v in enumerate(per_core)})
        if io is not None and self.io is not None and dt >= self.MIN_RATE_INTERVAL_S:
            out["sys/disk_read_mb_s"] = (io.read_bytes - self.io.read_bytes) / 2**20 / dt
            out["sys/disk_write_mb_s"] = (io.write_bytes - self.io.write_bytes) / 2**20 / dt
        self.io, self.t = io, now
        return out


class NvmlSource(Source):
    """NVIDIA discrete GPU 0: utilisation, memory, power (from the energy counter where supported), temperature, clocks."""

    name = "nvml"

    def open(self) -> None:
        import pynvml

        self.nvml = pynvml
        pynvml.nvmlInit()
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        self.gpu_name = str(pynvml.nvmlDeviceGetName(self.handle))
        try:
            self.energy_mj: int | None = pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        except pynvml.NVMLError:
            self.energy_mj = None
        self.t = time.monotonic()

    def read(self) -> dict[str, float]:
        n, h = self.nvml, self.handle
        util = n.nvmlDeviceGetUtilizationRates(h)
        mem = n.nvmlDeviceGetMemoryInfo(h)
        out = {
            "gpu/util_pct": float(util.gpu),
            "gpu/mem_util_pct": float(util.memory),
            "gpu/mem_mb": mem.used / 2**20,
            "gpu/temp_c": float(n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU)),
            "gpu/sm_clock_mhz": float(n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM)),
        }
        now = time.monotonic()
        if self.energy_mj is not None:
            energy = n.nvmlDeviceGetTotalEnergyConsumption(h)
            out["power/gpu_w"] = (energy - self.energy_mj) / 1e3 / max(now - self.t, 1e-6)
            self.energy_mj = energy
        else:
            out["power/gpu_w"] = n.nvmlDeviceGetPowerUsage(h) / 1e3
        self.t = now
        return out

    def tags(self) -> dict[str, str]:
        return {"device.gpu": self.gpu_name}

    def close(self) -> None:
        self.nvml.nvmlShutdown()


class RaplSource(Source):
    """x86 package energy from the Linux powercap files (readable by root on most distributions)."""

    name = "rapl"
    root = Path("/sys/class/powercap")

    def open(self) -> None:
        self.zones = sorted(p for p in self.root.glob("intel-rapl:[0-9]") if (p / "energy_uj").is_file())
        if not self.zones:
            raise FileNotFoundError(f"no RAPL zones under {self.root}")
        self.wrap = [int((z / "max_energy_range_uj").read_text()) for z in self.zones]
        self.last = [int((z / "energy_uj").read_text()) for z in self.zones]  # PermissionError where not root
        self.t = time.monotonic()

    def read(self) -> dict[str, float]:
        now = time.monotonic()
        dt = max(now - self.t, 1e-6)
        total = 0.0
        for i, zone in enumerate(self.zones):
            value = int((zone / "energy_uj").read_text())
            total += ((value - self.last[i]) % self.wrap[i]) / 1e6
            self.last[i] = value
        self.t = now
        return {"power/cpu_pkg_w": total / dt}


# jetson-stats `jtop.stats` keys -> ptq metric names and scale. Rails and temperatures are named by the
# board ("Power VDD_CPU_GPU_CV", "Temp GPU"), so those map by prefix.
JTOP_FIELDS: dict[str, tuple[str, float]] = {
    "GPU": ("gpu/util_pct", 1.0),
    "RAM": ("sys/ram_used_pct", 100.0),
    "SWAP": ("sys/swap_used_pct", 100.0),
    "EMC": ("jetson/emc_pct", 1.0),
    "Power TOT": ("power/total_w", 1e-3),
}
JTOP_PREFIXES: dict[str, tuple[str, str, float]] = {
    "CPU": ("jetson/cpu", "_pct", 1.0),
    "Power ": ("power/", "_w", 1e-3),
    "Temp ": ("temp/", "_c", 1.0),
}


def jtop_metrics(stats: dict[str, Any]) -> dict[str, float]:
    """Map one `jtop.stats` dictionary to ptq metric names; values that are not numbers ('OFF') are dropped."""
    out: dict[str, float] = {}
    for key, value in stats.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if key in JTOP_FIELDS:
            name, scale = JTOP_FIELDS[key]
            out[name] = value * scale
            continue
        for prefix, (head, tail, scale) in JTOP_PREFIXES.items():
            if key.startswith(prefix):
                out[f"{head}{key[len(prefix):].strip().lower()}{tail}"] = value * scale
                break
    if "jetson_clocks" in stats:
        out["jetson/clocks_on"] = 1.0 if stats["jetson_clocks"] == "ON" else 0.0
    return out


def jtop_tags(stats: dict[str, Any]) -> dict[str, str]:
    """The Jetson's power mode and jetson_clocks state, as run tags."""
    tags = {}
    if "nvp model" in stats:
        tags["device.nvpmodel"] = str(stats["nvp model"])
    if "jetson_clocks" in stats:
        tags["device.jetson_clocks"] = str(stats["jetson_clocks"])
    return tags


def jtop_gpu_freq_mhz(gpus: Any) -> float | None:
    """The integrated GPU's current frequency from `jtop.gpu`, which jetson-stats 4 keys by the GPU's own
    name (gv11b on Xavier, ga10b on Orin) with `freq.cur` in kHz; None where it does not say."""
    try:
        for info in dict(gpus.items()).values():
            if info.get("type") == "integrated" and "cur" in info.get("freq", {}):
                return float(info["freq"]["cur"]) / 1e3
    except (AttributeError, TypeError, ValueError):
        pass
    return None


class JtopSource(Source):
    """NVIDIA Jetson through jetson-stats' service: GPU, CPU cores, shared RAM, power rails, temperatures."""

    name = "jtop"

    def open(self) -> None:
        from jtop import jtop

        self.jetson = jtop()
        self.jetson.start()

    def read(self) -> dict[str, float]:
        out = jtop_metrics(self.jetson.stats)
        if (freq := jtop_gpu_freq_mhz(self.jetson.gpu)) is not None:
            out["gpu/freq_mhz"] = freq
        return out

    def tags(self) -> dict[str, str]:
        return jtop_tags(self.jetson.stats)

    def close(self) -> None:
        self.jetson.close()


def default_sources() -> list[Source]:
    """Every source this machine might have; absent ones drop out at `open`."""
    return [PsutilSource(), NvmlSource(), JtopSource(), RaplSource()]


@dataclass
class Sample:
    """Values over the interval [t - dt, t] of the run, which ran `phase` during it."""

    t: float
    wall: float
    dt: float
    phase: str
    values: dict[str, float] = field(default_factory=dict)


class Monitor:
    """Samples every `interval` seconds on a daemon thread and at each phase boundary; summarizes per phase."""

    def __init__(self, interval: float, phases: Phases | None = None, sources: list[Source] | None = None) -> None:
        self.interval = interval
        self.sources: list[Source] = []
        self.absent: dict[str, str] = {}
        self.samples: list[Sample] = []
        self.images: dict[str, int] = defaultdict(int)
        self.own_cpu_s = 0.0
        self._phase = BETWEEN
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._candidates = sources if sources is not None else default_sources()
        if phases is not None:
            phases.subscribe(self.on_phase)

    def start(self) -> None:
        """Open the sources that exist here and start sampling."""
        for src in self._candidates:
            try:
                src.open()
                self.sources.append(src)
            except Exception as exc:  # absent hardware or library: reported, never faked as zero
                self.absent[src.name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        self._t0 = self._last = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="ptq-monitor", daemon=True)
        self._thread.start()

    def on_phase(self, phase: str | None) -> None:
        """Phase boundary: close the running interval under the old label, then switch labels."""
        with self._lock:
            if self._thread is not None:
                self._sample()
            self._phase = phase or BETWEEN

    def count_images(self, phase: str, n: int) -> None:
        """Record how many images a phase processed, for energy per image."""
        self.images[phase] += n

    def stop(self) -> None:
        """Take a last sample, stop the thread and close the sources; safe to call twice."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        with self._lock:
            self._sample()
        for src in self.sources:
            try:
                src.close()
            except Exception:
                pass

    def _loop(self) -> None:
        next_tick = time.monotonic() + self.interval
        while not self._stop.wait(max(0.0, next_tick - time.monotonic())):
            next_tick += self.interval
            with self._lock:
                self._sample()

    # Two boundaries closer than this (a phase ending as the run stops) would log the same point twice at the
    # same millisecond, which MLflow stores once: such an interval carries no information and is not sampled.
    MIN_SAMPLE_INTERVAL_S = 0.001

    def _sample(self) -> None:
        cpu_start = time.thread_time()
        now = time.monotonic()
        if now - self._last < self.MIN_SAMPLE_INTERVAL_S:
            return
        sample = Sample(now - self._t0, time.time(), now - self._last, self._phase)
        for src in list(self.sources):
            try:
                sample.values.update(src.read())
            except Exception as exc:  # GPU vanished, permission revoked: warn once, carry on without it
                log.warning("monitor source %s failed (%s); its metrics stop here", src.name, exc)
                self.sources.remove(src)
                self.absent[src.name] = f"failed mid-run: {exc}"[:200]
        self._last = now
        self.samples.append(sample)
        self.own_cpu_s += time.thread_time() - cpu_start

    def tags(self) -> dict[str, str]:
        """Which sources ran or were absent (and why), plus the sources' own tags."""
        out = {f"monitor.{name}": f"absent ({why})" for name, why in self.absent.items()}
        for src in self.sources:
            out[f"monitor.{src.name}"] = "on"
            out.update(src.tags())
        return out

    def summary(self) -> dict[str, float]:
        """Per-phase figures: duration, mean/max CPU, peak RSS and GPU memory, mean power, energy, energy per image."""
        by_phase: dict[str, list[Sample]] = defaultdict(list)
        for s in self.samples:
            if s.dt > 0:
                by_phase[s.phase].append(s)
        out: dict[str, float] = {}
        for phase, rows in by_phase.items():
            p = f"phase/{phase}"
            seconds = sum(r.dt for r in rows)
            out[f"{p}/seconds"] = seconds
            keys = {k for r in rows for k in r.values}

            def tmean(key: str) -> float:
                pts = [(r.values[key], r.dt) for r in rows if key in r.values]
                return sum(v * d for v, d in pts) / max(sum(d for _, d in pts), 1e-9)

            def peak(key: str) -> float:
                return max(r.values[key] for r in rows if key in r.values)

            for key, name in (("sys/cpu_pct", "cpu_pct"), ("proc/cpu_pct", "proc_cpu_pct"), ("gpu/util_pct", "gpu_util_pct")):
                if key in keys:
                    out[f"{p}/{name}_mean"] = tmean(key)
                    out[f"{p}/{name}_max"] = peak(key)
            for key, name in (("proc/rss_mb", "rss_mb_peak"), ("sys/ram_used_mb", "ram_used_mb_peak"), ("gpu/mem_mb", "gpu_mem_mb_peak")):
                if key in keys:
                    out[f"{p}/{name}"] = peak(key)
            power_keys = sorted(k for k in keys if k.startswith("power/"))
            energy: dict[str, float] = {}
            for key in power_keys:
                src = key[len("power/") : -len("_w")]
                out[f"{p}/power_{src}_w_mean"] = tmean(key)
                energy[src] = sum(r.values[key] * r.dt for r in rows if key in r.values)
                out[f"{p}/energy_{src}_j"] = energy[src]
            if energy:
                total = energy["total"] if "total" in energy else sum(energy.values())
                out[f"{p}/energy_j"] = total
                if self.images.get(phase):
                    out[f"{p}/energy_per_img_j"] = total / self.images[phase]
        return out

    def points(self) -> list[tuple[str, float, int, int]]:
        """Every sampled value as (metric, value, timestamp in ms, step = whole seconds since start)."""
        return [(key, float(v), int(s.wall * 1000), int(s.t)) for s in self.samples for key, v in s.values.items()]

    def csv_text(self) -> str:
        """The raw timeline: one row per sample, one column per quantity."""
        keys = sorted({k for s in self.samples for k in s.values})
        out = io.StringIO()
        w = csv.writer(out)
        w.writerow(["t_s", "timestamp", "dt_s", "phase", *keys])
        for s in self.samples:
            w.writerow([f"{s.t:.3f}", f"{s.wall:.3f}", f"{s.dt:.3f}", s.phase, *(s.values.get(k, "") for k in keys)])
        return out.getvalue()

    def plot(self, path: Path) -> Path:
        """One panel per main quantity against time, phases shaded and named."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch

        keys = sorted({k for s in self.samples for k in s.values})
        wanted: list[str] = [k for k in ("sys/cpu_pct", "proc/cpu_pct", "proc/rss_mb", "sys/ram_used_mb", "gpu/util_pct", "gpu/mem_mb") if k in keys]
        wanted += [k for k in keys if k.startswith("power/")]
        fig, axes = plt.subplots(len(wanted), 1, figsize=(11, 1.9 * len(wanted) + 0.6), sharex=True, squeeze=False)
        spans = self._phase_spans()
        colors = [plt.get_cmap("tab20")(i) for i in range(20)]
        palette = {ph: colors[i % len(colors)] for i, ph in enumerate(dict.fromkeys(ph for ph, _, _ in spans))}
        for ax, key in zip(axes[:, 0], wanted):
            pts = [(s.t, s.values[key]) for s in self.samples if key in s.values]
            ax.plot([t for t, _ in pts], [v for _, v in pts], marker=".", lw=1)
            ax.set_ylabel(key, fontsize=8)
            ax.grid(alpha=0.3)
            for phase, a, b in spans:
                ax.axvspan(a, b, color=palette[phase], alpha=0.25, lw=0)
        axes[-1, 0].set_xlabel("seconds since run start")
        # a legend, not labels on the spans: sub-second phases (warm-up, build) would print on top of each other
        handles = [Patch(color=color, alpha=0.4, label=phase) for phase, color in palette.items()]
        fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 7), fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight() * (1 + len(handles) // 7)))
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def _phase_spans(self) -> list[tuple[str, float, float]]:
        spans: list[tuple[str, float, float]] = []
        for s in self.samples:
            a = s.t - s.dt
            if spans and spans[-1][0] == s.phase:
                spans[-1] = (s.phase, spans[-1][1], s.t)
            elif s.phase != BETWEEN:
                spans.append((s.phase, a, s.t))
        return spans

    def own_cpu_pct(self) -> float:
        """The sampling's own CPU time (thread and boundary samples) as a percentage of one core."""
        elapsed = self.samples[-1].t if self.samples else 0.0
        return 100 * self.own_cpu_s / elapsed if elapsed > 0 else 0.0
