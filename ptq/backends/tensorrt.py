"""TensorRT backend (Jetson Xavier/Orin, any NVIDIA GPU): ONNX -> serialized engine at fp32/fp16/int8.

Written against the tensor-name API that TensorRT 8.5 (JetPack 5), 8.6 and 10 (JetPack 6) share.
INT8 comes two ways: `implicit` (a TensorRT entropy/minmax calibrator fed from the calibration images,
with a calibration cache; the TensorRT 8.x way, deprecated in 10.1) and `explicit` (an engine built
from ptq's symmetric QDQ ONNX, the way TensorRT 10 recommends). `auto` picks by the installed version.
Device memory and streams come from pycuda, or cuda-python where pycuda is absent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Tuple

import numpy as np

from ptq.backends import Backend, Compressed, CompressJob, Session, option
from ptq.data import cache_dir
from ptq.errors import PtqError
from ptq.tracking import gpu_name

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
    """Refuse a TensorRT this backend was not written for: the tensor-name API came in 8.5 (JetPack 5),
    and 11 removed the FP16/INT8 builder flags and calibrators that 8.5-10 (JetPack 6) share."""
    major, minor = (int(v) for v in version.split(".")[:2])
    if not (8, 5) <= (major, minor) < (11, 0):
        raise PtqError(
            f"TensorRT {version} is not supported by backend=tensorrt: it needs TensorRT 8.5 to 10.x "
            "(JetPack 5 or 6; TensorRT 11 removed the FP16/INT8 builder flags and calibrators it uses)"
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
    int8_mode: str = option("auto", "TensorRT INT8: auto, implicit (calibrator) or explicit (QDQ)")
    dla_core: int = option(-1, "Jetson DLA core for TensorRT (GPU fallback); -1 = GPU")
    timing_cache: Optional[Path] = option(None, "TensorRT timing cache file to reuse (default under $PTQ_CACHE_DIR)")
    calib_method: str = option("minmax", "minmax, entropy or percentile (percentile: explicit INT8 only)")
    keep_float: Tuple[str, ...] = option((), "ONNX node names kept in fp16 in an INT8 engine, comma-separated (mixed precision)")
    calib_batch: int = option(8, "", user=False)

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


def numerics(precision: str, int8_mode: str, dla_core: int) -> str:
    """What an engine really computes in: TF32 is cleared for every build (on by default from Ampere, so on
    Orin), fp16 and int8 engines let TensorRT keep fp32 layers, and int8 engines also allow fp16 layers."""
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


class Cuda:
    """Device buffers, a stream and copies, through pycuda or cuda-python, whichever is installed."""

    def __init__(self) -> None:
        try:
            import pycuda.autoinit  # noqa: F401  (creates the context)
            import pycuda.driver as cuda

            self.pycuda: Any = cuda
            self.stream: Any = cuda.Stream()
            self.handle = int(self.stream.handle)
        except ImportError:
            try:
                from cuda.bindings import runtime as cudart
            except ImportError:
                try:
                    from cuda import cudart  # cuda-python < 12.6
                except ImportError:
                    raise PtqError(INSTALL_HINT) from None
            self.pycuda = None
            self.cudart: Any = cudart
            self.stream = self._ok(cudart.cudaStreamCreate())
            self.handle = int(self.stream)

    @staticmethod
    def _ok(result: Any) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise RuntimeError(f"CUDA error {err}")
        return rest[0] if rest else None

    def alloc(self, nbytes: int) -> int:
        """A device allocation's address."""
        if self.pycuda:
            mem = self.pycuda.mem_alloc(nbytes)
            self._keep = [*getattr(self, "_keep", []), mem]
            return int(mem)
        return int(self._ok(self.cudart.cudaMalloc(nbytes)))

    def to_device(self, dst: int, src: np.ndarray) -> None:
        if self.pycuda:
            self.pycuda.memcpy_htod_async(dst, src, self.stream)
        else:
            kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            self._ok(self.cudart.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, kind, self.stream))

    def to_host(self, dst: np.ndarray, src: int) -> None:
        if self.pycuda:
            self.pycuda.memcpy_dtoh_async(dst, src, self.stream)
        else:
            kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            self._ok(self.cudart.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, kind, self.stream))

    def synchronize(self) -> None:
        """Wait until every queued copy and kernel has finished."""
        if self.pycuda:
            self.stream.synchronize()
        else:
            self._ok(self.cudart.cudaStreamSynchronize(self.stream))


