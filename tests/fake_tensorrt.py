"""A fake `tensorrt` module and a fake cuda-python runtime that enforce TensorRT's documented contract, so the
TensorRT backend's logic runs here without a GPU. Each rule cites where TensorRT documents it (NVIDIA/TensorRT at
the tag named; the mirror's paths):

- IOptimizationProfile.set_shape raises RuntimeError unless min <= opt <= max, ranks match, non-negative, and
  fixed network dims are kept: include/NvInferRuntime.h (8.5.2) IOptimizationProfile::setDimensions conditions
  (1)-(3); python/src/infer/pyCore.cpp (8.5.2) opt_profile_set_shape (PY_ASSERT_RUNTIME_ERROR).
- set_calibration_profile: the profile must be valid (every input set); TensorRT calibrates at its OPT shape
  ("MIN and MAX values will be overwritten by kOPT") and must have one for a network with runtime dimensions:
  include/NvInfer.h (8.5.2) IBuilderConfig::setCalibrationProfile; trtexec builds it min=opt=max
  (samples/common/sampleEngines.cpp 8.5.2, profileCalib). The calibrator's get_batch is called with the input
  names and must return device pointers; TensorRT reads the OPT shape's bytes at each pointer, so the fake
  device checks the pointer's allocation holds them and that the batch copied there was exactly that size.
- get_batch's exceptions are printed and end calibration (python/src/infer/pyInt8.cpp 8.5.2, getBatch:
  catch (std::exception), catch (...), return false).
- set_timing_cache returns false for a cache from another device unless ignore_mismatch (include/NvInfer.h 8.5.2
  IBuilderConfig::setTimingCache); a blob that is no timing cache gives None here.
- DLA: min = opt = max or the DLA cannot take the layer ("If run on DLA, minimum, optimum, and maximum dimensions
  must to be the same", NvInferRuntime.h 8.5.2 setDimensions); DLA runs FP16/INT8 only; with GPU_FALLBACK the
  rest runs on the GPU. DLA subgraphs are named '{ForeignNode[first...last]}' with '<t> to nvm' / '<t> from nvm'
  copies (TensorRT#3143's trtexec profile).
- TensorRT 11 (python/src/infer/pyCore.cpp v11.0): BuilderFlag has no FP16/INT8, no IInt8*Calibrator,
  no platform_has_fast_*, no set_calibration_profile; NetworkDefinitionCreationFlag.STRONGLY_TYPED.
- Runtime.DLA_core is set before deserializing (trtexec: sampleEngines.cpp 8.5.2, setDLACore before deserialize).
- NetworkDefinitionCreationFlag per version (python/src/infer/pyCore.cpp enum; include/NvInfer.h): 8.5/8.6
  EXPLICIT_BATCH=0, EXPLICIT_PRECISION=1; 10.x EXPLICIT_BATCH=0 (ignored), STRONGLY_TYPED=1; 11.0 STRONGLY_TYPED=0
  (ignored: always strongly typed), PREFER_JIT_PYTHON_PLUGINS=1, PREFER_AOT_PYTHON_PLUGINS=2. BuilderFlag: 11.0 has
  no FP16, INT8 or OBEY_PRECISION_CONSTRAINTS.
- IExecutionContext.set_tensor_address returns false for a name that is no I/O tensor, and enqueueV3 needs every
  I/O address set (NvInferRuntime.h 8.5.2 setTensorAddress); report_to_profiler returns false without a profiler,
  and with enqueue_emits_profile true (the default) the enqueue itself reports (NvInferRuntime.h 8.5.2
  reportToProfiler, setEnqueueEmitsProfile).
- get_batch must return None or a list of one int per name (pyInt8.cpp 8.5.2 getBatch: cast<std::vector<size_t>>,
  memcpy of nbBindings pointers); a list of another length reads past it.
- cudaMemcpyAsync reads page-locked host memory ("It only works on page-locked host memory", CUDA runtime API
  reference, cudaMemcpyAsync; pycuda's memcpy_htod_async: "src must be page-locked"); streams are destroyed.
- Engine tensor types come from the ONNX (ICudaEngine.get_tensor_dtype; trt.float32 is DataType.FLOAT,
  pyFoundationalTypes.cpp 8.5.2).
"""

