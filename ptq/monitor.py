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
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from ptq.compat import removeprefix, removesuffix
from ptq.phases import Phases

log = logging.getLogger(__name__)

BETWEEN = "idle"  # label for time outside any phase
MB = 1e6  # bytes in a megabyte, as MLflow's own system metrics count them

# The series' names. MLflow's System metrics tab shows exactly the metrics under `system/`; where MLflow's own
# sampler (mlflow/system_metrics/metrics/*.py) measures the same quantity ptq uses its name and definition,
# and ptq's other quantities stand beside them in the same style, with the unit in the name.
CPU = "system/cpu_utilization_percentage"  # MLflow's: the whole machine, 100 = every core busy
CPU_CORE = "system/cpu_{}_utilization_percentage"  # core i (from 0), 100 = that core busy
MEMORY = "system/system_memory_usage_megabytes"  # MLflow's: psutil's `used`
MEMORY_PCT = "system/system_memory_usage_percentage"  # MLflow's: used / total
SWAP = "system/swap_usage_megabytes"
DISK_READ = "system/disk_read_megabytes_per_second"
DISK_WRITE = "system/disk_write_megabytes_per_second"
PROCESS_CPU = "system/ptq_process_cpu_percentage"  # ptq's process, % of the whole machine like CPU
PROCESS_RSS = "system/ptq_process_rss_megabytes"
PROCESS_RSS_PEAK = "system/ptq_process_rss_peak_megabytes"  # the process's high-water mark since it started
PROCESS_THREADS = "system/ptq_process_threads"
WORKER_RSS = "system/ptq_{}worker_rss_megabytes"  # a latency worker process (ptq.worker): the measured model's (""), fp32_; quantizer_: a toolkit's
WORKER_CPU = "system/ptq_{}worker_cpu_percentage"  # the same worker's CPU, % of the whole machine like CPU
PHASE_INDEX = "system/ptq_phase_index"  # the sample's phase, as its row in the phases table (Monitor.phase_rows)
GPU_UTIL = "system/gpu_0_utilization_percentage"  # MLflow's
GPU_MEMORY = "system/gpu_0_memory_usage_megabytes"  # MLflow's
GPU_MEMORY_PCT = "system/gpu_0_memory_usage_percentage"  # MLflow's
GPU_MEMORY_BUSY = "system/gpu_0_memory_controller_utilization_percentage"  # time the memory was read or written
GPU_POWER = "system/gpu_0_power_usage_watts"  # MLflow's (ptq: from the energy counter where the GPU has one)
GPU_TEMPERATURE = "system/gpu_0_temperature_celsius"
GPU_FREQUENCY = "system/gpu_0_frequency_megahertz"
CPU_PACKAGE_POWER = "system/power_cpu_package_watts"  # RAPL, every package together
BOARD_POWER = "system/power_total_watts"  # a board's input (Jetson), which its rails are part of
POWER_SUFFIX = "_watts"  # every power series ends so; energy is integrated from them


class Source(ABC):
    """One kind of sensor. `open` raises where absent; `read` returns series name (above) -> value."""

    name: str

    @abstractmethod
    def open(self) -> None:
        """Connect to the sensor; raise if it is not present on this machine."""

    @abstractmethod
    def read(self) -> dict[str, float]:
        """Current values under the series names above."""

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


def peak_rss_bytes(status: Path = Path("/proc/self/status")) -> int:
    """This process's own peak resident memory: Linux's VmHWM, which starts afresh at exec. getrusage's ru_maxrss
    does not: a process started by fork+exec (a sweep's child) inherits its parent's resident size as its peak."""
    try:
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # elsewhere (Linux reports KiB)


