"""TensorRT backend (Jetson Xavier/Orin, any NVIDIA GPU): ONNX -> serialized engine at fp32/fp16/int8.

Written against the tensor-name API that TensorRT 8.5 (JetPack 5), 8.6 and 10 (JetPack 6) share, and 11 (x86 pip):
8.5-10 build weakly typed (FP16/INT8 builder flags), 11 strongly typed (FP16 from an FP16 ONNX, INT8 from Q/DQ).
INT8 comes two ways: `implicit` (a TensorRT entropy/minmax calibrator fed at its own fixed-shape calibration
profile, with a calibration cache; the TensorRT 8.x way, deprecated in 10.1, gone in 11) and `explicit` (an engine
built from a QDQ ONNX made for TensorRT and checked against its Q/DQ rules). `auto` picks by the installed version.
Device memory, page-locked host buffers, streams and events come from ptq.backends.cuda (pycuda or cuda-python).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Tuple

import numpy as np

from ptq.backends import Backend, Compressed, CompressJob, Session
from ptq.options import option
from ptq.backends.cuda import Cuda, open_cuda
from ptq.data import cache_dir
from ptq.errors import PtqError

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "backend=tensorrt needs TensorRT's Python package: on Jetson it ships with JetPack "
    "(apt install python3-libnvinfer; use a venv with --system-site-packages), on an x86 NVIDIA GPU "
    "pip install tensorrt; plus pycuda or cuda-python"
)


try:  # type-checked against tensorrt-stubs; imported for real on a machine with TensorRT
    import tensorrt as trt
except ImportError:
    trt = None  # type: ignore[assignment]


def require_tensorrt() -> None:
    """Fail with a one-line PtqError saying what to install unless the real TensorRT is importable
    (the type stubs alone install an empty `tensorrt` namespace package)."""
    if trt is None or not hasattr(trt, "Builder"):
        raise PtqError(INSTALL_HINT)


def major_version(version: str) -> int:
    """8 for '8.5.2.2', 10 for '10.3.0'."""
    return int(version.split(".", 1)[0])


def check_version(version: str) -> None:
    """Refuse a TensorRT this backend was not written for: the tensor-name API came in 8.5 (JetPack 5); 8.5-10
    (JetPack 5 and 6) build weakly typed, 11 strongly typed; 12 is unknown. `ptq doctor` applies the same check."""
    major, minor = (int(v) for v in version.split(".")[:2])
    if not (8, 5) <= (major, minor) < (12, 0):
        raise PtqError(
            f"TensorRT {version} is not supported by backend=tensorrt: it needs TensorRT 8.5 to 11.x "
            "(JetPack 5 or 6, or pip install 'tensorrt<12' on an x86 GPU)"
        )


def resolve_int8_mode(mode: str, trt_version: str) -> str:
    """`auto` means implicit calibration before TensorRT 10 and explicit QDQ from 10 on."""
    if mode != "auto":
        return mode
    return "explicit" if major_version(trt_version) >= 10 else "implicit"


@dataclass(frozen=True)
class Capabilities:
    """What this GPU and TensorRT can do, as the builder reports it."""

    fast_fp16: bool
    fast_int8: bool
    dla_cores: int


INT8_MODES = ("auto", "implicit", "explicit")


@dataclass(frozen=True)
class TensorRTOptions:
    """Builder settings, as `trtexec` users know them, and INT8 calibration: the tensorrt backend's options."""

    workspace_mb: int = option(1024, "TensorRT builder workspace limit (MiB)")
    int8_mode: str = option("auto", "TensorRT INT8: auto, implicit (calibrator) or explicit (QDQ)", quantizes=True)
    dla_core: int = option(-1, "Jetson DLA core for TensorRT (GPU fallback); -1 = GPU")
    timing_cache: Optional[Path] = option(None, "TensorRT timing cache file to reuse (default under $PTQ_CACHE_DIR)")
    calib_method: str = option("minmax", "minmax, entropy or percentile (percentile: explicit INT8 only)", quantizes=True)
    keep_float: Tuple[str, ...] = option((), "ONNX node names kept in fp16 in an INT8 engine, comma-separated (mixed precision)", quantizes=True)
    calib_batch: int = option(8, "", user=False, quantizes=True)

    def validate(self) -> None:
        """Refuse impossible settings before any work is done."""
        if self.workspace_mb <= 0:
            raise PtqError(f"workspace_mb={self.workspace_mb} must be positive")
        if self.int8_mode not in INT8_MODES:
            raise PtqError(f"unknown int8_mode {self.int8_mode!r}: use one of {', '.join(INT8_MODES)}")
        if self.dla_core < -1:
            raise PtqError(f"dla_core={self.dla_core} must be -1 (GPU) or a DLA core index")
        if self.calib_method not in ("minmax", "entropy", "percentile"):
            raise PtqError(f"unknown calib_method {self.calib_method!r}: use minmax, entropy or percentile")
        if len(self.keep_float) == 1 and self.keep_float[0].isdigit():
            raise PtqError("backend=tensorrt keeps named nodes in float: give their ONNX names (`ptq sensitivity` ranks them), not a count")