from __future__ import annotations

import ctypes
import json
import sys
import types
from enum import Enum, IntEnum
from pathlib import Path
from typing import Any

import numpy as np
import onnx


class ContractViolation(AssertionError):
    """The code broke a rule TensorRT documents (what real TensorRT would answer with garbage or a fault)."""


class FakeDevice:
    """Device memory: allocations by address, the bytes each holds, and the size of the last copy into each."""

    def __init__(self) -> None:
        self.memory: dict[int, bytearray] = {}
        self.last_copy: dict[int, int] = {}
        self.next = 0x7F0000000000
        self.pinned: dict[int, Any] = {}
        self.freed: list[int] = []
        self.streams = 0
        self.destroyed: list[int] = []

    def check_pinned(self, ptr: int, nbytes: int) -> None:
        """An async copy's host side must lie in page-locked memory (cudaHostAlloc), or the fake refuses it."""
        for base, buf in self.pinned.items():
            if base <= ptr and ptr + nbytes <= base + ctypes.sizeof(buf):
                return
        raise ContractViolation(f"async copy of {nbytes} bytes from pageable host memory at {ptr:#x}: use page-locked memory")

    def owner(self, ptr: int, nbytes: int) -> tuple[int, int]:
        """(allocation, offset) holding nbytes at ptr, or a ContractViolation (an illegal address on a GPU)."""
        for base, mem in self.memory.items():
            if base <= ptr < base + len(mem):
                if ptr - base + nbytes > len(mem):
                    raise ContractViolation(f"{nbytes} bytes at {ptr:#x} run past its {len(mem)}-byte allocation")
                return base, ptr - base
        raise ContractViolation(f"{ptr:#x} is no device allocation")

    def read(self, ptr: int, nbytes: int) -> bytes:
        base, off = self.owner(ptr, nbytes)
        return bytes(self.memory[base][off : off + nbytes])

    def write(self, ptr: int, data: bytes) -> None:
        base, off = self.owner(ptr, len(data))
        self.memory[base][off : off + len(data)] = data


class FakeCudart:
    """The few cuda-python runtime calls ptq.backends.cuda makes, each returning (err, value) like cuda-python."""

    class cudaMemcpyKind(IntEnum):
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    cudaHostAllocDefault = 0

    def __init__(self, device: FakeDevice) -> None:
        self.device = device

    def cudaStreamCreate(self) -> tuple[int, int]:
        self.device.streams += 1
        return (0, self.device.streams)

    def cudaStreamDestroy(self, stream: int) -> tuple[int]:
        self.device.destroyed.append(stream)
        return (0,)

    def cudaStreamSynchronize(self, stream: int) -> tuple[int]:
        return (0,)

    def cudaMalloc(self, nbytes: int) -> tuple[int, int]:
        ptr = self.device.next
        self.device.next += (nbytes + 0xFFFF) & ~0xFFFF
        self.device.memory[ptr] = bytearray(nbytes)
        return (0, ptr)

    def cudaFree(self, ptr: int) -> tuple[int]:
        del self.device.memory[ptr]
        self.device.freed.append(ptr)
        return (0,)

    def cudaHostAlloc(self, nbytes: int, flags: int) -> tuple[int, int]:
        buf = (ctypes.c_byte * nbytes)()
        self.device.pinned[ctypes.addressof(buf)] = buf
        return (0, ctypes.addressof(buf))

    def cudaFreeHost(self, ptr: int) -> tuple[int]:
        del self.device.pinned[ptr]
        return (0,)

    def cudaMemcpyAsync(self, dst: int, src: int, nbytes: int, kind: Any, stream: int) -> tuple[int]:
        self.device.check_pinned(src if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice else dst, nbytes)
        if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice:
            self.device.write(dst, ctypes.string_at(src, nbytes))
            self.device.last_copy[self.device.owner(dst, nbytes)[0]] = nbytes
        else:
            ctypes.memmove(dst, self.device.read(src, nbytes), nbytes)
        return (0,)

    def cudaEventCreate(self) -> tuple[int, list[float]]:
        return (0, [0.0])

    def cudaEventDestroy(self, event: Any) -> tuple[int]:
        return (0,)

    def cudaEventRecord(self, event: list[float], stream: int) -> tuple[int]:
        event[0] = GPU_CLOCK[0]
        return (0,)

    def cudaEventElapsedTime(self, start: list[float], end: list[float]) -> tuple[int, float]:
        return (0, end[0] - start[0])