def make_calibrator(method: str, feed: CalibrationFeed, cuda: Cuda, shape: tuple[int, ...]) -> Any:
    """A TensorRT INT8 calibrator (entropy or minmax) that copies the feed's batches to the GPU."""
    bases = {"entropy": trt.IInt8EntropyCalibrator2, "minmax": trt.IInt8MinMaxCalibrator}
    if method not in bases:
        raise PtqError(f"TensorRT implicit INT8 calibrates with entropy or minmax, not {method!r}: set calib_method")
    buffer = cuda.alloc(int(np.prod((feed.batch_size, *shape[1:]))) * 4)

    class Calibrator(bases[method]):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()

        def get_batch_size(self) -> int:
            return feed.batch_size

        def get_batch(self, names: list[str]) -> list[int] | None:
            batch = feed.next_batch()
            if batch is None:
                return None
            cuda.to_device(buffer, batch)
            cuda.synchronize()
            return [buffer]

        def read_calibration_cache(self) -> bytes | None:
            return feed.read_cache()

        def write_calibration_cache(self, cache: Any) -> None:
            feed.write_cache(cache)

    return Calibrator()


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
    """An execution context with device buffers for the profile's max batch; `run` waits for the GPU."""

    def __init__(self, engine: trt.ICudaEngine, cuda: Cuda, max_batch: int) -> None:
        self.engine, self.cuda = engine, cuda
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        sample = dims(engine.get_tensor_shape(self.input))[1:]
        classes = dims(engine.get_tensor_shape(self.output))[-1]
        self.out_host = np.empty((max_batch, classes), dtype=np.float32)
        self.d_in = cuda.alloc(max_batch * int(np.prod(sample)) * 4)
        self.d_out = cuda.alloc(self.out_host.nbytes)
        self.context.set_tensor_address(self.input, self.d_in)
        self.context.set_tensor_address(self.output, self.d_out)

    def run(self, batch: np.ndarray) -> np.ndarray:
        n = len(batch)
        self.context.set_input_shape(self.input, batch.shape)
        self.cuda.to_device(self.d_in, np.ascontiguousarray(batch, dtype=np.float32))
        if not self.context.execute_async_v3(self.cuda.handle):
            raise RuntimeError("TensorRT execution failed")
        out = self.out_host[:n]
        self.cuda.to_host(out, self.d_out)
        self.cuda.synchronize()
        return out.copy()


def layer_type(name: str) -> str:
    """A TensorRT layer's op type for the profile: the last part of the first ONNX node name fused into it
    ("/_blocks.0/_depthwise_conv/Conv + /_blocks.0/Relu" -> "Conv"), where the parser named it after one."""
    first = name.split(" + ")[0]
    return first.rsplit("/", 1)[-1] if "/" in first else "layer"


def layer_profile(reports: list[tuple[str, float]], queries: int, run_ms: float) -> Any:
    """TensorRT's IProfiler reports (layer name, ms) over `queries` runs taking `run_ms` in all, as a
    `ptq.profile.OpProfile`: mean µs per query per layer, op types from `layer_type`."""
    from ptq.profile import NodeTime, OpProfile

    total: dict[str, float] = {}
    for name, ms in reports:
        total[name] = total.get(name, 0.0) + ms
    nodes = [NodeTime(name, layer_type(name), 1000.0 * ms / queries, "TensorRT") for name, ms in total.items()]
    return OpProfile(nodes, queries, 1000.0 * run_ms / queries, notes=["TensorRT IProfiler; op types from the layers' ONNX node names"])