def check_capabilities(precision: str, options: TensorRTOptions, caps: Capabilities) -> None:
    """Refuse a precision or DLA core the device lacks, before any work."""
    if precision == "int8" and not caps.fast_int8:
        raise PtqError("this GPU has no fast INT8 in TensorRT: use precision=fp16, or backend=ort for CPU INT8")
    if precision == "fp16" and not caps.fast_fp16:
        raise PtqError("this GPU has no fast FP16 in TensorRT: use precision=fp32 or int8")
    if options.dla_core >= caps.dla_cores:
        raise PtqError(f"dla_core={options.dla_core} but this device has {caps.dla_cores} DLA cores: use -1 for the GPU")


def numerics(precision: str, int8_mode: str, dla_core: int, typed: bool = False) -> str:
    """What an engine really computes in: TF32 is cleared for every build (on by default from Ampere, so on
    Orin), fp16 and int8 engines let TensorRT keep fp32 layers, and int8 engines also allow fp16 layers; strongly
    typed (TensorRT 11), the ONNX's types decide."""
    if typed:
        return {
            "fp32": "fp32 (strongly typed, TF32 off)",
            "fp16": "fp16 from the ONNX's float16 types, float32 I/O (strongly typed, TF32 off)",
            "int8": "int8 where the ONNX has Q/DQ, float elsewhere (strongly typed, TF32 off)",
        }[precision]
    text = {
        "fp32": "fp32 (TF32 off)",
        "fp16": "fp16 with fp32 fallback (TF32 off)",
        "int8": f"int8 with fp16 fallback ({int8_mode} quantization, TF32 off)",
    }[precision]
    return text + (f" on DLA core {dla_core} with GPU fallback" if dla_core >= 0 else "")


def kept_note(options: TensorRTOptions) -> str:
    """What numerics() adds for nodes kept in float (fp16 in an INT8 engine)."""
    return f"; {len(options.keep_float)} nodes kept in fp16" if options.keep_float else ""


class CalibrationFeed:
    """Re-chunks calibration batches to the fixed batch size a TensorRT calibrator must report, and keeps
    the calibration cache file, so a later build of the same model reuses the scales without recalibrating."""

    def __init__(self, batches: Iterator[np.ndarray], batch_size: int, cache: Path) -> None:
        self.batches, self.batch_size, self.cache = batches, batch_size, cache
        self.pending: list[np.ndarray] = []
        self.fed = self.dropped = 0
        self.first: float | None = None
        self.last: float | None = None

    def next_batch(self) -> np.ndarray | None:
        """The next contiguous float32 batch of exactly `batch_size` images, or None when done."""
        if self.first is None:
            self.first = time.perf_counter()
        while sum(len(b) for b in self.pending) < self.batch_size:
            b = next(self.batches, None)
            if b is None:
                self.dropped = sum(len(p) for p in self.pending)
                self.last = time.perf_counter()
                return None
            self.pending.append(b)
        joined = np.concatenate(self.pending)
        out, rest = joined[: self.batch_size], joined[self.batch_size :]
        self.pending = [rest] if len(rest) else []
        self.fed += len(out)
        return np.ascontiguousarray(out, dtype=np.float32)

    def read_cache(self) -> bytes | None:
        """Cached scales from an earlier calibration, if any."""
        return self.cache.read_bytes() if self.cache.is_file() else None

    def write_cache(self, data: Any) -> None:
        """Keep TensorRT's scales (an artifact of the run)."""
        self.cache.write_bytes(bytes(data))

    def seconds(self) -> float:
        """Time from the first request of a batch to the end of the data."""
        return (self.last or time.perf_counter()) - self.first if self.first is not None else 0.0


class Calibrator:
    """What `make_calibrator` returns: the TensorRT calibrator, the exception its `get_batch` caught (TensorRT's
    trampoline would swallow it), and the device buffer to free after the build."""

    def __init__(self, trt_calibrator: Any, cuda: Cuda) -> None:
        self.trt, self.cuda = trt_calibrator, cuda
        self.error: BaseException | None = None

    def close(self) -> None:
        """Free the batch buffer; re-raise what get_batch caught, so a loader error or Ctrl-C ends the run."""
        self.cuda.close()
        if self.error is not None:
            raise self.error


