"""The TensorRT backend against a fake TensorRT that enforces TensorRT's documented contract (tests/fake_tensorrt.py
cites the header and pybind lines of each rule): calibration shapes, swallowed get_batch exceptions, TensorRT 11's
strong typing, DLA placement, the timing cache, real layer names, page-locked latency with GPU compute time."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import ptq.quantizers.qdq_rules
from ptq import doctor
from ptq.backends import CompressJob
from ptq.backends import tensorrt as trt_backend
from ptq.backends.cuda import CudaRuntime
from ptq.backends.tensorrt import TensorRTBackend, TensorRTOptions, TrtSession
from ptq.errors import PtqError
from ptq.phases import Phases
from ptq.quantizers.ort import even_batch
from fake_tensorrt import ENQUEUE_MS, ContractViolation, make_trt, tiny_classifier

GPU = "NVIDIA Jetson AGX Orin"


@pytest.fixture(autouse=True)
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """conftest's store without its MLflow database (6-11 s a test here): nothing in this file logs to MLflow."""
    monkeypatch.chdir(tmp_path)
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("PTQ_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ptq-cache"))
    return tmp_path


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    """Install a fake TensorRT of a given version into the backend; returns it."""

    def install(version: str = "8.5.2.2", **kwargs: Any) -> Any:
        trt = make_trt(version, gpu=GPU, **kwargs)
        monkeypatch.setattr(trt_backend, "trt", trt)
        monkeypatch.setattr(TensorRTBackend, "new_cuda", lambda self: CudaRuntime(trt.cudart))
        monkeypatch.setattr(TensorRTBackend, "device", lambda self: GPU)
        return trt

    return install


def pipeline_batches(images: int, size: int = 8) -> Callable[[int], Iterator[np.ndarray]]:
    """Calibration batches as ptq.pipeline makes them: all of quantize.even_batch's size, image i filled with i."""

    def batches(preferred: int) -> Iterator[np.ndarray]:
        b = even_batch(images, preferred)
        for s in range(0, images, b):
            yield np.stack([np.full((3, size, size), i, np.float32) for i in range(s, min(s + b, images))])

    return batches


def job(tmp_path: Path, precision: str, batches: Callable[[int], Iterator[np.ndarray]] | None = None, batch_sizes: tuple[int, int] = (1, 32), **options: Any) -> CompressJob:
    onnx_path = tmp_path / "model_fp32.onnx"
    if not onnx_path.exists():
        tiny_classifier(onnx_path)
    opts = TensorRTOptions(timing_cache=tmp_path / "timing.cache", **options)
    return CompressJob(onnx_path, None, precision, batches or pipeline_batches(100), opts, Phases(), tmp_path, batch_sizes)


# 1. implicit INT8: its own calibration profile at the feed's batch; every image used, or how many not and why
@pytest.mark.parametrize("batch_sizes", [(1, 32), (16, 32)])  # latency batch 1: 1 image in 8 read; 16: past the buffer
def test_implicit_int8_calibrates_every_image_at_the_calibration_profiles_opt_shape(fake: Any, tmp_path: Path, batch_sizes: tuple[int, int]) -> None:
    trt = fake("8.5.2.2")
    compressed = TensorRTBackend().compress(job(tmp_path, "int8", batch_sizes=batch_sizes, int8_mode="implicit"))
    assert trt.log["calibrated"] == [("batch", (5, 3, 8, 8))] * 20  # 100 images: the pipeline's batches of 5, all fed
    assert compressed.metrics == {"calibrate/images": 100.0, "calibrate/dropped_images": 0.0}
    assert compressed.tags["tensorrt.calibration"] == "100 images in 20 batches of 5 (the calibration profile's shape)"
    assert (tmp_path / "calibration.cache").read_bytes() == b"TRT-8.5.2.2-minmax\n"
    assert trt.device.memory.keys() == set()  # the calibration buffer is freed; the engine's session is not open yet


def test_fewer_calibration_images_than_calib_batch_calibrate_in_one_batch(fake: Any, tmp_path: Path) -> None:
    trt = fake("8.6.2")
    compressed = TensorRTBackend().compress(job(tmp_path, "int8", pipeline_batches(3), int8_mode="implicit"))
    assert trt.log["calibrated"] == [("batch", (3, 3, 8, 8))] and compressed.metrics["calibrate/images"] == 3


