"""What a Jetson runs, on every Python it has (3.8, 3.10, 3.11): a torch-free lite0 INT8 run from an ONNX file, the
TensorRT backend and the CLI without torch or ONNX Runtime, and ONNX Runtime's older quantization API."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest

pytestmark = pytest.mark.device
FIXTURES = Path(__file__).parent / "fixtures" / "jetson"


BLOCKER = """
import importlib.abc, importlib.util, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (not installed on this device)", name=name)
sys.meta_path.insert(0, Absent())
found = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: None if name.split(".")[0] in BLOCKED else found(name, package)
"""


def _ptq(code: str, *args: str, block: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter where the modules in `block` are absent, as on a device without them."""
    prelude = f"BLOCKED = {block!r}\n" + BLOCKER
    return subprocess.run([sys.executable, "-c", prelude + code, *args], capture_output=True, text=True, timeout=600)


def test_lite0_int8_from_onnx_runs_without_torch(lite0_onnx: Path, small_dir: Path) -> None:
    """The device path: the exported file, real ONNX Runtime INT8, a real MLflow store, and no torch to import."""
    code = "from ptq import cli\ncli.app(sys.argv[1:], standalone_mode=False)\n"
    args = ("run", "--model", str(lite0_onnx), "--precision", "int8", "--data", str(small_dir), "--calib-size", "20", "--eval-size", "120",
            "--min-queries", "40", "--min-duration-s", "0", "--blocks", "4", "--warmup", "2", "--progress", "false")
    done = _ptq(code, *args, block=("torch", "torchvision"))
    assert done.returncode == 0, done.stderr[-2000:]
    run = mlflow.search_runs(search_all_experiments=True).iloc[0]
    assert run.status == "FINISHED" and run["params.model"] == str(lite0_onnx) and run["tags.ptq.model_source"] == "onnx"
    assert run["metrics.data/eval_images"] == 120 and abs(run["metrics.acc/top1_drop_pt"]) < 5  # real weights: a real drop
    assert run["metrics.acc/fp32_top1"] > 0.7 and run["metrics.speedup/p50"] > 0
    assert run["params.calib_method"] == "minmax" and "params.workspace_mb" not in run.index  # only ort's own options