def make_calibrator(method: str, feed: CalibrationFeed, cuda: Cuda, shape: tuple[int, ...]) -> Calibrator:
    """A TensorRT INT8 calibrator (entropy or minmax) that copies the feed's batches, each exactly `shape` (the
    calibration profile's OPT shape: TensorRT reads that many values at each pointer and ignores get_batch_size on
    explicit-batch networks, NvInfer.h setCalibrationProfile), to one device buffer of that size."""
    bases = {"entropy": trt.IInt8EntropyCalibrator2, "minmax": trt.IInt8MinMaxCalibrator}
    if method not in bases:
        raise PtqError(f"TensorRT implicit INT8 calibrates with entropy or minmax, not {method!r}: set calib_method")
    buffer = cuda.alloc(int(np.prod(shape)) * 4)
    staging = cuda.host(shape)  # async copies read page-locked memory (CUDA runtime API cudaMemcpyAsync; pycuda docs memcpy_htod_async)

    class TrtCalibrator(bases[method]):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()

        def get_batch_size(self) -> int:
            return shape[0]

        def get_batch(self, names: list[str]) -> list[int] | None:
            # TensorRT's trampoline prints and drops any exception raised here (python/src/infer/pyInt8.cpp,
            # getBatch, 8.5.2+): keep it, end calibration, and re-raise it once the build returns
            if holder.error is not None:
                return None
            try:
                batch = feed.next_batch()
                if batch is None:
                    return None
                if batch.shape != shape:
                    raise PtqError(f"calibration batch of shape {batch.shape}, but the calibration profile is {shape}")
                staging[...] = batch
                cuda.to_device(buffer, staging)
                cuda.synchronize()
                return [buffer for _ in names]  # one int per name: pyInt8.cpp getBatch casts to vector<size_t>, copies nbBindings
            except BaseException as exc:  # KeyboardInterrupt and a sweep's SIGTERM too
                holder.error = exc
                return None

        def read_calibration_cache(self) -> bytes | None:
            return feed.read_cache()

        def write_calibration_cache(self, cache: Any) -> None:
            feed.write_cache(cache)

    holder = Calibrator(None, cuda)
    holder.trt = TrtCalibrator()
    return holder


def keep_layers_in_fp16(network: trt.INetworkDefinition, names: tuple[str, ...]) -> None:
    """Constrain the layers the ONNX parser named after `names` (ONNX node names) to fp16; refuse names it has not."""
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    missing = set(names) - {layer.name for layer in layers}
    if missing:
        raise PtqError(f"keep_float names nodes TensorRT's network does not have: {', '.join(sorted(missing)[:5])}: use ONNX node names from `ptq sensitivity`")
    for layer in layers:
        if layer.name in names:
            layer.precision = trt.float16
            layer.set_output_type(0, trt.float16)


def dims(d: trt.Dims) -> tuple[int, ...]:
    """A TensorRT Dims as a plain tuple."""
    return tuple(int(d[i]) for i in range(len(d)))


def engine_metadata(gpu: str, precision: str, onnx_path: Path) -> dict[str, str]:
    """What an engine is tied to: the TensorRT version and the GPU, plus what it was built from."""
    return {
        "tensorrt": str(trt.__version__),
        "gpu": gpu,
        "precision": precision,
        "onnx_sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
    }


def engine_mismatch(stored: dict[str, str], current: dict[str, str]) -> str | None:
    """Why a stored engine cannot run here (another TensorRT version or GPU), or None if it can."""
    for key in ("tensorrt", "gpu"):
        if stored.get(key) != current.get(key):
            return f"engine was built for {key} {stored.get(key)!r}, this machine has {current.get(key)!r}"
    return None