GPU_CLOCK = [0.0]  # ms; each enqueue advances it by ENQUEUE_MS, copies take no GPU time here
ENQUEUE_MS = 0.25


class Dims(tuple):  # type: ignore[type-arg]
    def __new__(cls, values: Any) -> Dims:
        return super().__new__(cls, tuple(int(v) for v in values))


class Profile:
    """IOptimizationProfile: set_shape enforces setDimensions' conditions (1)-(3)."""

    def __init__(self, network: Network | None) -> None:
        self.network = network
        self.shapes: dict[str, tuple[Dims, Dims, Dims]] = {}

    def set_shape(self, name: str, min: Any, opt: Any, max: Any) -> None:
        dims = [Dims(d) for d in (min, opt, max)]
        net = self.network.inputs[name] if self.network else None
        ranks = {len(d) for d in dims} | ({len(net)} if net else set())
        if len(ranks) != 1 or any(not 0 <= a <= b <= c for a, b, c in zip(*dims)):
            raise RuntimeError("Shape provided for min is inconsistent with other shapes.")
        if net and any(n != -1 and not a == b == c == n for n, a, b, c in zip(net, *dims)):
            raise RuntimeError("Shape provided for min is inconsistent with other shapes.")
        self.shapes[name] = (dims[0], dims[1], dims[2])

    def get_shape(self, name: str) -> tuple[Dims, Dims, Dims]:
        return self.shapes[name]

    def valid(self) -> bool:
        return self.network is not None and set(self.shapes) == set(self.network.inputs)


class Layer:
    def __init__(self, name: str, op: str) -> None:
        self.name, self.op = name, op
        self.precision: Any = None

    def set_output_type(self, index: int, dtype: Any) -> None:
        self.output_type = dtype


class Tensor:
    def __init__(self, name: str, shape: tuple[int, ...]) -> None:
        self.name, self.shape = name, Dims(shape)


class Network:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.inputs: dict[str, Dims] = {}
        self.layers: list[Layer] = []
        self.classes = 0
        self.qdq = self.fp16 = False
        self.io_dtype = "FLOAT"

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def get_layer(self, i: int) -> Layer:
        return self.layers[i]

    def get_input(self, i: int) -> Tensor:
        name = list(self.inputs)[i]
        return Tensor(name, self.inputs[name])


def _dims(value_info: Any) -> tuple[int, ...]:
    return tuple(d.dim_value if d.HasField("dim_value") else -1 for d in value_info.type.tensor_type.shape.dim)


class TimingCache:
    def __init__(self, gpu: str) -> None:
        self.gpu = gpu

    def serialize(self) -> bytes:
        return f"FAKE-TIMING-CACHE {self.gpu}\n".encode()