class TensorRTBackend(Backend):
    name = "tensorrt"
    profiles = True
    PROFILE_QUERIES = 100
    Options = TensorRTOptions

    def __init__(self) -> None:
        self._cuda: Cuda | None = None
        self.logger: trt.ILogger | None = None

    @property
    def cuda(self) -> Cuda:
        if self._cuda is None:
            self._cuda = Cuda()
        return self._cuda

    def _logger(self) -> trt.ILogger:
        require_tensorrt()
        if self.logger is None:
            self.logger = trt.Logger(trt.Logger.WARNING)
        return self.logger

    def capabilities(self) -> Capabilities:
        builder = trt.Builder(self._logger())
        return Capabilities(bool(builder.platform_has_fast_fp16), bool(builder.platform_has_fast_int8), int(builder.num_DLA_cores))

    def check(self, precision: str, onnx_only: bool = False) -> None:
        super().check(precision, onnx_only)
        require_tensorrt()
        check_version(str(trt.__version__))
        self.cuda  # noqa: B018  (fails early with the install hint)
        check_capabilities(precision, TensorRTOptions(), self.capabilities())

    def compress(self, job: CompressJob) -> Compressed:
        opts: TensorRTOptions = job.options
        check_capabilities(job.precision, opts, self.capabilities())
        artifacts: list[Path] = []
        source, feed = job.fp32_onnx, None
        if job.precision == "int8":
            mode = resolve_int8_mode(opts.int8_mode, str(trt.__version__))
            if mode == "explicit":  # TensorRT wants symmetric int8 activations and weights in QDQ, made by ORT's quantizer
                from ptq import quantize

                source = job.workdir / "model_int8_qdq.onnx"
                qdq = quantize.QuantOptions(
                    calib_method=opts.calib_method, activation_type="int8", weight_type="int8", symmetric_activations=True, keep_float=opts.keep_float
                )  # kept nodes get no Q/DQ, so TensorRT builds them in fp16
                batches = job.calib_batches(opts.calib_batch)
                quantize.to_int8(job.fp32_onnx, source, batches, qdq, job.phases, job.workdir / "calibration_ranges.json")
                artifacts += [source, job.workdir / "calibration_ranges.json"]
            else:
                feed = CalibrationFeed(job.calib_batches(opts.calib_batch), opts.calib_batch, job.workdir / "calibration.cache")
        with job.phases("build"):
            engine_path = self.build(source, job.precision, opts, job.batch_sizes, job.workdir, feed)
        if feed is not None:  # TensorRT calibrated inside the build: book that time as calibration
            job.phases.carve("build", "calibrate", feed.seconds())
            artifacts.append(feed.cache)
            if feed.dropped:
                log.warning("TensorRT calibration used %d images; %d did not fill a batch of %d", feed.fed, feed.dropped, feed.batch_size)
        artifacts.append(engine_path.with_suffix(".json"))
        mode = resolve_int8_mode(opts.int8_mode, str(trt.__version__)) if job.precision == "int8" else ""
        return Compressed(
            engine_path, artifacts, handle=(source, job.precision, opts, job.batch_sizes, job.workdir), numerics=numerics(job.precision, mode, opts.dla_core) + kept_note(opts)
        )

    def build(
        self, onnx_path: Path, precision: str, options: TensorRTOptions, batch_sizes: tuple[int, int], workdir: Path, feed: CalibrationFeed | None
    ) -> Path:
        """Parse the ONNX file and serialize an engine (plus its metadata JSON) into `workdir`."""
        logger = self._logger()
        builder = trt.Builder(logger)
        flags = 0 if major_version(str(trt.__version__)) >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
            raise PtqError(f"TensorRT could not parse {onnx_path.name}: {errors[:300]}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
        inp = network.get_input(0)
        sample = list(dims(inp.shape)[1:])
        profile = builder.create_optimization_profile()
        profile.set_shape(inp.name, trt.Dims([1, *sample]), trt.Dims([batch_sizes[0], *sample]), trt.Dims([batch_sizes[1], *sample]))
        config.add_optimization_profile(profile)
        config.clear_flag(trt.BuilderFlag.TF32)  # see numerics()
        if precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)  # int8 engines fall back to fp16 where a layer has no int8 kernel
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
            if feed is not None and options.keep_float:  # implicit INT8: the named layers are constrained to fp16
                keep_layers_in_fp16(network, options.keep_float)
                config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
            if feed is not None:
                config.int8_calibrator = make_calibrator(options.calib_method, feed, self.cuda, (feed.batch_size, *sample))
                config.set_calibration_profile(profile)
        if options.dla_core >= 0:
            config.default_device_type = trt.DeviceType.DLA
            config.DLA_core = options.dla_core
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
        cache_file = options.timing_cache or cache_dir() / "tensorrt" / f"timing-{trt.__version__}.cache"
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        timing = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
        config.set_timing_cache(timing, False)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise PtqError(f"TensorRT failed to build a {precision} engine from {onnx_path.name}: see TensorRT's log above")
        cache_file.write_bytes(bytes(config.get_timing_cache().serialize()))
        engine_path = workdir / f"model_{precision}.engine"
        engine_path.write_bytes(bytes(serialized))
        meta = engine_metadata(self.device(), precision, onnx_path)
        engine_path.with_suffix(".json").write_text(json.dumps(meta, indent=1))
        return engine_path

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
        engine = trt.Runtime(self._logger()).deserialize_cuda_engine(model.path.read_bytes())
        if engine is None:
            raise PtqError(f"TensorRT could not load {model.path.name}: rebuild it with this TensorRT version")
        max_batch = model.handle[3][1] if isinstance(model.handle, tuple) else dims(engine.get_tensor_profile_shape(engine.get_tensor_name(0), 0)[2])[0]
        return TrtSession(engine, self.cuda, max_batch)

    def profile(self, model: Compressed, batch: np.ndarray, threads: int) -> Any:
        """Per-layer times from TensorRT's IProfiler over PROFILE_QUERIES queries after a warm-up, each run's
        report collected once the stream is done (enqueue does not emit it)."""
        session = self.open(model, threads)
        assert isinstance(session, TrtSession)
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
            session.context.report_to_profiler()
        return layer_profile(reports, self.PROFILE_QUERIES, 1000.0 * (time.perf_counter() - started))

    def versions(self) -> dict[str, str]:
        require_tensorrt()
        return {"tensorrt": str(trt.__version__)}

    def device(self) -> str:
        return gpu_name()


BACKEND = TensorRTBackend