class TrtSession(Session):
    """An execution context with page-locked host and device buffers for its profile's largest batch. `run` waits
    for the GPU; a batch outside the profile (a DLA engine's fixed batch) runs in padded chunks. CUDA events around
    each enqueue give the GPU compute time, as trtexec reports it beside end-to-end latency."""

    def __init__(self, engine: trt.ICudaEngine, cuda: Cuda) -> None:
        self.engine, self.cuda, self.closed = engine, cuda, False
        try:
            self._setup(engine, cuda)
        except BaseException:
            self.close()  # a refused engine frees what it took
            raise

    def _setup(self, engine: trt.ICudaEngine, cuda: Cuda) -> None:
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        # the host buffers are float32 (an FP16-I/O ONNX would be read as garbage); trt.float32 is DataType.FLOAT
        # (NVIDIA/TensorRT 8.5.2 python/src/infer/pyFoundationalTypes.cpp; pyCore.cpp ICudaEngine get_tensor_dtype)
        for name in (self.input, self.output):
            if engine.get_tensor_dtype(name) != trt.float32:
                raise PtqError(f"TensorRT engine tensor {name!r} is {engine.get_tensor_dtype(name)}, backend=tensorrt feeds and reads float32: keep the ONNX's inputs and outputs float32")
        low, _, high = (dims(d) for d in engine.get_tensor_profile_shape(self.input, 0))
        self.min_batch, self.max_batch, self.sample = low[0], high[0], high[1:]
        classes = dims(engine.get_tensor_shape(self.output))[-1]
        self.in_host = cuda.host((self.max_batch, *self.sample))
        self.out_host = cuda.host((self.max_batch, classes))
        self.d_in = cuda.alloc(self.in_host.nbytes)
        self.d_out = cuda.alloc(self.out_host.nbytes)
        for name, ptr in ((self.input, self.d_in), (self.output, self.d_out)):
            # false if the name is no I/O tensor (NvInferRuntime.h 8.5.2 IExecutionContext::setTensorAddress)
            if not self.context.set_tensor_address(name, ptr):
                raise RuntimeError(f"TensorRT refused the device address of tensor {name!r}")
        self.start, self.end = cuda.event(), cuda.event()
        self.gpu_times: list[float] = []

    def run(self, batch: np.ndarray) -> np.ndarray:
        if self.min_batch <= len(batch) <= self.max_batch:
            return self._run(batch)
        return np.concatenate([self._run(batch[i : i + self.max_batch]) for i in range(0, len(batch), self.max_batch)])

    def _run(self, batch: np.ndarray) -> np.ndarray:
        n = len(batch)
        rows = max(n, self.min_batch)  # padded up to a fixed-shape profile's batch
        host = self.in_host[:rows]
        host[:n] = batch
        host[n:] = 0.0
        if not self.context.set_input_shape(self.input, (rows, *self.sample)):
            raise RuntimeError(f"TensorRT refused input shape {(rows, *self.sample)}")
        self.cuda.to_device(self.d_in, host)
        self.cuda.record(self.start)
        if not self.context.execute_async_v3(self.cuda.handle):
            raise RuntimeError("TensorRT execution failed")
        self.cuda.record(self.end)
        out = self.out_host[:rows]
        self.cuda.to_host(out, self.d_out)
        self.cuda.synchronize()
        self.gpu_times.append(self.cuda.elapsed_ms(self.start, self.end))
        return out[:n].copy()

    def gpu_ms(self) -> list[float] | None:
        """GPU compute time (ms, CUDA events around the enqueue, copies excluded) of each `run` since the last call."""
        times, self.gpu_times = self.gpu_times, []
        return times

    def close(self) -> None:
        """Free the device and page-locked memory and drop the context (before the engine, as TensorRT requires)."""
        if not self.closed:
            self.closed = True
            self.__dict__.pop("context", None)
            self.cuda.close()

    def __del__(self) -> None:
        self.close()


FOREIGN_NODE = re.compile(r"^\{ForeignNode\[(.*)\]\}$")
DLA_TRANSFER = re.compile(r" (to|from) nvm$| copy finish$")
PWN_OPS = re.compile(r"/([A-Za-z]+)(?:_\d+)?(?=[,)]|$)")


def op_name(node: str) -> str:
    """The op of an ONNX node name as the parser names layers: '/a/b/Conv' -> 'Conv', 'Conv_19' -> 'Conv'."""
    last = node.strip().rsplit("/", 1)[-1]
    return re.sub(r"_\d+$", "", last) if re.match(r"^[A-Za-z]+(_\d+)?$", last) else ""


def layer_type(name: str) -> str:
    """A TensorRT layer's op family for the profile, from its name. Real names (NVIDIA/TensorRT issues #2136,
    #3679, #4020, #3143; pytorch#66683): reformat copies TensorRT inserts ('Reformatting CopyNode for Input Tensor 0
    to /m/Conv') are 'Reformat'; fused pointwise kernels ('PWN(PWN(/a/Sigmoid), /a/Mul)') are 'Pointwise' with their
    ops; '{ForeignNode[...]}' is a Myelin graph (on a DLA build, a DLA subgraph); DLA's copies ('x to nvm', 'x from
    nvm', 'x copy finish') are 'DLA transfer'; a fusion '/a/Conv + /a/Relu' is its first op."""
    if name.startswith("Reformatting CopyNode"):
        return "Reformat"
    if FOREIGN_NODE.match(name):
        return "Myelin"
    if DLA_TRANSFER.search(name):
        return "DLA transfer"
    if name.startswith("PWN("):
        ops = [op for op in PWN_OPS.findall(name) if op != "Constant"]
        return f"Pointwise({'+'.join(dict.fromkeys(ops))})" if ops else "Pointwise"
    return op_name(name.split(" + ")[0]) or "layer"