def make_trt(version: str = "8.5.2.2", gpu: str = "Orin", dla_cores: int = 2, dla_takes_layers: bool = True) -> types.ModuleType:
    """A `tensorrt` module of this version on a device named `gpu`; `.device` is its memory, `.log` what it did."""
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt")
    device = FakeDevice()
    trt.__version__ = version  # type: ignore[attr-defined]
    trt.device = device  # type: ignore[attr-defined]
    trt.cudart = FakeCudart(device)  # type: ignore[attr-defined]
    trt.log = {"calibrated": [], "deserialized": 0, "printed": []}  # type: ignore[attr-defined]
    weak = major < 11
    flags = ["TF32", "GPU_FALLBACK"] + (["FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS"] if weak else [])
    trt.BuilderFlag = IntEnum("BuilderFlag", flags)  # type: ignore[attr-defined]
    creation = ({"EXPLICIT_BATCH": 0, "EXPLICIT_PRECISION": 1} if major < 10 else {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1} if weak
                else {"STRONGLY_TYPED": 0, "PREFER_JIT_PYTHON_PLUGINS": 1, "PREFER_AOT_PYTHON_PLUGINS": 2})
    trt.NetworkDefinitionCreationFlag = IntEnum("NetworkDefinitionCreationFlag", creation)  # type: ignore[attr-defined]
    trt.MemoryPoolType = IntEnum("MemoryPoolType", ["WORKSPACE"])  # type: ignore[attr-defined]
    trt.DeviceType = IntEnum("DeviceType", ["GPU", "DLA"])  # type: ignore[attr-defined]
    trt.ProfilingVerbosity = IntEnum("ProfilingVerbosity", ["LAYER_NAMES_ONLY", "NONE", "DETAILED"])  # type: ignore[attr-defined]
    trt.LayerInformationFormat = IntEnum("LayerInformationFormat", ["ONELINE", "JSON"])  # type: ignore[attr-defined]
    trt.TensorIOMode = IntEnum("TensorIOMode", ["NONE", "INPUT", "OUTPUT"])  # type: ignore[attr-defined]
    trt.DataType = Enum("DataType", {"FLOAT": 0, "HALF": 1, "INT8": 2})  # type: ignore[attr-defined]  # str() as pybind: DataType.HALF
    trt.float32, trt.float16 = trt.DataType.FLOAT, trt.DataType.HALF  # type: ignore[attr-defined]
    trt.Dims = Dims  # type: ignore[attr-defined]

    class Logger:
        WARNING, ERROR = 2, 1

        def __init__(self, severity: int) -> None:
            self.severity = severity

    class IProfiler:
        def __init__(self) -> None:
            pass

    trt.Logger = trt.ILogger = Logger  # type: ignore[attr-defined]
    trt.IProfiler = IProfiler  # type: ignore[attr-defined]
    if weak:
        class IInt8EntropyCalibrator2:
            algorithm = "entropy"

            def __init__(self) -> None:
                pass

        class IInt8MinMaxCalibrator(IInt8EntropyCalibrator2):
            algorithm = "minmax"

        trt.IInt8EntropyCalibrator2 = IInt8EntropyCalibrator2  # type: ignore[attr-defined]
        trt.IInt8MinMaxCalibrator = IInt8MinMaxCalibrator  # type: ignore[attr-defined]

    class OnnxParser:
        def __init__(self, network: Network, logger: Any) -> None:
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path: str) -> bool:
            model = onnx.load(path)
            init = {i.name for i in model.graph.initializer}
            for inp in model.graph.input:
                if inp.name not in init:
                    self.network.inputs[inp.name] = Dims(_dims(inp))
            self.network.classes = _dims(model.graph.output[0])[-1]
            self.network.io_dtype = "HALF" if model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 else "FLOAT"
            self.network.layers = [Layer(n.name, n.op_type) for n in model.graph.node]
            self.network.qdq = any(n.op_type == "QuantizeLinear" for n in model.graph.node)
            self.network.fp16 = any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
            return True

    class Config:
        def __init__(self) -> None:
            self.flags: set[Any] = set()
            self.profiles: list[Profile] = []
            self.calibration_profile: Profile | None = None
            self.default_device_type = trt.DeviceType.GPU  # type: ignore[attr-defined]
            self.DLA_core = -1
            self.profiling_verbosity = trt.ProfilingVerbosity.LAYER_NAMES_ONLY  # type: ignore[attr-defined]
            self.timing: TimingCache | None = None
            if weak:
                self.int8_calibrator: Any = None

        def set_memory_pool_limit(self, pool: Any, size: int) -> None:
            assert size > 0

        def set_flag(self, flag: Any) -> None:
            self.flags.add(flag)

        def clear_flag(self, flag: Any) -> None:
            self.flags.discard(flag)

        def add_optimization_profile(self, profile: Profile) -> int:
            if not profile.valid():
                raise ContractViolation("an invalid optimization profile was added")
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, data: bytes) -> TimingCache | None:
            text = bytes(data).decode(errors="replace")
            if not data:
                return TimingCache(gpu)
            return TimingCache(text.split(" ", 1)[1].strip()) if text.startswith("FAKE-TIMING-CACHE ") and text.endswith("\n") else None

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            if not isinstance(cache, TimingCache):
                raise TypeError("set_timing_cache(): incompatible function arguments")
            if cache.gpu != gpu and not ignore_mismatch:
                return False
            self.timing = cache
            return True

        def get_timing_cache(self) -> TimingCache | None:
            return self.timing

    if weak:
        def set_calibration_profile(self: Config, profile: Profile) -> bool:
            if not profile.valid():
                return False
            self.calibration_profile = profile
            return True

        Config.set_calibration_profile = set_calibration_profile  # type: ignore[attr-defined]

    class Builder:
        def __init__(self, logger: Any) -> None:
            self.num_DLA_cores = dla_cores

        def create_network(self, flags: int = 0) -> Network:
            return Network(flags)

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile(self.network_for_profiles)

        def build_serialized_network(self, network: Network, config: Config) -> bytes | None:
            return _build(network, config)

    if weak:
        Builder.platform_has_fast_fp16 = True  # type: ignore[attr-defined]
        Builder.platform_has_fast_int8 = True  # type: ignore[attr-defined]

    created: list[Network] = []
    original_create = Builder.create_network

    def create_network(self: Builder, flags: int = 0) -> Network:
        net = original_create(self, flags)
        self.network_for_profiles = net  # profiles check against the network's inputs
        created.append(net)
        return net

    Builder.create_network = create_network  # type: ignore[method-assign]

    def _calibrate(network: Network, config: Config) -> bool:
        calibrator = config.int8_calibrator
        name = next(iter(network.inputs))
        if -1 in network.inputs[name] and config.calibration_profile is None:
            print("[E] calibration profile must be set for a network with runtime dimensions", file=sys.stderr)
            return False
        shape = (config.calibration_profile or config.profiles[0]).get_shape(name)[1]  # calibrates at OPT only
        nbytes = int(np.prod(shape)) * 4
        if calibrator.read_calibration_cache() is not None:
            trt.log["calibrated"].append(("cache", shape))  # type: ignore[attr-defined]
            return True
        batches = 0
        while True:
            try:  # pyInt8.cpp getBatch: any exception is printed and ends calibration
                pointers = calibrator.get_batch([name])
            except BaseException as exc:  # noqa: B036  (catch (...))
                trt.log["printed"].append(f"[ERROR] Exception caught in get_batch(): {exc}")  # type: ignore[attr-defined]
                pointers = None
            if pointers is not None and (not isinstance(pointers, list) or not all(isinstance(p, int) for p in pointers)):
                trt.log["printed"].append("[ERROR] Exception caught in get_batch(): Unable to cast Python instance to C++ type")  # type: ignore[attr-defined]
                pointers = None
            if not pointers:
                break
            if len(pointers) != 1:  # TensorRT copies nbBindings (here 1) pointers out of the list
                raise ContractViolation(f"get_batch returned {len(pointers)} pointers for 1 input name")
            ptr = int(pointers[0])
            base, _ = device.owner(ptr, nbytes)  # TensorRT reads the OPT shape's bytes there
            if device.last_copy.get(base) != nbytes:
                raise ContractViolation(f"get_batch's buffer got {device.last_copy.get(base)} bytes, the calibration profile's OPT shape {tuple(shape)} is {nbytes}")
            batches += 1
            trt.log["calibrated"].append(("batch", shape))  # type: ignore[attr-defined]
        if batches == 0:
            print("[E] Calibration failure occurred with no scaling factors detected", file=sys.stderr)
            return False
        calibrator.write_calibration_cache(memoryview(f"TRT-{version}-{calibrator.algorithm}\n".encode()))
        return True

    def _build(network: Network, config: Config) -> bytes | None:
        if not config.profiles:
            raise ContractViolation("no optimization profile for a network with a dynamic batch")
        int8 = (weak and trt.BuilderFlag.INT8 in config.flags) or network.qdq  # type: ignore[attr-defined]
        fp16 = (weak and trt.BuilderFlag.FP16 in config.flags) or (not weak and network.fp16)  # type: ignore[attr-defined]
        if weak and int8 and not network.qdq and config.int8_calibrator is not None and not _calibrate(network, config):
            return None
        name = next(iter(network.inputs))
        low, opt, high = config.profiles[0].get_shape(name)
        dla = config.default_device_type == trt.DeviceType.DLA  # type: ignore[attr-defined]
        fixed = low == opt == high
        on_dla = dla and fixed and (fp16 or int8) and dla_takes_layers  # DLA: fixed shapes, FP16/INT8 only
        if dla and not on_dla and trt.BuilderFlag.GPU_FALLBACK not in config.flags:  # type: ignore[attr-defined]
            return None
        layers: list[dict[str, str]] = []
        if on_dla:  # names from TensorRT#3143; the LayerType of a DLA subgraph is chosen here (no public DETAILED dump of one)
            names = [layer.name for layer in network.layers]
            layers = [{"Name": f"{name} to nvm", "LayerType": "Reformat"}, {"Name": f"{{ForeignNode[{names[0]}...{names[-1]}]}}", "LayerType": "ForeignNode"},
                      {"Name": "logits from nvm", "LayerType": "Reformat"}, {"Name": f"{name} copy finish", "LayerType": "Reformat"}]
        else:
            layers = [{"Name": f"Reformatting CopyNode for Input Tensor 0 to {network.layers[0].name}", "LayerType": "Reformat"}]
            layers += [{"Name": layer.name, "LayerType": layer.op} for layer in network.layers]
        if config.profiling_verbosity != trt.ProfilingVerbosity.DETAILED:  # type: ignore[attr-defined]
            layers = [lay["Name"] for lay in layers]  # type: ignore[misc]
        precision = "int8" if int8 else "fp16" if fp16 else "fp32"
        blob = {"input": name, "shape": list(network.inputs[name]), "profile": [list(low), list(opt), list(high)], "classes": network.classes,
                "layers": layers, "precision": precision, "dla": on_dla, "dla_core": config.DLA_core,
                "typed": "strong" if not weak or ("STRONGLY_TYPED" in creation and network.flags & (1 << creation["STRONGLY_TYPED"])) else "weak",
                "io_dtype": network.io_dtype, "flags": network.flags}
        return json.dumps(blob).encode()

    class Inspector:
        def __init__(self, engine: Engine) -> None:
            self.engine = engine

        def get_engine_information(self, fmt: Any) -> str:
            return json.dumps({"Layers": self.engine.blob["layers"], "Bindings": [self.engine.blob["input"], "logits"]})

    class Context:
        def __init__(self, engine: Engine) -> None:
            self.engine, self.addresses, self.shape = engine, {}, None
            self.profiler: Any = None
            self.enqueue_emits_profile = True

        def set_tensor_address(self, name: str, ptr: int) -> bool:
            if name not in (self.engine.blob["input"], "logits"):
                return False
            self.addresses[name] = ptr
            return True

        def set_input_shape(self, name: str, shape: Any) -> bool:
            low, _, high = self.engine.blob["profile"]
            if len(shape) != len(low) or any(not a <= s <= c for a, s, c in zip(low, shape, high)):
                return False
            self.shape = tuple(shape)
            return True

        def execute_async_v3(self, stream: int) -> bool:
            """Logits: each image's mean, in every class column (something the test can check came back)."""
            assert self.shape is not None
            if set(self.addresses) != {self.engine.blob["input"], "logits"}:
                raise ContractViolation(f"enqueueV3 with I/O addresses set for {sorted(self.addresses)} only")
            n, size = self.shape[0], int(np.prod(self.shape[1:]))
            x = np.frombuffer(device.read(self.addresses[self.engine.blob["input"]], n * size * 4), np.float32).reshape(n, size)
            out = np.repeat(x.mean(axis=1, keepdims=True), self.engine.blob["classes"], axis=1).astype(np.float32)
            device.write(self.addresses["logits"], out.tobytes())
            GPU_CLOCK[0] += ENQUEUE_MS
            if self.profiler is not None and self.enqueue_emits_profile:  # the enqueue reports, synchronously
                self._report()
            return True

        def _report(self) -> None:
            for layer in self.engine.blob["layers"]:
                self.profiler.report_layer_time(layer if isinstance(layer, str) else layer["Name"], 0.01)

        def report_to_profiler(self) -> bool:
            if self.profiler is None:
                return False
            if not self.enqueue_emits_profile:  # true and nothing done when the enqueue already reported
                self._report()
            return True

    class Engine:
        def __init__(self, blob: dict[str, Any], dla_core: int) -> None:
            self.blob, self.dla_core, self.num_io_tensors = blob, dla_core, 2

        def get_tensor_name(self, i: int) -> str:
            return [self.blob["input"], "logits"][i]

        def get_tensor_mode(self, name: str) -> Any:
            return trt.TensorIOMode.INPUT if name == self.blob["input"] else trt.TensorIOMode.OUTPUT  # type: ignore[attr-defined]

        def get_tensor_dtype(self, name: str) -> Any:
            return trt.DataType[self.blob["io_dtype"]]  # type: ignore[attr-defined]

        def get_tensor_shape(self, name: str) -> Dims:
            return Dims(self.blob["shape"]) if name == self.blob["input"] else Dims([-1, self.blob["classes"]])

        def get_tensor_profile_shape(self, name: str, index: int) -> list[Dims]:
            return [Dims(d) for d in self.blob["profile"]]

        def create_execution_context(self) -> Context:
            return Context(self)

        def create_engine_inspector(self) -> Inspector:
            return Inspector(self)

    class Runtime:
        def __init__(self, logger: Any) -> None:
            self.DLA_core = -1

        def deserialize_cuda_engine(self, data: bytes) -> Engine:
            blob = json.loads(bytes(data))
            if blob["dla"] and self.DLA_core != blob["dla_core"]:
                raise ContractViolation(f"a DLA engine for core {blob['dla_core']} deserialized with Runtime.DLA_core={self.DLA_core}")
            trt.log["deserialized"] += 1  # type: ignore[attr-defined]
            return Engine(blob, self.DLA_core)

    trt.OnnxParser, trt.Builder, trt.Runtime = OnnxParser, Builder, Runtime  # type: ignore[attr-defined]
    return trt


def tiny_classifier(path: Path, size: int = 8, classes: int = 10, symbolic_hw: bool = False) -> Path:
    """A Conv-Relu-GlobalAveragePool-Flatten-Gemm ONNX with a dynamic batch (H, W symbolic if asked)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    hw: list[Any] = ["h", "w"] if symbolic_hw else [size, size]
    nodes = [
        helper.make_node("Conv", ["input", "w0"], ["c0"], name="/stem/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"], name="/stem/Relu"),
        helper.make_node("GlobalAveragePool", ["r0"], ["p0"], name="/pool/GlobalAveragePool"),
        helper.make_node("Flatten", ["p0"], ["f0"], name="/Flatten"),
        helper.make_node("Gemm", ["f0", "w1", "b1"], ["logits"], name="/fc/Gemm", transB=1),
    ]
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w0"),
             numpy_helper.from_array(rng.standard_normal((classes, 4)).astype(np.float32), "w1"),
             numpy_helper.from_array(np.zeros(classes, np.float32), "b1")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, *hw])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path
