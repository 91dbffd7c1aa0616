"""One small interface for every inference backend; nothing outside this package knows which one runs."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
from torch import nn

from ptq.errors import PtqError
from ptq.phases import Phases
from ptq.quantize import QuantOptions

PRECISIONS = ("fp32", "fp16", "int8")
BACKENDS = {"ort": "ptq.backends.ort", "torch": "ptq.backends.torch", "tensorrt": "ptq.backends.tensorrt"}


INT8_MODES = ("auto", "implicit", "explicit")


@dataclass(frozen=True)
class EngineOptions:
    """Builder settings for backends that compile an engine (TensorRT), as `trtexec` users know them."""

    workspace_mb: int = 1024
    int8_mode: str = "auto"  # implicit: TensorRT calibrator; explicit: build from ptq's QDQ ONNX; auto: by version
    dla_core: int = -1  # Jetson DLA core to run on (GPU fallback on); -1: the GPU
    timing_cache: Path | None = None  # reused across builds; default under $PTQ_CACHE_DIR
    opt_batch: int = 1  # the optimization profile's opt shape (the latency batch)
    max_batch: int = 32  # the profile's max shape (the evaluation batch)

    def validate(self) -> None:
        """Refuse impossible settings before any work is done."""
        if self.workspace_mb <= 0:
            raise PtqError(f"workspace_mb={self.workspace_mb} must be positive")
        if self.int8_mode not in INT8_MODES:
            raise PtqError(f"unknown int8_mode {self.int8_mode!r}: use one of {', '.join(INT8_MODES)}")
        if self.dla_core < -1:
            raise PtqError(f"dla_core={self.dla_core} must be -1 (GPU) or a DLA core index")
        if not 1 <= self.opt_batch <= self.max_batch:
            raise PtqError(f"batch sizes must satisfy 1 <= opt ({self.opt_batch}) <= max ({self.max_batch})")


@dataclass
class CompressJob:
    """What a backend needs to compress one model: the FP32 ONNX file, the torch module, calibration data."""

    fp32_onnx: Path
    module: nn.Module | None
    precision: str
    calib_batches: Callable[[int], Iterator[np.ndarray]]  # batch size -> normalized float32 NCHW batches
    quant: QuantOptions
    phases: Phases
    workdir: Path
    engine: EngineOptions = field(default_factory=EngineOptions)


@dataclass
class Compressed:
    """A backend's compressed model: the file it runs (its size is the compressed size) and side artifacts."""

    path: Path
    artifacts: list[Path] = field(default_factory=list)
    handle: object | None = None  # an in-memory model a backend may hand from compress() to open()
    numerics: str = ""  # what the model really computes in ("fp32 (TF32 off)", "int8 with fp16 fallback"...)
    tags: dict[str, str] = field(default_factory=dict)  # further facts about how it was made, logged as run tags


class Session(ABC):
    """An opened model that classifies batches; `run` returns when the results are really computed."""

    @abstractmethod
    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits (N, 1000) as float32 for a normalized float32 NCHW batch."""


class Backend(ABC):
    """Compresses an ONNX (or torch) model to a precision and opens sessions on the result."""

    name: ClassVar[str]
    precisions: ClassVar[tuple[str, ...]] = PRECISIONS

    def check(self, precision: str, onnx_only: bool = False) -> None:
        """Refuse an unsupported precision, a missing runtime or (`onnx_only`: model=*.onnx, no torch module) a
        model this backend cannot take, before any work is done."""
        if precision not in self.precisions:
            raise PtqError(f"backend {self.name} does not support precision {precision!r} here: use one of {', '.join(self.precisions)}")

    @abstractmethod
    def compress(self, job: CompressJob) -> Compressed:
        """Produce the model file this backend runs at `job.precision`."""

    @abstractmethod
    def open(self, model: Compressed, threads: int) -> Session:
        """Load the compressed model for inference with `threads` CPU threads."""

    @abstractmethod
    def versions(self) -> dict[str, str]:
        """Runtime library versions, logged as tags."""

    def device(self) -> str:
        """Where this backend computes (cpu, cuda:0, ...)."""
        return "cpu"


def get_backend(name: str) -> Backend:
    """Instantiate a backend by name."""
    if name not in BACKENDS:
        raise PtqError(f"unknown backend {name!r}: use one of {', '.join(BACKENDS)}")
    module = importlib.import_module(BACKENDS[name])
    backend: Backend = module.BACKEND()
    return backend