def layer_profile(reports: list[tuple[str, float]], queries: int, run_ms: float) -> Any:
    """TensorRT's IProfiler reports (layer name, ms) over `queries` runs taking `run_ms` in all, as a
    `ptq.profile.OpProfile`: mean µs per query per layer, op families from `layer_type`."""
    from ptq.profile import NodeTime, OpProfile

    total: dict[str, float] = {}
    for name, ms in reports:
        total[name] = total.get(name, 0.0) + ms
    nodes = [NodeTime(name, layer_type(name), 1000.0 * ms / queries, "TensorRT") for name, ms in total.items()]
    return OpProfile(nodes, queries, 1000.0 * run_ms / queries, notes=["TensorRT IProfiler; op families from TensorRT's layer names"])


def placement(info: str, dla: bool) -> tuple[int, int]:
    """(DLA subgraphs, GPU layers) in the engine inspector's JSON (`{"Layers": [...]}`, a dict per layer at
    ProfilingVerbosity.DETAILED, a name otherwise; NVIDIA/TensorRT v10.3.0 tools/experimental/trt-engine-explorer,
    trex/parser.py read_graph_file): on a DLA build a '{ForeignNode[...]}' or a layer whose type names DLA runs on the
    DLA (TensorRT#3143), except a Myelin graph (LayerType 'Myelin', trex/colors.py layer_colormap), which runs on the
    GPU; the 'to/from nvm' copies count for neither."""
    on_dla = on_gpu = 0
    for layer in json.loads(info).get("Layers", []):
        name = layer if isinstance(layer, str) else str(layer.get("Name", ""))
        kind = "" if isinstance(layer, str) else str(layer.get("LayerType", ""))
        if dla and DLA_TRANSFER.search(name):
            continue
        if dla and ("DLA" in kind.upper() or (FOREIGN_NODE.match(name) and kind != "Myelin")):
            on_dla += 1
        else:
            on_gpu += 1
    return on_dla, on_gpu


def dla_note(core: int, on_dla: int, on_gpu: int) -> str:
    """What numerics() adds for a DLA build: where its layers ran, or that every one fell back."""
    if on_dla == 0:
        return f" on the GPU: every layer fell back from DLA core {core}"
    return f" on DLA core {core}: {on_dla} DLA subgraphs, {on_gpu} GPU layers"


def timing_cache_path(options: TensorRTOptions, gpu: str) -> Path:
    """The timing cache file: the user's, or one per TensorRT version and GPU (a cache holds one GPU's timings)."""
    if options.timing_cache is not None:
        return options.timing_cache
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", gpu).strip("-") or "gpu"
    return cache_dir() / "tensorrt" / f"timing-{trt.__version__}-{slug}.cache"


def attach_timing_cache(config: trt.IBuilderConfig, path: Path) -> None:
    """Reuse the timing cache at `path`; a corrupt or foreign one (another GPU: set_timing_cache returns false,
    NvInfer.h 8.5.2 IBuilderConfig::setTimingCache) is ignored with a warning and the build starts a fresh one."""
    data = b""
    try:
        data = path.read_bytes() if path.is_file() else b""
    except OSError as exc:
        log.warning("TensorRT timing cache %s unreadable (%s): building without it", path, exc)
    if data:
        cache: Any = None
        try:
            cache = config.create_timing_cache(data)
        except Exception as exc:  # TensorRT raises or returns None for a truncated file
            log.warning("TensorRT timing cache %s is corrupt (%s): ignored", path, str(exc)[:100])
        if cache is None:
            log.warning("TensorRT timing cache %s could not be read: ignored, a fresh one is built", path)
        elif config.set_timing_cache(cache, False):
            return
        else:
            log.warning("TensorRT timing cache %s is from another GPU or TensorRT: ignored, a fresh one is built", path)
    fresh = config.create_timing_cache(b"")
    if fresh is None or not config.set_timing_cache(fresh, False):
        log.warning("TensorRT refused an empty timing cache: building without one")


def save_timing_cache(config: trt.IBuilderConfig, path: Path) -> None:
    """Write the build's timing cache atomically (a temp file, then os.replace); never fail a good build over it."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        cache = config.get_timing_cache()
        if cache is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(bytes(cache.serialize()))
        os.replace(tmp, path)
    except Exception as exc:
        log.warning("TensorRT timing cache not saved to %s: %s", path, str(exc)[:200])
        tmp.unlink(missing_ok=True)


def strongly_typed() -> bool:
    """TensorRT 11 removed weak typing (no FP16/INT8 builder flags, no calibrators): the ONNX's types decide."""
    return not hasattr(trt.BuilderFlag, "FP16")


def network_flags() -> int:
    """create_network's flags: explicit batch before TensorRT 10 (always on from 10), strongly typed without the
    FP16/INT8 flags (TensorRT 11)."""
    if strongly_typed():
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0 if major_version(str(trt.__version__)) >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)