class PsutilSource(Source):
    """System and process CPU, memory, swap and disk I/O (on a Jetson too: jtop reads the same kernel counters).

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
        proc_cpu = self.proc.cpu_percent(None)  # psutil's: 100 = one core
        io = psutil.disk_io_counters()
        vm, swap, mem = psutil.virtual_memory(), psutil.swap_memory(), self.proc.memory_info()
        out = {
            PROCESS_RSS: mem.rss / MB,
            PROCESS_RSS_PEAK: peak_rss_bytes() / MB,
            PROCESS_THREADS: float(self.proc.num_threads()),
            MEMORY: vm.used / MB,
            MEMORY_PCT: 100 * vm.used / vm.total,
            SWAP: swap.used / MB,
        }
        if dt >= self.MIN_RATE_INTERVAL_S:
            out[CPU] = sum(per_core) / len(per_core)
            out[PROCESS_CPU] = proc_cpu / len(per_core)
            out.update({CPU_CORE.format(i): v for i, v in enumerate(per_core)})
        if io is not None and self.io is not None and dt >= self.MIN_RATE_INTERVAL_S:
            out[DISK_READ] = (io.read_bytes - self.io.read_bytes) / MB / dt
            out[DISK_WRITE] = (io.write_bytes - self.io.write_bytes) / MB / dt
        self.io, self.t = io, now
        return out


class NvmlSource(Source):
    """NVIDIA discrete GPU 0: utilisation, memory, power (from the energy counter where supported), temperature, SM clock."""

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
            GPU_UTIL: float(util.gpu),
            GPU_MEMORY_BUSY: float(util.memory),
            GPU_MEMORY: mem.used / MB,
            GPU_MEMORY_PCT: 100 * mem.used / mem.total,
            GPU_TEMPERATURE: float(n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU)),
            GPU_FREQUENCY: float(n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM)),
        }
        now = time.monotonic()
        if self.energy_mj is not None:
            energy = n.nvmlDeviceGetTotalEnergyConsumption(h)
            out[GPU_POWER] = (energy - self.energy_mj) / 1e3 / max(now - self.t, 1e-6)
            self.energy_mj = energy
        else:
            out[GPU_POWER] = n.nvmlDeviceGetPowerUsage(h) / 1e3
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
        return {CPU_PACKAGE_POWER: total / dt}


# jetson-stats `jtop.stats` keys -> series names and scale. Rails and temperatures are named by the board
# ("Power VDD_CPU_GPU_CV", "Temp GPU" on JetPack 5, "Temp gpu" on JetPack 6), so those map by prefix, the GPU's
# zone in any case to GPU_TEMPERATURE as the sysfs reader does (ptq.jetson.temperature_series). CPU cores, RAM and
# swap are left to psutil, which reads the same kernel counters on a Jetson, so that each name has one writer.
# jtop's "EMC" is left out: it is mc_all // EMC rate in kHz (jtop/core/memory.py), whose unit is unverified
# (see ptq.jetson.read_emc).
JTOP_FIELDS: dict[str, tuple[str, float]] = {
    "GPU": (GPU_UTIL, 1.0),
    "Power TOT": (BOARD_POWER, 1e-3),
}
JTOP_OFFLINE_CELSIUS = -256.0  # jtop's value for a sensor it cannot read (jtop/core/temperature.py TEMPERATURE_OFFLINE)
JTOP_PREFIXES: dict[str, tuple[str, str, float]] = {
    "Power ": ("system/power_", POWER_SUFFIX, 1e-3),
    "Temp ": ("system/temperature_", "_celsius", 1.0),
}
JETSON_CLOCKS = "system/jetson_clocks_on"


def jtop_metrics(stats: dict[str, Any]) -> dict[str, float]:
    """Map one `jtop.stats` dictionary to series names; values that are not numbers ('OFF') and offline sensors
    (-256 °C) are dropped."""
    out: dict[str, float] = {}
    for key, value in stats.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if key in JTOP_FIELDS:
            name, scale = JTOP_FIELDS[key]
            out[name] = value * scale
            continue
        if key.startswith("Temp ") and value <= JTOP_OFFLINE_CELSIUS:
            continue
        if key.startswith("Temp ") and key[len("Temp "):].strip().lower() == "gpu":
            out[GPU_TEMPERATURE] = float(value)
            continue
        for prefix, (head, tail, scale) in JTOP_PREFIXES.items():
            if key.startswith(prefix):
                out[f"{head}{key[len(prefix):].strip().lower().replace(' ', '_')}{tail}"] = value * scale
                break
    if "jetson_clocks" in stats:
        out[JETSON_CLOCKS] = 1.0 if stats["jetson_clocks"] == "ON" else 0.0
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
            out[GPU_FREQUENCY] = freq
        return out

    def tags(self) -> dict[str, str]:
        return jtop_tags(self.jetson.stats)

    def close(self) -> None:
        self.jetson.close()


def power_source(series: str) -> str:
    """A power series' short name for per-phase figures: gpu_0, cpu_package, total, or the Jetson rail's."""
    return removeprefix(removesuffix(removesuffix(removeprefix(series, "system/"), POWER_SUFFIX), "_power_usage"), "power_")


class FirstOf(Source):
    """The first of several sources of the same quantities that opens here, so that each series has one writer;
    where none opens, the error names each one's reason."""

    def __init__(self, name: str, candidates: list[Source]) -> None:
        self.name, self.candidates = name, candidates
        self.active: Source | None = None
        self.skipped: dict[str, str] = {}

    def open(self) -> None:
        for src in self.candidates:
            try:
                src.open()
            except Exception as exc:
                self.skipped[src.name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:150]
                continue
            self.active = src
            return
        raise RuntimeError("; ".join(f"{k}: {v}" for k, v in self.skipped.items()))

    def read(self) -> dict[str, float]:
        assert self.active is not None
        return self.active.read()

    def tags(self) -> dict[str, str]:
        assert self.active is not None
        skipped = {f"monitor.{self.name}.{k}": f"absent ({v})" for k, v in self.skipped.items()}
        return {f"monitor.{self.name}": f"on ({self.active.name})", **skipped, **self.active.tags()}

    def close(self) -> None:
        if self.active is not None:
            self.active.close()


