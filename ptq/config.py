"""The parameters of one run, with their defaults; CLI, entry points and sweeps all fill this one object."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from typing import Any, Dict

from ptq.backends import PRECISIONS, backend_class, int8_setting
from ptq.options import option_params
from ptq.bench import LatencyMethod
from ptq import quantizers
from ptq.errors import PtqError
from ptq.models import WEIGHTS
from ptq.worker import LATENCY_PROCESSES, WORKER_BACKENDS


@dataclass
class RunConfig:
    """Everything that reproduces a run; every field is logged as an MLflow param."""

    model: str
    precision: str = "int8"
    backend: str = "ort"
    quantizer: str = "ort"  # the INT8 technique: the backend's own (ort), or a toolkit's (ptq.quantizers)
    weights: str = "pretrained"
    data: Path | None = None
    calib_size: int = 100
    eval_size: int | None = None
    split_seed: int = 0
    batch_size: int = 1
    eval_batch_size: int = 32
    threads: int = 0  # 0: every core
    warmup: int = LatencyMethod.warmup
    min_queries: int = LatencyMethod.min_queries
    min_duration_s: float = LatencyMethod.min_duration_s
    blocks: int = LatencyMethod.blocks
    latency_process: str = "inprocess"  # where latency is timed: inprocess, or a lean worker process per model (ptq.worker)
    options: Dict[str, str] = field(default_factory=dict)  # the backend's and the quantizer's options the user set, by name
    input_size: int | None = None  # for model=*.onnx
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    experiment: str = "ptq"
    monitor: bool = True
    monitor_interval: float = 1.0
    profile: bool = False  # per-op kernel times of both models (where the backend has a profiler)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.data is None and os.environ.get("PTQ_DATA"):
            self.data = Path(os.environ["PTQ_DATA"])

    def validate(self) -> None:
        """Refuse bad parameters before any work is done."""
        backend_class(self.backend)  # an unknown backend is named before anything else
        quantizers.options_class(self.quantizer)
        if self.quantizer != quantizers.BUILT_IN:
            if self.precision != "int8":
                raise PtqError(f"quantizer {self.quantizer} makes INT8 models: use precision=int8, or quantizer=ort for {self.precision}")
            if not backend_class(self.backend).runs_qdq:
                raise PtqError(f"quantizer {self.quantizer} writes a QDQ ONNX, which backend {self.backend} cannot run: use backend ort or tensorrt")
        if self.precision not in PRECISIONS:
            raise PtqError(f"unknown precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if self.weights not in WEIGHTS:
            raise PtqError(f"unknown weights {self.weights!r}: use one of {', '.join(WEIGHTS)}")
        if self.data is None:
            raise PtqError("no image data given: pass data=PATH (or set PTQ_DATA) to an ImageNet-style or flat <wnid>_*.JPEG folder")
        for name in ("batch_size", "eval_batch_size", "min_queries"):
            if getattr(self, name) < 1:
                raise PtqError(f"{name}={getattr(self, name)} must be at least 1")
        if self.blocks < 2:
            raise PtqError(f"blocks={self.blocks} must be at least 2: the speed-up's confidence interval resamples blocks")
        cpus = os.cpu_count() or 1
        if not 0 <= self.threads <= cpus:
            raise PtqError(f"threads={self.threads} must be between 0 and {cpus}, this machine's logical CPUs (0 = every core)")
        if self.precision == "int8" and self.calib_size < 1:
            raise PtqError(
                f"calib_size={self.calib_size}: precision=int8 needs calibration images: set calib_size to 1 or more (default 100), "
                "or use precision fp32 or fp16"
            )
        for name in ("warmup", "min_duration_s"):
            if getattr(self, name) < 0:
                raise PtqError(f"{name}={getattr(self, name)} must be 0 or more")
        if self.latency_process not in LATENCY_PROCESSES:
            raise PtqError(f"unknown latency_process {self.latency_process!r}: use one of {', '.join(LATENCY_PROCESSES)}")
        if self.monitor_interval <= 0:
            raise PtqError(f"monitor_interval={self.monitor_interval} must be positive (seconds)")
        self.backend_options()
        self.quantizer_options()

    def _quantizer_keys(self) -> set[str]:
        return quantizers.option_names(self.quantizer) & set(self.options)

    def backend_options(self) -> Any:
        """The chosen backend's options: its defaults, overridden by what the user set (less the quantizer's own);
        refuses another backend's, and its INT8 settings where another quantizer quantizes."""
        given = {k: v for k, v in self.options.items() if k not in self._quantizer_keys()}
        return backend_class(self.backend).options(given, self.quantizer)

    def quantizer_options(self) -> Any:
        """The chosen quantizer's options: its defaults, overridden by what the user set."""
        return quantizers.options(self.quantizer, {k: self.options[k] for k in self._quantizer_keys()})

    def latency(self) -> LatencyMethod:
        """How latency is timed: warm-up, blocks, minimum queries and duration, at the latency batch size."""
        return LatencyMethod(self.warmup, self.min_queries, self.min_duration_s, self.blocks, self.batch_size)

    @property
    def latency_in_worker(self) -> bool:
        """Whether latency is timed in worker processes: latency_process=worker, on a backend whose model a worker
        opens from its files (torch's is a torch module: its runs are timed in-process)."""
        return self.latency_process == "worker" and self.backend in WORKER_BACKENDS

    @property
    def threads_used(self) -> int:
        """CPU threads actually used: `threads`, or every core when it is 0."""
        return self.threads if self.threads > 0 else os.cpu_count() or 1

    def params(self) -> dict[str, str]:
        """Flat string params for MLflow, spelled as the CLI and MLproject take them (0 = default, true/false)."""
        flat: dict[str, Any] = {k: v for k, v in asdict(self).items() if k not in ("options", "progress")}
        backend = self.backend_options()
        own_int8 = self.quantizer == quantizers.BUILT_IN  # else the backend's INT8 settings are not what ran
        flat.update({k: v for k, v in option_params(backend).items() if own_int8 or not int8_setting(self.backend, k)})
        flat.update(option_params(self.quantizer_options()))
        flat.update(eval_size=self.eval_size or 0, input_size=self.input_size or 0, threads_used=self.threads_used)
        out = {}
        for key, value in flat.items():
            if value is None:
                continue
            if isinstance(value, bool):
                value = str(value).lower()
            elif isinstance(value, tuple):
                value = ",".join(f"{v:g}" for v in value)
            out[key] = str(value)
        return out