def check_dla(precision: str, options: TensorRTOptions, reference: bool) -> TensorRTOptions:
    """DLA runs FP16 and INT8 only (trtexec forces FP16 under --useDLACore, samples/common/sampleEngines.cpp):
    refuse fp32 on a DLA core, except a DLA run's FP32 reference, which is built on the GPU (the options returned)."""
    if precision != "fp32" or options.dla_core < 0:
        return options
    if not reference:
        raise PtqError(f"dla_core={options.dla_core}: DLA runs fp16 and int8 only: use precision=fp16 or int8, or dla_core=-1 for an fp32 engine on the GPU")
    return replace(options, dla_core=-1)


class TensorRTBackend(Backend):
    name = "tensorrt"
    qdq_target = "tensorrt"  # a quantizer's Q/DQ must pass TensorRT's rules (ptq.quantizers.qdq_rules)
    profiles = True
    PROFILE_QUERIES = 100
    Options = TensorRTOptions

    def __init__(self) -> None:
        self.logger: trt.ILogger | None = None
        self.built: dict[Path, trt.ICudaEngine] = {}  # engines built and inspected, handed to open() once
        self.sessions: weakref.WeakValueDictionary[Path, TrtSession] = weakref.WeakValueDictionary()

    def new_cuda(self) -> Cuda:
        """A stream and the allocations of one owner (a session, a calibrator)."""
        return open_cuda(INSTALL_HINT)

    def _logger(self) -> trt.ILogger:
        require_tensorrt()
        if self.logger is None:
            self.logger = trt.Logger(trt.Logger.WARNING)
        return self.logger

    def capabilities(self) -> Capabilities:
        """The builder's answer; TensorRT 11 has no platform_has_fast_* (its types come from the ONNX)."""
        builder = trt.Builder(self._logger())
        return Capabilities(bool(getattr(builder, "platform_has_fast_fp16", True)), bool(getattr(builder, "platform_has_fast_int8", True)), int(builder.num_DLA_cores))

    def check(self, precision: str, onnx_only: bool = False) -> None:
        super().check(precision, onnx_only)
        require_tensorrt()
        check_version(str(trt.__version__))
        self.new_cuda().close()  # fails early with the install hint
        check_capabilities(precision, TensorRTOptions(), self.capabilities())

    def compress(self, job: CompressJob) -> Compressed:
        reference = job.reference and job.precision == "fp32"
        opts: TensorRTOptions = check_dla(job.precision, job.options, reference)
        check_capabilities(job.precision, opts, self.capabilities())
        typed = strongly_typed()
        mode = resolve_int8_mode(opts.int8_mode, str(trt.__version__)) if job.precision == "int8" else ""
        if mode == "implicit" and typed:
            raise PtqError(f"TensorRT {trt.__version__} has no INT8 calibrators (strongly typed only): use int8_mode=explicit or auto")
        artifacts: list[Path] = []
        tags: dict[str, str] = {}
        metrics: dict[str, float] = {}
        source, feed = job.fp32_onnx, None
        if job.precision == "int8" and job.qdq_onnx is not None:  # made beforehand by `ptq quantize`: no calibration
            from ptq.quantizers import qdq_rules

            qdq_rules.require(job.qdq_onnx)
            source, mode = job.qdq_onnx, "explicit"
            tags["tensorrt.int8_source"] = f"{job.qdq_onnx.name}, made beforehand (not calibrated again)"
        elif mode == "explicit":
            from ptq.quantizers import for_tensorrt, qdq_rules

            source, ranges = job.workdir / "model_int8_qdq.onnx", job.workdir / "calibration_ranges.json"
            batches = job.calib_batches(opts.calib_batch)
            tags["tensorrt.qdq"] = for_tensorrt.quantize(job.fp32_onnx, source, batches, opts.calib_method, opts.keep_float, job.phases, ranges)
            qdq_rules.require(source)
            artifacts += [source, ranges]
        elif mode == "implicit":
            feed = self.calibration_feed(job, opts)
        elif job.precision == "fp16" and typed:  # strongly typed: FP16 comes from an FP16 ONNX (float32 I/O kept)
            from ptq.quantizers import ort as quantize

            source = quantize.to_fp16(job.fp32_onnx, job.workdir / "model_fp16.onnx")
        with job.phases("build"):
            engine_path = self.build(source, job.precision, opts, job.batch_sizes, job.workdir, feed)
        if feed is not None:  # TensorRT calibrated inside the build: book that time as calibration
            job.phases.carve("build", "calibrate", feed.seconds())
            artifacts.append(feed.cache)
            tags["tensorrt.calibration"] = calibration_summary(feed)
            metrics.update({"calibrate/images": float(feed.fed), "calibrate/dropped_images": float(feed.dropped)})
            (log.warning if feed.dropped else log.info)("TensorRT calibration: %s", tags["tensorrt.calibration"])
        artifacts.append(engine_path.with_suffix(".json"))
        meta = json.loads(engine_path.with_suffix(".json").read_text())
        text = numerics(job.precision, mode, -1, typed) + kept_note(opts)
        if opts.dla_core >= 0:
            on_dla, on_gpu = meta["dla_subgraphs"], meta["gpu_layers"]
            tags.update({"tensorrt.dla_core": str(opts.dla_core), "tensorrt.dla_subgraphs": str(on_dla), "tensorrt.gpu_layers": str(on_gpu)})
            if on_dla == 0:
                tags["tensorrt.dla_fallback"] = f"all {on_gpu} layers fell back to the GPU"
                log.warning("dla_core=%d: every one of the %d layers fell back to the GPU: this run measures the GPU", opts.dla_core, on_gpu)
            text += dla_note(opts.dla_core, on_dla, on_gpu)
        elif reference and job.options.dla_core >= 0:
            text += " on the GPU (the FP32 reference of a DLA run: DLA runs fp16/int8 only)"
        return Compressed(engine_path, artifacts, handle=(source, job.precision, opts, job.batch_sizes, job.workdir), numerics=text, tags=tags, metrics=metrics)

    def calibration_feed(self, job: CompressJob, opts: TensorRTOptions) -> CalibrationFeed:
        """The implicit calibrator's feed: its batch is the first batch the data gives (the pipeline's batches all
        have one size, which divides the calibration images), at most calib_batch, so every image is used and a
        calib_size below calib_batch still calibrates; no images at all is refused before the build."""
        batches = job.calib_batches(opts.calib_batch)
        first = next(batches, None)
        if first is None or len(first) == 0:
            raise PtqError("TensorRT implicit INT8 got no calibration images: set calib_size (and data) so that some are readable")
        return CalibrationFeed(itertools.chain([first], batches), min(len(first), opts.calib_batch), job.workdir / "calibration.cache")

    def build(
        self, onnx_path: Path, precision: str, options: TensorRTOptions, batch_sizes: tuple[int, int], workdir: Path, feed: CalibrationFeed | None
    ) -> Path:
        """Parse the ONNX file and serialize an engine (plus its metadata JSON, with its layer placement) into `workdir`."""
        logger = self._logger()
        builder = trt.Builder(logger)
        network = builder.create_network(network_flags())
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
            raise PtqError(f"TensorRT could not parse {onnx_path.name}: {errors[:300]}")
        inp = network.get_input(0)
        sample = dims(inp.shape)[1:]
        if any(d < 0 for d in sample):
            raise PtqError(f"{onnx_path.name} has a symbolic input size {tuple(dims(inp.shape))}: TensorRT's profile needs fixed C, H, W; export the ONNX with a fixed input size")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # real layer names and the inspector's placement
        dla = options.dla_core >= 0
        low, opt, high = (batch_sizes[0],) * 3 if dla else (1, batch_sizes[0], batch_sizes[1])  # DLA: fixed shapes only
        profile = builder.create_optimization_profile()
        profile.set_shape(inp.name, trt.Dims([low, *sample]), trt.Dims([opt, *sample]), trt.Dims([high, *sample]))
        config.add_optimization_profile(profile)
        config.clear_flag(trt.BuilderFlag.TF32)  # see numerics()
        calibrator = None
        if not strongly_typed():
            if precision in ("fp16", "int8"):
                config.set_flag(getattr(trt.BuilderFlag, "FP16"))  # int8 engines fall back to fp16 where a layer has no int8 kernel
            if precision == "int8":
                config.set_flag(getattr(trt.BuilderFlag, "INT8"))
            if precision == "int8" and feed is not None:
                if options.keep_float:  # implicit INT8: the named layers are constrained to fp16
                    keep_layers_in_fp16(network, options.keep_float)
                    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
                shape = (feed.batch_size, *sample)  # its own profile, min = opt = max: TensorRT calibrates at OPT only
                calib_profile = builder.create_optimization_profile()
                calib_profile.set_shape(inp.name, trt.Dims(list(shape)), trt.Dims(list(shape)), trt.Dims(list(shape)))
                method = "entropy" if dla else options.calib_method  # "the required calibrator for DLA" (NvInfer.h 8.5.2 IInt8EntropyCalibrator2)
                if method != options.calib_method:
                    log.warning("dla_core=%d: calibrating with entropy, not %s: TensorRT requires the entropy calibrator for DLA", options.dla_core, options.calib_method)
                calibrator = make_calibrator(method, feed, self.new_cuda(), shape)
                config.int8_calibrator = calibrator.trt
                if not config.set_calibration_profile(calib_profile):
                    calibrator.close()
                    raise PtqError(f"TensorRT refused the calibration profile {shape}")
        if dla:
            config.default_device_type = trt.DeviceType.DLA
            config.DLA_core = options.dla_core
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
        cache_file = timing_cache_path(options, self.device())
        attach_timing_cache(config, cache_file)
        try:
            serialized = builder.build_serialized_network(network, config)
        finally:
            if calibrator is not None:
                calibrator.close()  # re-raises what get_batch caught
        if serialized is None:
            raise PtqError(f"TensorRT failed to build a {precision} engine from {onnx_path.name}: see TensorRT's log above")
        save_timing_cache(config, cache_file)
        engine_path = workdir / f"model_{precision}.engine"
        engine_path.write_bytes(bytes(serialized))
        del serialized
        engine = self.deserialize(engine_path, options.dla_core)
        info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
        on_dla, on_gpu = placement(str(info), dla)
        self.built[engine_path] = engine  # open() takes it: no second deserialization
        meta = {**engine_metadata(self.device(), precision, onnx_path), "dla_core": options.dla_core, "dla_subgraphs": on_dla, "gpu_layers": on_gpu}
        engine_path.with_suffix(".json").write_text(json.dumps(meta, indent=1))
        return engine_path

    def deserialize(self, path: Path, dla_core: int) -> trt.ICudaEngine:
        """Load an engine, on its DLA core (set on the runtime before deserializing, as trtexec does)."""
        runtime = trt.Runtime(self._logger())
        if dla_core >= 0:
            runtime.DLA_core = dla_core
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise PtqError(f"TensorRT could not load {path.name}: rebuild it with this TensorRT version")
        return engine

    def open(self, model: Compressed, threads: int) -> Session:
        meta_path = model.path.with_suffix(".json")
        stored = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        why = engine_mismatch(stored, {"tensorrt": str(trt.__version__), "gpu": self.device()})
        if why:
            if not isinstance(model.handle, tuple):
                raise PtqError(f"{model.path.name}: {why}; rebuild it on this machine from its ONNX file")
            log.warning("%s: %s; rebuilding", model.path.name, why)
            source, precision, options, batch_sizes, workdir = model.handle
            cache = workdir / "calibration.cache"  # implicit INT8 rebuilds from the scales it already has
            feed = CalibrationFeed(iter(()), 1, cache) if precision == "int8" and cache.is_file() else None
            model = replace(model, path=self.build(source, precision, options, batch_sizes, workdir, feed))
            stored = json.loads(model.path.with_suffix(".json").read_text())
        engine = self.built.pop(model.path, None)
        if engine is None:
            engine = self.deserialize(model.path, int(stored.get("dla_core", -1)))
        session = TrtSession(engine, self.new_cuda())
        self.sessions[model.path] = session
        return session

    def profile(self, model: Compressed, batch: np.ndarray, threads: int) -> Any:
        """Per-layer times from TensorRT's IProfiler over PROFILE_QUERIES queries after a warm-up, on the session
        already open for `model` (no second copy of the engine), each run's report collected once the stream is done."""
        session = self.sessions.get(model.path)
        opened = session is None
        if session is None:
            opened_session = self.open(model, threads)
            assert isinstance(opened_session, TrtSession)
            session = opened_session
        reports: list[tuple[str, float]] = []

        class Collector(trt.IProfiler):  # type: ignore[misc]
            def __init__(self) -> None:
                trt.IProfiler.__init__(self)

            def report_layer_time(self, layer_name: str, ms: float) -> None:
                reports.append((layer_name, ms))

        for _ in range(5):
            session.run(batch)
        session.context.profiler = Collector()
        session.context.enqueue_emits_profile = False
        started = time.perf_counter()
        for _ in range(self.PROFILE_QUERIES):
            session.run(batch)
            # false if no profiler is attached (NvInferRuntime.h 8.5.2 IExecutionContext::reportToProfiler)
            if not session.context.report_to_profiler():
                raise RuntimeError("TensorRT's report_to_profiler failed: no per-layer times")
        elapsed = time.perf_counter() - started
        session.gpu_ms()  # profiled runs are not latency samples
        if opened:
            session.close()
        return layer_profile(reports, self.PROFILE_QUERIES, 1000.0 * elapsed)

    def versions(self) -> dict[str, str]:
        require_tensorrt()
        return {"tensorrt": str(trt.__version__)}

    def device(self) -> str:
        from ptq.tracking import gpu_name  # here, not at import: ptq.tracking imports mlflow, and `ptq doctor`'s probe imports this module

        return gpu_name()


def calibration_summary(feed: CalibrationFeed) -> str:
    """How many images TensorRT calibrated on, in batches of what, and how many were dropped and why."""
    text = f"{feed.fed} images in {feed.fed // max(feed.batch_size, 1)} batches of {feed.batch_size} (the calibration profile's shape)"
    return text + (f"; {feed.dropped} dropped: they did not fill a batch of {feed.batch_size}" if feed.dropped else "")


BACKEND = TensorRTBackend
