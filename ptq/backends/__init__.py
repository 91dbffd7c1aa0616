"""One small interface for every inference backend; nothing outside this package knows which one runs.

Importing it costs neither torch nor ONNX Runtime: each backend imports its runtime where it first needs it,
so a Jetson that runs TensorRT alone needs neither. Each backend owns its options (one frozen dataclass, its
`Options`): the CLI and MLproject offer every backend's, a run logs only its own backend's.
"""

from __future__ import annotations

import dataclasses
import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Tuple, Type

import numpy as np

from ptq.errors import PtqError
from ptq.options import NoOptions, parse_options, user_options
from ptq.phases import Phases

if TYPE_CHECKING:
    from torch import nn

PRECISIONS = ("fp32", "fp16", "int8")
BACKENDS = {"ort": "ptq.backends.ort", "torch": "ptq.backends.torch", "tensorrt": "ptq.backends.tensorrt"}


@dataclass
class CompressJob:
    """What a backend needs to compress one model: the FP32 ONNX file, the torch module, calibration data."""

    fp32_onnx: Path
    module: nn.Module | None
    precision: str
    calib_batches: Callable[[int], Iterator[np.ndarray]]  # batch size -> normalized float32 NCHW batches
    options: Any  # the backend's own Options
    phases: Phases
    workdir: Path
    batch_sizes: Tuple[int, int] = (1, 32)  # the latency batch and the largest (evaluation) batch
    threads: int = 0  # CPU threads the run's sessions use (0: the runtime's default)
    qdq_onnx: Path | None = None  # a QDQ model made beforehand (`ptq quantize`): int8 runs it as it is, calibrating nothing
    reference: bool = False  # the FP32 reference built beside the measured model (a DLA run builds it on the GPU)


@dataclass
class Compressed:
    """A backend's compressed model: the file it runs (its size is the compressed size) and side artifacts."""

    path: Path
    artifacts: list[Path] = field(default_factory=list)
    handle: object | None = None  # an in-memory model a backend may hand from compress() to open()
    numerics: str = ""  # what the model really computes in ("fp32 (TF32 off)", "int8 with fp16 fallback"...)
    tags: dict[str, str] = field(default_factory=dict)  # further facts about how it was made, logged as run tags
    metrics: dict[str, float] = field(default_factory=dict)  # what choosing among variants measured, logged as run metrics


class Session(ABC):
    """An opened model that classifies batches; `run` returns when the results are really computed."""

    @abstractmethod
    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits (N, 1000) as float32 for a normalized float32 NCHW batch."""

    def gpu_ms(self) -> list[float] | None:
        """The device's own time (ms) of each `run` since the previous call, which clears them; None: no device clock."""
        return None


class Backend(ABC):
    """Compresses an ONNX (or torch) model to a precision and opens sessions on the result."""

    name: ClassVar[str]
    precisions: ClassVar[Tuple[str, ...]] = PRECISIONS
    Options: ClassVar[Type[Any]] = NoOptions

    runs_qdq: ClassVar[bool] = True  # whether it runs the QDQ ONNX a quantizer other than `ort` writes
    qdq_target: ClassVar[str] = ""  # the Q/DQ layout it needs from a quantizer: "" any, "tensorrt" TensorRT's rules

    @classmethod
    def options(cls, given: Mapping[str, str], quantizer: str = "ort") -> Any:
        """This backend's options from the values a user gave (strings; unset ones keep their defaults); one clear
        error for an option of another backend or quantizer, or for one of its own INT8 settings where `quantizer`
        (not `ort`) quantizes instead."""
        from ptq import quantizers

        mine = {f.name: f for f in user_options(cls.Options)}
        for name in given:
            if name not in mine:
                owners = [f"backend {b}" for b in BACKENDS if b != cls.name and name in {f.name for f in user_options(options_class(b))}]
                owners += [f"quantizer {q}" for q in quantizers.QUANTIZERS if q != quantizer and name in quantizers.option_names(q)]
                takes = ", ".join(mine) or "no options"
                also = f"; quantizer {quantizer} takes {', '.join(sorted(quantizers.option_names(quantizer))) or 'none'}" if quantizer != quantizers.BUILT_IN else ""
                raise PtqError(f"{name} is an option of {' or '.join(owners) or '?'}, not of {cls.name} (which takes {takes}{also}): drop it, or set backend or quantizer")
            if quantizer != quantizers.BUILT_IN and mine[name].metadata.get("quantizes"):
                takes = ", ".join(sorted(quantizers.option_names(quantizer))) or "no options"
                raise PtqError(f"{name} sets backend {cls.name}'s own INT8 quantization (quantizer=ort), not quantizer {quantizer}'s (which takes {takes}): drop it, or use quantizer=ort")
        return parse_options(cls.Options, dict(given))

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

    profiles: ClassVar[bool] = False  # whether `profile` works

    def profile(self, model: Compressed, batch: np.ndarray, threads: int) -> Any:
        """Kernel time per node and op type of `model` on `batch` (a `ptq.profile.OpProfile`), where the runtime
        has a profiler (`profiles`)."""
        raise NotImplementedError(self.name)

    @abstractmethod
    def versions(self) -> dict[str, str]:
        """Runtime library versions, logged as tags."""

    def device(self) -> str:
        """Where this backend computes (cpu, cuda:0, ...)."""
        return "cpu"


def backend_class(name: str) -> Type[Backend]:
    """A backend's class by name; importing it costs no runtime library."""
    if name not in BACKENDS:
        raise PtqError(f"unknown backend {name!r}: use one of {', '.join(BACKENDS)}")
    cls: Type[Backend] = importlib.import_module(BACKENDS[name]).BACKEND
    return cls


def options_class(name: str) -> Type[Any]:
    """The Options dataclass of a backend, by name."""
    return backend_class(name).Options


def int8_setting(backend: str, name: str) -> bool:
    """Whether option `name` of `backend` sets its own INT8 quantization (which another quantizer replaces)."""
    return any(f.name == name and f.metadata.get("quantizes") for f in dataclasses.fields(options_class(backend)))


def get_backend(name: str) -> Backend:
    """Instantiate a backend by name."""
    return backend_class(name)()