def default_sources() -> list[Source]:
    """Every source this machine might have; absent ones drop out at `open`. On a Jetson: jtop where its service
    answers, else the board's own files, else tegrastats."""
    from ptq.jetson import JetsonSysfsSource, TegrastatsSource

    return [PsutilSource(), NvmlSource(), FirstOf("jetson", [JtopSource(), JetsonSysfsSource(), TegrastatsSource()]), RaplSource()]


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
        self.workers: dict[str, psutil.Process] = {}
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
        self._wall0 = time.time()  # sample times are this plus monotonic time: real, and never going back
        self._thread = threading.Thread(target=self._loop, name="ptq-monitor", daemon=True)
        self._thread.start()

    def on_phase(self, phase: str | None) -> None:
        """Phase boundary: close the running interval under the old label, then switch labels."""
        with self._lock:
            if self._thread is not None:
                self._sample()
            self._phase = phase or BETWEEN

    def watch(self, workers: dict[str, int]) -> None:
        """Sample these worker processes too (prefix of the model it serves -> pid) from now on, in place of those
        watched before; `{}` stops. A sample is taken first, so the interval before belongs to the old set."""
        with self._lock:
            if self._thread is not None:
                self._sample()
            self.workers = {}
            for prefix, pid in workers.items():
                try:
                    proc = psutil.Process(pid)
                    proc.cpu_percent(None)  # the baseline of its first interval
                except psutil.Error:  # gone already: the run reports why
                    continue
                self.workers[prefix] = proc

    def _sample_workers(self, dt: float) -> dict[str, float]:
        """Each watched worker's RSS and (over an interval long enough for CPU times) CPU; a vanished one drops out."""
        out: dict[str, float] = {}
        cores = psutil.cpu_count() or 1
        for prefix, proc in list(self.workers.items()):
            try:
                with proc.oneshot():
                    out[WORKER_RSS.format(prefix)] = proc.memory_info().rss / MB
                    cpu = proc.cpu_percent(None) / cores
            except psutil.Error:
                del self.workers[prefix]
                continue
            if dt >= PsutilSource.MIN_RATE_INTERVAL_S:
                out[WORKER_CPU.format(prefix)] = cpu
        return out

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

    def _sample(self) -> None:
        cpu_start = time.thread_time()
        now = time.monotonic()  # however short the interval, its phase gets its sample: every phase has its row
        sample = Sample(now - self._t0, self._wall0 + now - self._t0, now - self._last, self._phase)
        for src in list(self.sources):
            try:
                sample.values.update(src.read())
            except Exception as exc:  # GPU vanished, permission revoked: warn once, carry on without it
                log.warning("monitor source %s failed (%s); its metrics stop here", src.name, exc)
                self.sources.remove(src)
                self.absent[src.name] = f"failed mid-run: {exc}"[:200]
        if self.workers:
            sample.values.update(self._sample_workers(sample.dt))
        self._last = now
        self.samples.append(sample)
        self.own_cpu_s += time.thread_time() - cpu_start

    def tags(self) -> dict[str, str]:
        """Which sources ran or were absent (and why), the sources' own tags, and the measurement's own figures:
        how many samples (each series' length at most) and the sampling's CPU cost in % of one core."""
        out = {"monitor.samples": str(len(self.samples)), "monitor.own_cpu_pct_of_one_core": f"{self.own_cpu_pct():.3f}"}
        out.update({f"monitor.{name}": f"absent ({why})" for name, why in self.absent.items()})
        for src in self.sources:
            out[f"monitor.{src.name}"] = "on"
            out.update(src.tags())
        return out

    def phase_rows(self) -> list[dict[str, Any]]:
        """One row per phase, in the order the run first entered them (`idle`: time between phases): its
        figures over all its samples (see `figures`, the memory increases over the levels just before the phase
        first began) and the images it processed."""
        by_phase: dict[str, list[Sample]] = defaultdict(list)
        for s in self.samples:
            by_phase[s.phase].append(s)
        return [{"phase": phase, **self.figures(rows, self.images.get(phase, 0), self.levels_before(rows[0]))} for phase, rows in by_phase.items()]

    def levels_before(self, first: Sample) -> dict[str, float]:
        """The levels read just before `first` began: the previous sample's (every phase boundary takes one), or
        `first`'s own where it is the run's first sample."""
        i = next(k for k, s in enumerate(self.samples) if s is first)
        return self.samples[max(i - 1, 0)].values

    def phase_table(self) -> dict[str, list[Any]]:
        """`phase_rows` as columns for `Recorder.table`, every figure any phase has (None where a phase lacks it)."""
        rows = self.phase_rows()
        return {c: [r.get(c) for r in rows] for c in ["phase", *self.figures(self.samples, 0, self.samples[0].values if self.samples else {})]}

    def headline(self, scope: str, phases: Iterable[str], names: Iterable[str]) -> dict[str, float]:
        """The `figures` called `names` over the samples of `phases` taken together, as `<scope>/<name>` (memory
        increases over the levels just before the first of them began); none where those phases have no samples
        or the figure was not measured."""
        wanted = set(phases)
        rows = [s for s in self.samples if s.phase in wanted]
        figures = self.figures(rows, sum(self.images.get(p, 0) for p in wanted), self.levels_before(rows[0])) if rows else {}
        return {f"{scope}/{name}": value for name in names if (value := figures.get(name)) is not None}

    @staticmethod
    def figures(rows: list[Sample], images: int, before: dict[str, float] | None = None) -> dict[str, float | None]:
        """Duration, images, CPU (`cpu_pct`: the whole machine; `proc_cpu_pct`: ptq's process; both % of the whole
        machine) mean and max, peak memory (MB) and, given the levels `before` the rows began, its increase over
        them (`*_delta_mb`: what the phase added, apart from what the process held already), the latency workers'
        peak RSS and mean CPU (`worker_peak_rss_mb`, `worker_cpu_pct_mean`; `fp32_worker_*`), GPU, then mean power
        and energy per source (W, J), energy in all (the board's total where measured, else the sum of the sources)
        and per image. Means are time-weighted;
        a quantity no sample measured is absent."""
        keys = {k for r in rows for k in r.values}

        def mean(key: str) -> float:
            pts = [(r.values[key], r.dt) for r in rows if key in r.values]
            return sum(v * d for v, d in pts) / max(sum(d for _, d in pts), 1e-9)

        def peak(key: str) -> float:
            return max(r.values[key] for r in rows if key in r.values)

        out: dict[str, float | None] = {"seconds": sum(r.dt for r in rows), "images": images}
        for key, name in ((CPU, "cpu_pct"), (PROCESS_CPU, "proc_cpu_pct"), (GPU_UTIL, "gpu_util_pct")):
            if key in keys:
                out[f"{name}_mean"], out[f"{name}_max"] = mean(key), peak(key)
        for key, name in ((PROCESS_RSS, "peak_rss"), (MEMORY, "peak_ram_used"), (GPU_MEMORY, "peak_gpu_mem")):
            if key in keys:
                out[f"{name}_mb"] = peak(key)
                if before is not None and key in before:
                    out[f"{name}_delta_mb"] = peak(key) - before[key]
        for prefix in ("", "fp32_", "quantizer_"):  # the latency workers and a toolkit quantizer's process, apart from ptq's
            if (rss := WORKER_RSS.format(prefix)) in keys:
                out[f"{prefix}worker_peak_rss_mb"] = peak(rss)
            if (cpu := WORKER_CPU.format(prefix)) in keys:
                out[f"{prefix}worker_cpu_pct_mean"] = mean(cpu)
        energy: dict[str, float] = {}
        for key in sorted(k for k in keys if k.endswith(POWER_SUFFIX)):
            source = power_source(key)
            out[f"power_{source}_w_mean"] = mean(key)
            energy[source] = out[f"energy_{source}_j"] = sum(r.values[key] * r.dt for r in rows if key in r.values)
        if energy:
            total = energy.get(power_source(BOARD_POWER), sum(energy.values()))
            out["energy_j"] = total
            out["energy_per_img_j"] = total / images if images else None
        return out

    def points(self) -> list[tuple[str, float, int, int]]:
        """Every sampled value, and the sample's phase as its row in `phase_rows`, as (series, value, timestamp in
        ms, step = the sample's number from 0): one step per sample, so each series draws as one line over the run."""
        row = {phase: i for i, phase in enumerate(dict.fromkeys(s.phase for s in self.samples))}
        out = []
        for step, s in enumerate(self.samples):
            ms = int(s.wall * 1000)
            out += [(key, float(v), ms, step) for key, v in s.values.items()]
            out.append((PHASE_INDEX, float(row[s.phase]), ms, step))
        return out

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
        wanted: list[str] = [k for k in (CPU, PROCESS_CPU, PROCESS_RSS, MEMORY, GPU_UTIL, GPU_MEMORY) if k in keys]
        wanted += [k for k in keys if k.endswith(POWER_SUFFIX)]
        fig, axes = plt.subplots(len(wanted), 1, figsize=(11, 1.9 * len(wanted) + 0.6), sharex=True, squeeze=False)
        spans = self._phase_spans()
        colors = [plt.get_cmap("tab20")(i) for i in range(20)]
        palette = {ph: colors[i % len(colors)] for i, ph in enumerate(dict.fromkeys(ph for ph, _, _ in spans))}
        for ax, key in zip(axes[:, 0], wanted):
            pts = [(s.t, s.values[key]) for s in self.samples if key in s.values]
            ax.plot([t for t, _ in pts], [v for _, v in pts], marker=".", lw=1)
            ax.set_ylabel(removeprefix(key, "system/").replace("_", " "), fontsize=7)
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