def test_a_short_last_batch_is_dropped_and_said_why(fake: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fake("8.5.2.2")
    uneven = lambda b: iter([np.zeros((5, 3, 8, 8), np.float32), np.zeros((5, 3, 8, 8), np.float32), np.zeros((3, 3, 8, 8), np.float32)])  # noqa: E731
    compressed = TensorRTBackend().compress(job(tmp_path, "int8", uneven, int8_mode="implicit"))
    assert compressed.tags["tensorrt.calibration"] == "10 images in 2 batches of 5 (the calibration profile's shape); 3 dropped: they did not fill a batch of 5"
    assert compressed.metrics == {"calibrate/images": 10.0, "calibrate/dropped_images": 3.0}
    assert [r.levelname for r in caplog.records if "TensorRT calibration" in r.message] == ["WARNING"]


# 7. one line before work: no calibration images, a symbolic H/W
def test_no_calibration_images_or_a_symbolic_input_size_is_refused_before_the_build(fake: Any, tmp_path: Path) -> None:
    trt = fake("8.5.2.2")
    with pytest.raises(PtqError, match="^TensorRT implicit INT8 got no calibration images: set calib_size"):
        TensorRTBackend().compress(job(tmp_path, "int8", lambda b: iter(()), int8_mode="implicit"))
    symbolic = tiny_classifier(tmp_path / "model_fp32.onnx", symbolic_hw=True)
    with pytest.raises(PtqError, match=r"^model_fp32.onnx has a symbolic input size \(-1, 3, -1, -1\): .* fixed input size$"):
        TensorRTBackend().compress(job(tmp_path, "fp16"))
    assert symbolic.exists() and not list(tmp_path.glob("*.engine")) and trt.log["calibrated"] == []


# 6. exceptions in get_batch: TensorRT's trampoline swallows them; the backend re-raises them after the build
@pytest.mark.parametrize("error", [OSError("image 17 unreadable"), KeyboardInterrupt()])
def test_an_exception_inside_get_batch_ends_the_run(fake: Any, tmp_path: Path, error: BaseException) -> None:
    trt = fake("8.5.2.2")

    def failing(b: int) -> Iterator[np.ndarray]:
        yield from [np.zeros((4, 3, 8, 8), np.float32)] * 2
        raise error

    with pytest.raises(type(error)):
        TensorRTBackend().compress(job(tmp_path, "int8", failing, int8_mode="implicit"))
    assert trt.log["calibrated"] == [("batch", (4, 3, 8, 8))] * 2 and trt.log["printed"] == []  # caught before TensorRT's trampoline
    assert not (tmp_path / "model_int8.engine").exists()


# 3. TensorRT 11: strongly typed; FP16 from an FP16 ONNX, INT8 from Q/DQ only
def test_tensorrt_11_builds_strongly_typed(fake: Any, tmp_path: Path) -> None:
    trt = fake("11.0.0")
    for version in ("8.5.2.2", "10.3.0", "11.0.0", "11.4.0.2"):
        trt_backend.check_version(version)
    with pytest.raises(PtqError, match="TensorRT 12.0.0 is not supported.*8.5 to 11.x"):
        trt_backend.check_version("12.0.0")
    backend = TensorRTBackend()
    compressed = backend.compress(job(tmp_path, "fp16"))
    blob = json.loads(compressed.path.read_bytes())
    assert (blob["precision"], blob["typed"]) == ("fp16", "strong") and (tmp_path / "model_fp16.onnx").exists()
    assert compressed.numerics == "fp16 from the ONNX's float16 types, float32 I/O (strongly typed, TF32 off)"
    assert backend.capabilities().fast_int8  # no platform_has_fast_* in 11: not a refusal
    with pytest.raises(PtqError, match="TensorRT 11.0.0 has no INT8 calibrators .*: use int8_mode=explicit or auto"):
        backend.compress(job(tmp_path, "int8", int8_mode="implicit"))


def qdq_model(path: Path) -> Path:
    """A tiny classifier with one Q/DQ pair on its input (what `ptq quantize --backend tensorrt` writes, in small)."""
    import onnx
    from onnx import helper, numpy_helper

    tiny_classifier(path)
    model = onnx.load(str(path))
    g = model.graph
    g.initializer.extend([numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")])
    g.node[0].input[0] = "input_dq"
    g.node.insert(0, helper.make_node("DequantizeLinear", ["input_q", "s", "z"], ["input_dq"], name="/in/DequantizeLinear"))
    g.node.insert(0, helper.make_node("QuantizeLinear", ["input", "s", "z"], ["input_q"], name="/in/QuantizeLinear"))
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("version", ["8.5.2.2", "11.0.0"])
def test_a_qdq_model_made_beforehand_builds_int8_without_calibrating(fake: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    trt = fake(version)
    checked: list[Path] = []
    monkeypatch.setattr(ptq.quantizers.qdq_rules, "require", checked.append)

    def never(b: int) -> Iterator[np.ndarray]:
        raise AssertionError("calibrated again")

    qdq = qdq_model(tmp_path / "lite_int8_qdq.onnx")
    compressed = TensorRTBackend().compress(_with_qdq(job(tmp_path, "int8", never), qdq))
    assert checked == [qdq] and json.loads(compressed.path.read_bytes())["precision"] == "int8" and trt.log["calibrated"] == []
    assert compressed.tags["tensorrt.int8_source"] == "lite_int8_qdq.onnx, made beforehand (not calibrated again)"


def _with_qdq(j: CompressJob, qdq: Path) -> CompressJob:
    j.qdq_onnx = qdq
    return j


# 4. DLA: a fixed-shape profile, fp16/int8 only, placement from the engine inspector, runtime.DLA_core set
def test_dla_builds_a_fixed_shape_engine_and_counts_its_layers(fake: Any, tmp_path: Path) -> None:
    trt = fake("8.5.2.2")
    backend = TensorRTBackend()
    compressed = backend.compress(job(tmp_path, "int8", int8_mode="implicit", dla_core=1, calib_method="minmax"))
    blob = json.loads(compressed.path.read_bytes())
    assert blob["profile"] == [[1, 3, 8, 8]] * 3 and blob["dla"] and blob["dla_core"] == 1
    assert compressed.tags == {**compressed.tags, "tensorrt.dla_core": "1", "tensorrt.dla_subgraphs": "1", "tensorrt.gpu_layers": "0"}
    assert "tensorrt.dla_fallback" not in compressed.tags
    assert compressed.numerics == "int8 with fp16 fallback (implicit quantization, TF32 off) on DLA core 1: 1 DLA subgraphs, 0 GPU layers"
    assert (tmp_path / "calibration.cache").read_bytes() == b"TRT-8.5.2.2-entropy\n"  # the calibrator DLA requires
    session = backend.open(compressed, 1)  # Runtime.DLA_core set before deserializing, else the fake refuses
    x = np.arange(5 * 3 * 8 * 8, dtype=np.float32).reshape(5, 3, 8, 8)
    np.testing.assert_allclose(session.run(x)[:, 0], x.reshape(5, -1).mean(axis=1), rtol=1e-6)  # 5 runs of the fixed batch 1
    ref = backend.compress(replace(job(tmp_path, "fp32", dla_core=1), reference=True))  # the run's FP32 reference
    assert not json.loads(ref.path.read_bytes())["dla"]
    assert ref.numerics == "fp32 (TF32 off) on the GPU (the FP32 reference of a DLA run: DLA runs fp16/int8 only)"
    assert trt.log["deserialized"] == 2


def test_fp32_on_dla_is_refused_and_a_full_fallback_is_said(fake: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fake("10.3.0", dla_takes_layers=False)
    with pytest.raises(PtqError, match="^dla_core=0: DLA runs fp16 and int8 only: use precision=fp16 or int8, or dla_core=-1"):
        TensorRTBackend().compress(job(tmp_path, "fp32", dla_core=0))
    compressed = TensorRTBackend().compress(job(tmp_path, "fp16", dla_core=0))
    assert compressed.tags["tensorrt.dla_fallback"] == "all 6 layers fell back to the GPU" and compressed.tags["tensorrt.dla_subgraphs"] == "0"
    assert compressed.numerics.endswith(" on the GPU: every layer fell back from DLA core 0")
    assert any(r.levelname == "WARNING" and "fell back to the GPU" in r.message for r in caplog.records)


# 5. the timing cache: keyed by TensorRT and GPU, foreign/corrupt ones ignored, written atomically, never fatal
@pytest.mark.parametrize("content", [b"FAKE-TIMING-CACHE NVIDIA Jetson AGX Xavier\n", b"FAKE-TIMING-CACHE NVIDIA Jet"])  # another GPU; truncated
def test_a_foreign_or_corrupt_timing_cache_is_ignored(fake: Any, tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture) -> None:
    fake("8.6.2")
    (tmp_path / "timing.cache").write_bytes(content)
    TensorRTBackend().compress(job(tmp_path, "fp16"))
    assert (tmp_path / "timing.cache").read_bytes() == f"FAKE-TIMING-CACHE {GPU}\n".encode()
    assert any("timing cache" in r.message and "ignored" in r.message for r in caplog.records)
    assert [p.name for p in tmp_path.glob("*.tmp")] == []


def test_timing_cache_is_keyed_by_version_and_gpu_and_never_fails_a_build(fake: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trt = fake("10.3.0")
    path = trt_backend.timing_cache_path(TensorRTOptions(), GPU)
    assert path.name == "timing-10.3.0-NVIDIA-Jetson-AGX-Orin.cache"
    monkeypatch.setattr("fake_tensorrt.TimingCache.serialize", lambda self: (_ for _ in ()).throw(RuntimeError("disk full")))
    compressed = TensorRTBackend().compress(job(tmp_path, "fp32"))
    assert compressed.path.exists() and not (tmp_path / "timing.cache").exists() and [p.name for p in tmp_path.glob("*.tmp")] == []
    assert trt.log["deserialized"] == 1


# 8. real layer names -> op families
def test_real_tensorrt_layer_names_become_op_families() -> None:
    names = {  # from NVIDIA/TensorRT issues #4020, #3679, #3143 and pytorch/pytorch#66683 (engine inspector output)
        "Reformatting CopyNode for Input Tensor 0 to resnetv15_conv0_fwd + resnetv15_batchnorm0_fwd + resnetv15_relu0_fwd": "Reformat",
        "Reformatting CopyNode for Input Tensor 0 to /m/Conv": "Reformat",
        "PWN(PWN(/a/Sigmoid), /a/Mul)": "Pointwise(Sigmoid+Mul)",
        "PWN(PWN(relu_1), add_1)": "Pointwise",
        "{ForeignNode[/x/MatMul.../head/Gemm]}": "Myelin",
        "{ForeignNode[Conv_0...Concat_198]}": "Myelin",
        "images to nvm": "DLA transfer",
        "head_3 from nvm": "DLA transfer",
        "images copy finish": "DLA transfer",
        "/features/0/Conv + /features/0/Relu": "Conv",
        "Conv_19 + Add_20 + Relu_21": "Conv",
        "/_blocks.0/_depthwise_conv/Conv": "Conv",
        "(Unnamed Layer* 162) [Shuffle]": "layer",
    }
    assert {n: trt_backend.layer_type(n) for n in names} == names


def test_placement_counts_dla_subgraphs_and_gpu_layers_from_the_inspector() -> None:
    info = json.dumps({"Layers": [{"Name": "images to nvm", "LayerType": "Reformat"}, {"Name": "{ForeignNode[Conv_0...Concat_198]}", "LayerType": "ForeignNode"},
                                  {"Name": "head_3 from nvm", "LayerType": "Reformat"}, {"Name": "/head/Softmax", "LayerType": "SoftMax"}]})
    assert trt_backend.placement(info, dla=True) == (1, 1)
    assert trt_backend.placement(info, dla=False) == (0, 4)  # a GPU build's ForeignNode is Myelin
    assert trt_backend.placement(json.dumps({"Layers": ["/a/Conv + /a/Relu", "/fc/Gemm"]}), dla=True) == (0, 2)


# 9. latency like trtexec: page-locked buffers, GPU compute time, memory freed, one engine copy for profile
def test_sessions_time_the_gpu_use_pinned_buffers_free_memory_and_profile_without_a_second_engine(fake: Any, tmp_path: Path) -> None:
    trt = fake("10.3.0")
    backend = TensorRTBackend()
    compressed = backend.compress(job(tmp_path, "fp16", batch_sizes=(2, 8)))
    session = backend.open(compressed, 1)
    assert isinstance(session, TrtSession) and len(trt.device.pinned) == 2 and len(trt.device.memory) == 2  # pinned in/out, device in/out
    x = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(session.run(x)[:, 3], x.reshape(8, -1).mean(axis=1), rtol=1e-5)
    session.run(x[:2])
    assert session.gpu_ms() == [ENQUEUE_MS, ENQUEUE_MS] and session.gpu_ms() == []
    prof = backend.profile(compressed, x[:2], 1)
    assert trt.log["deserialized"] == 1 and prof.queries == backend.PROFILE_QUERIES  # the open session's engine
    assert {n.op_type for n in prof.nodes} == {"Reformat", "Conv", "Relu", "GlobalAveragePool", "Flatten", "Gemm"}
    assert session.gpu_ms() == []  # profiled runs are no latency samples
    session.close()
    assert trt.device.memory == {} and trt.device.pinned == {}


# 10. doctor: the backend's version check and a driver really reached, in doctor's subprocess probe
FAKE_MODULES = {
    "tensorrt/__init__.py": "__version__ = {version!r}\nclass Logger:\n    ERROR = 1\n    def __init__(self, s): pass\nclass Builder:\n    num_DLA_cores = 2\n    def __init__(self, l): pass\n",
    "cuda/__init__.py": "",
    "cuda/bindings/__init__.py": "",
    "cuda/bindings/runtime.py": (  # cuda-python returns (error, value); 35 is cudaErrorInsufficientDriver
        "class P:\n    name = b'Orin\\x00'\n"
        "def cudaGetDeviceCount():\n    return ({err}, 1)\n"
        "def cudaGetDeviceProperties(i):\n    return ({err}, P())\n"
        "def cudaDriverGetVersion():\n    return (0, 11040)\n"
    ),
}


@pytest.mark.parametrize(("version", "err", "status", "detail"), [
    ("8.4.1.5", 0, doctor.WARN, "TensorRT 8.4.1.5 is not supported by backend=tensorrt: it needs TensorRT 8.5 to 11.x"),
    ("8.5.2.2", 35, doctor.WARN, "CUDA bindings cannot reach the driver: cuda-python: cudaGetDeviceCount: 35"),
    ("8.5.2.2", 0, doctor.OK, "TensorRT 8.5.2.2, GPU Orin (driver CUDA 11.4), 2 DLA cores; CUDA reached through cuda-python"),
])
def test_doctor_applies_the_version_check_and_reaches_the_driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: str, err: int, status: str, detail: str) -> None:
    for rel, text in FAKE_MODULES.items():
        (tmp_path / "site" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "site" / rel).write_text(text.format(version=version, err=err))
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "site"), str(repo)]))
    monkeypatch.setattr(doctor, "installed", lambda module: module == "tensorrt")
    [check] = doctor.tensorrt_check()
    assert check.status == status and detail in check.detail, check.detail
    assert (check.tag == "doctor.tensorrt") == (status == doctor.WARN)
    assert subprocess.run([sys.executable, "-c", "import pycuda"], capture_output=True).returncode != 0  # pycuda is not what answered


def test_the_fake_enforces_the_contract(tmp_path: Path) -> None:
    """The rules the fake stands for bite: an inconsistent profile, a batch of the wrong size, a missing flag on 11."""
    trt = make_trt("8.5.2.2")
    builder = trt.Builder(None)
    network = builder.create_network(1)
    trt.OnnxParser(network, None).parse_from_file(str(tiny_classifier(tmp_path / "m.onnx")))
    with pytest.raises(RuntimeError, match="inconsistent"):
        builder.create_optimization_profile().set_shape("input", (8, 3, 8, 8), (1, 3, 8, 8), (32, 3, 8, 8))  # min > opt
    with pytest.raises(RuntimeError, match="inconsistent"):
        builder.create_optimization_profile().set_shape("input", (1, 3, 4, 4), (1, 3, 4, 4), (1, 3, 4, 4))  # fixed H, W changed
    assert not hasattr(make_trt("11.0.0").BuilderFlag, "FP16") and not hasattr(make_trt("11.0.0"), "IInt8EntropyCalibrator2")
    with pytest.raises(ContractViolation, match="is no device allocation"):
        trt.device.owner(0x1234, 4)
    ptr = trt.cudart.cudaMalloc(16)[1]
    with pytest.raises(ContractViolation, match="pageable host memory"):  # async copies need page-locked memory
        trt.cudart.cudaMemcpyAsync(ptr, np.zeros(4, np.float32).ctypes.data, 16, trt.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, 1)
    config, name = builder.create_builder_config(), "input"
    config.add_optimization_profile(_fixed_profile(builder, (2, 3, 8, 8)))
    config.set_calibration_profile(_fixed_profile(builder, (2, 3, 8, 8)))
    config.set_flag(trt.BuilderFlag.INT8)
    config.int8_calibrator = _Returns([ptr, ptr])  # two pointers for one input name
    with pytest.raises(ContractViolation, match="2 pointers for 1 input name"):
        builder.build_serialized_network(network, config)
    config.int8_calibrator = _Returns(np.array([ptr]))  # not a list of ints: pybind's cast fails, calibration ends
    assert builder.build_serialized_network(network, config) is None and trt.log["printed"][-1].endswith("Unable to cast Python instance to C++ type")
    assert name in network.inputs


class _Returns:
    """A calibrator whose get_batch returns `value` once."""

    algorithm = "minmax"

    def __init__(self, value: Any) -> None:
        self.value: Any = value

    def read_calibration_cache(self) -> None:
        return None

    def get_batch(self, names: list[str]) -> Any:
        value, self.value = self.value, None
        return value


def _fixed_profile(builder: Any, shape: tuple[int, ...]) -> Any:
    profile = builder.create_optimization_profile()
    profile.set_shape("input", shape, shape, shape)
    return profile


# review of issue 22's rewrite against TensorRT's sources (each test names the rule it pins)
@pytest.mark.parametrize(("version", "flags", "typed"), [("8.5.2.2", 1, "weak"), ("10.3.0", 0, "weak"), ("11.0.0", 1, "strong")])
def test_create_network_flags_come_from_each_versions_enum(fake: Any, tmp_path: Path, version: str, flags: int, typed: str) -> None:
    """8.5: 1 << EXPLICIT_BATCH (0); 10.x: none (always explicit); 11: 1 << STRONGLY_TYPED, which is 0 there, not 1
    (NVIDIA/TensorRT v11.0 include/NvInfer.h NetworkDefinitionCreationFlag: 1 is kPREFER_JIT_PYTHON_PLUGINS)."""
    fake(version)
    blob = json.loads(TensorRTBackend().compress(job(tmp_path, "fp32")).path.read_bytes())
    assert (blob["flags"], blob["typed"]) == (flags, typed)


def test_every_cuda_stream_is_destroyed(fake: Any, tmp_path: Path) -> None:
    """A calibrator and each session make a stream; cudaStreamDestroy on close (cuda-python runtime API)."""
    trt = fake("8.6.2")
    backend = TensorRTBackend()
    session = backend.open(backend.compress(job(tmp_path, "int8", pipeline_batches(10), int8_mode="implicit")), 1)
    session.close()
    assert trt.device.streams == 2 and sorted(trt.device.destroyed) == [1, 2]


def _engine(backend: TensorRTBackend, tmp_path: Path, precision: str = "fp32") -> Any:
    compressed = backend.compress(job(tmp_path, precision))
    return backend.built.pop(compressed.path)


def test_a_refused_tensor_address_ends_the_session_and_frees_its_memory(fake: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """set_tensor_address returns false for a name that is no I/O tensor (NvInferRuntime.h 8.5.2 setTensorAddress)."""
    trt = fake("10.3.0")
    backend = TensorRTBackend()
    engine = _engine(backend, tmp_path)
    monkeypatch.setattr(type(engine.create_execution_context()), "set_tensor_address", lambda self, name, ptr: False)
    with pytest.raises(RuntimeError, match="^TensorRT refused the device address of tensor 'input'$") as refused:
        TrtSession(engine, backend.new_cuda())
    assert trt.device.memory == {} and trt.device.pinned == {} and trt.device.destroyed == [trt.device.streams]
    assert refused.tb is not None  # freed at once, not when the traceback (holding the session) goes


def test_an_engine_with_fp16_io_is_refused_before_any_allocation(fake: Any, tmp_path: Path) -> None:
    """The host buffers are float32: an engine whose input is HALF (an FP16-I/O ONNX) is refused in one line."""
    import onnx

    trt = fake("11.0.0")
    path = tiny_classifier(tmp_path / "model_fp32.onnx")
    model = onnx.load(str(path))
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    onnx.save(model, str(path))
    backend = TensorRTBackend()
    with pytest.raises(PtqError, match=r"^TensorRT engine tensor 'input' is DataType.HALF, backend=tensorrt feeds and reads float32"):
        TrtSession(_engine(backend, tmp_path), backend.new_cuda())
    assert trt.device.memory == {} and trt.device.pinned == {}


def test_profile_reports_each_layer_once_per_query_and_checks_report_to_profiler(fake: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """report_to_profiler returns false without a profiler (NvInferRuntime.h 8.5.2 reportToProfiler): not ignored."""
    fake("8.5.2.2")
    backend = TensorRTBackend()
    compressed = backend.compress(job(tmp_path, "fp16", batch_sizes=(2, 8)))
    x = np.zeros((2, 3, 8, 8), np.float32)
    prof = backend.profile(compressed, x, 1)
    assert {round(n.us, 6) for n in prof.nodes} == {10.0}  # the fake's 0.01 ms a layer, once per query
    engine_context = type(_engine(backend, tmp_path).create_execution_context())
    monkeypatch.setattr(engine_context, "report_to_profiler", lambda self: False)
    with pytest.raises(RuntimeError, match="report_to_profiler failed"):
        backend.profile(backend.compress(job(tmp_path, "fp16", batch_sizes=(2, 8))), x, 1)


def test_a_myelin_graph_on_a_dla_build_runs_on_the_gpu() -> None:
    """A '{ForeignNode[...]}' of LayerType 'Myelin' is a GPU graph (trt-engine-explorer trex/colors.py, v10.13.0)."""
    info = json.dumps({"Layers": [{"Name": "{ForeignNode[/stem/Conv.../head/Relu]}", "LayerType": "DLA"},
                                  {"Name": "{ForeignNode[/fc/MatMul.../fc/Add]}", "LayerType": "Myelin"}], "Bindings": ["input", "logits"]})
    assert trt_backend.placement(info, dla=True) == (1, 1)


def test_importing_the_backend_does_not_import_mlflow() -> None:
    """`ptq doctor`'s probe imports this module for check_version: it must not pull in mlflow (~5 s, more on a Jetson)."""
    code = "import sys, ptq.backends.tensorrt; print('mlflow' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert done.stdout.strip() == "False", done.stderr[-300:]


def test_dla_says_it_calibrates_with_entropy_instead_of_the_method_asked(fake: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """IInt8EntropyCalibrator2 is "the required calibrator for DLA" (NVIDIA/TensorRT 8.5.2 include/NvInfer.h): minmax is
    replaced, and the log says so."""
    fake("8.5.2.2")
    TensorRTBackend().compress(job(tmp_path, "int8", pipeline_batches(10), int8_mode="implicit", dla_core=0, calib_method="minmax"))
    assert [r.message for r in caplog.records if "entropy" in r.message] == [
        "dla_core=0: calibrating with entropy, not minmax: TensorRT requires the entropy calibrator for DLA"]
    assert (tmp_path / "calibration.cache").read_bytes() == b"TRT-8.5.2.2-entropy\n"
