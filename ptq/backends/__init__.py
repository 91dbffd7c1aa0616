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


@dataclass
class Compressed:
    """A backend's compressed model: the file it runs (its size is the compressed size) and side artifacts."""

    path: Path
    artifacts: list[Path] = field(default_factory=list)
    handle: object | None = None  # an in-memory model a backend may hand from compress() to open()


class Session(ABC):
    """An opened model that classifies batches; `run` returns when the results are really computed."""

    @abstractmethod
    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits (N, 1000) as float32 for a normalized float32 NCHW batch."""


class Backend(ABC):
    """Compresses an ONNX (or torch) model to a precision and opens sessions on the result."""

    name: ClassVar[str]
    precisions: ClassVar[tuple[str, ...]] = PRECISIONS

    def check(self, precision: str) -> None:
        """Refuse an unsupported precision or a missing runtime before any work is done."""
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
