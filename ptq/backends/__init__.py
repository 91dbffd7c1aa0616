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
from ptq.phases import Phases

if TYPE_CHECKING:
    from torch import nn

PRECISIONS = ("fp32", "fp16", "int8")
BACKENDS = {"ort": "ptq.backends.ort", "torch": "ptq.backends.torch", "tensorrt": "ptq.backends.tensorrt"}


def option(default: Any, help: str, user: bool = True) -> Any:
    """A backend option: its default and the help the CLI shows; `user=False`: set by ptq, logged for the record."""
    return field(default=default, metadata={"help": help, "user": user})


@dataclass(frozen=True)
class NoOptions:
    """A backend without options of its own."""

    def validate(self) -> None:
        """Nothing to check."""


def user_options(options: Type[Any]) -> list[dataclasses.Field]:  # type: ignore[type-arg]
    """The options of a backend's Options dataclass that users set (CLI flags, MLproject parameters)."""
    return [f for f in dataclasses.fields(options) if f.metadata.get("user", True)]


def parse_value(name: str, text: str, default: Any) -> Any:
    """A CLI/MLproject string as the type of the option's default (true/false, numbers, comma lists, paths)."""
    try:
        if isinstance(default, bool):
            value = text.strip().lower()
            if value not in ("true", "false", "yes", "no", "1", "0", "on", "off"):
                raise ValueError
            return value in ("true", "yes", "1", "on")
        if isinstance(default, int):
            return int(float(text))
        if isinstance(default, float):
            return float(text)
        if isinstance(default, tuple):
            return tuple(v.strip() for v in text.split(",") if v.strip())
        if default is None:
            return Path(text) if text else None
        return text
    except ValueError:
        kind = "true or false" if isinstance(default, bool) else "a whole number" if isinstance(default, int) else "a number"
        raise PtqError(f"{name}={text!r} is not {kind}: give a value like {format_value(default)!r}") from None


def format_value(value: Any) -> str:
    """An option value spelled as the CLI and MLflow params take it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return "" if value is None else str(value)


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

    @classmethod
    def options(cls, given: Mapping[str, str]) -> Any:
        """This backend's options from the values a user gave (strings; unset ones keep their defaults); one
        clear error for an option of another backend."""
        mine = {f.name: f for f in user_options(cls.Options)}
        for name in given:
            if name not in mine:
                owners = [b for b in BACKENDS if b != cls.name and name in {f.name for f in user_options(options_class(b))}]
                takes = ", ".join(mine) or "no options"
                raise PtqError(f"{name} is an option of backend {' or '.join(owners) or '?'}, not of {cls.name} (which takes {takes}): drop it or set backend")
        values = {k: parse_value(k, v, mine[k].default) for k, v in given.items()}
        opts = cls.Options(**values)
        opts.validate()
        return opts

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


def option_params(options: Any) -> dict[str, str]:
    """Every option of a backend (user-set or ptq-set) as MLflow params; unset ones (no path, no nodes) left out."""
    values = {f.name: format_value(getattr(options, f.name)) for f in dataclasses.fields(options)}
    return {k: v for k, v in values.items() if v != ""}


def get_backend(name: str) -> Backend:
    """Instantiate a backend by name."""
    return backend_class(name)()