def test_tensorrt_backend_and_cli_without_torch_or_onnxruntime(small_dir: Path, lite0_onnx: Path) -> None:
    """A TensorRT-only device: the interface, the TensorRT backend's GPU-free logic and the CLI import and work
    with torch and ONNX Runtime unimportable; a run names what is missing in one line."""
    code = """
import json
from ptq.backends import backend_class
from ptq.backends.tensorrt import CalibrationFeed, Capabilities, check_capabilities, resolve_int8_mode
import numpy as np
opts = backend_class("tensorrt").options({"workspace_mb": "2048", "int8_mode": "explicit", "dla_core": "1"})
check_capabilities("int8", opts, Capabilities(True, True, 2))
feed = CalibrationFeed(iter([np.zeros((3, 3, 2, 2), np.float32)] * 3), 4, __import__("pathlib").Path("c.cache"))
sizes = []
while (b := feed.next_batch()) is not None:
    sizes.append(len(b))
print(json.dumps({"opts": [opts.workspace_mb, opts.int8_mode, opts.dla_core], "auto": [resolve_int8_mode("auto", "8.5.2.2"), resolve_int8_mode("auto", "10.3.0")], "sizes": sizes, "dropped": feed.dropped}))
"""
    done = _ptq(code, block=("torch", "torchvision", "onnxruntime"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"opts": [2048, "explicit", 1], "auto": ["implicit", "explicit"], "sizes": [4, 4], "dropped": 1}

    cli = "from ptq import cli\nsys.argv = ['ptq', *sys.argv[1:]]\ncli.main()\n"
    run = _ptq(cli, "run", "--model", str(lite0_onnx), "--backend", "tensorrt", "--data", str(small_dir), block=("torch", "torchvision", "onnxruntime"))
    assert run.returncode == 2 and "backend=tensorrt needs TensorRT's Python package" in run.stderr
    assert len([line for line in run.stderr.splitlines() if line.strip()]) <= 3  # one error, however rich wraps it
    doctor = _ptq(cli, "doctor", "--root", str(FIXTURES / "orin"), block=("torch", "torchvision", "onnxruntime"))
    assert doctor.returncode == 0, doctor.stderr[-2000:]
    assert doctor.stdout.strip().splitlines()[-1] == "3 warning(s) runs here will carry as tags: doctor.power_mode, doctor.clocks, doctor.swap"


def test_old_onnxruntime_quantization_api_gives_the_same_model(lite0_onnx: Path, small_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ONNX Runtime before 1.27 (all that Python 3.8 and 3.10 have) cannot quantize from saved ranges; ptq hands its
    own calibrator's ranges in, so the model is the one the calibration cache gives on 1.27+."""
    import onnxruntime
    import onnxruntime.quantization as ortq

    from ptq.quantizers import ort as quantize
    from ptq.backends.ort import open_session
    from ptq.phases import Phases

    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((4, 3, 224, 224), dtype=np.float32) for _ in range(2)]
    opts = quantize.QuantOptions()
    first = quantize.to_int8(lite0_onnx, tmp_path / "a.onnx", iter(batches), opts, Phases(), tmp_path / "a.json")
    real = ortq.quantize_static
    if "calibration_cache_path" not in __import__("inspect").signature(real).parameters:
        pytest.skip(f"onnxruntime {onnxruntime.__version__} has only the older API, which the lite0 run above used")

    def older(model_input: object, model_output: object, calibration_data_reader: object, **kwargs: object) -> None:  # 1.19's signature
        real(model_input, model_output, calibration_data_reader, **kwargs)

    monkeypatch.setattr(ortq, "quantize_static", older)
    second = quantize.to_int8(lite0_onnx, tmp_path / "b.onnx", iter(batches), opts, Phases(), tmp_path / "b.json")
    assert first == second
    x = rng.standard_normal((2, 3, 224, 224), dtype=np.float32)
    a, b = (open_session(str(tmp_path / f"{n}.onnx"), 1).run(x) for n in "ab")
    np.testing.assert_array_equal(a, b)


def test_keep_float_leaves_the_named_nodes_in_float_and_refuses_unknown_ones(lite0_onnx: Path, small_dir: Path, tmp_path: Path) -> None:
    """Mixed precision by node name: the named convolutions keep float weights, the others' are int8; a name the
    model lacks is refused before any run."""
    import onnx

    from ptq import pipeline
    from ptq.quantizers import ort as quantize
    from ptq.config import RunConfig
    from ptq.errors import PtqError
    from ptq.phases import Phases

    convs = [n.name for n in onnx.load(str(lite0_onnx)).graph.node if n.op_type == "Conv"]
    kept = tuple(convs[:3])
    batches = [np.random.default_rng(0).standard_normal((4, 3, 224, 224), dtype=np.float32)]
    quantize.to_int8(lite0_onnx, tmp_path / "m.onnx", iter(batches), quantize.QuantOptions(keep_float=kept), Phases(), tmp_path / "r.json")
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    float_weights = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    assert {n.name for n in graph.node if n.op_type == "Conv" and n.input[1] in float_weights} == set(kept)  # the others' weights are int8
    assert quantize.describe(quantize.QuantOptions(keep_float=kept)).endswith("; 3 nodes kept in float")
    with pytest.raises(PtqError, match="keep_float names nodes lite0.onnx does not have: conv9: use ONNX node names such as /_conv_stem/Conv"):
        pipeline.run(RunConfig(model=str(lite0_onnx), data=small_dir, options={"keep_float": f"{convs[0]},conv9"}))
    assert mlflow.search_runs(search_all_experiments=True).empty
