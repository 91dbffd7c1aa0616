"""Bad input fails before any work: one PtqError line naming the problem and the fix, and no MLflow run."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ptq import data, export, models, pipeline
from ptq.config import RunConfig
from ptq.errors import PtqError
from ptq.models import Transform

BIN = Path(sys.executable).parent
QUICK: dict[str, Any] = {"min_queries": 4, "min_duration_s": 0.0, "blocks": 2, "warmup": 1, "calib_size": 4, "monitor": False, "progress": False}
T224 = Transform(256, 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
Dim = int | str


def make_onnx(path: Path, inp: tuple[Dim, ...] = ("batch", 3, 224, 224), classes: int | None = 1000, elem: int = TensorProto.FLOAT) -> Path:
    """A valid tiny ONNX model: global pooling and a linear layer to `classes` scores, or the image itself when None."""
    x = helper.make_tensor_value_info("input", elem, list(inp))
    if classes is None:
        nodes = [helper.make_node("Identity", ["input"], ["out"])]
        out = helper.make_tensor_value_info("out", elem, list(inp))
        inits = []
    else:
        channels = inp[1] if isinstance(inp[1], int) else 3
        rng = np.random.default_rng(0)
        nodes = [
            helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"]),
            helper.make_node("Gemm", ["flat", "w", "b"], ["out"], transB=1),
        ]
        out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [inp[0], classes])
        inits = [
            numpy_helper.from_array(rng.standard_normal((classes, channels)).astype("float32"), "w"),
            numpy_helper.from_array(rng.standard_normal(classes).astype("float32"), "b"),
        ]
    graph = helper.make_graph(nodes, "tiny", [x], [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("onnx")
    make_onnx(folder / "imagenet224.onnx")
    make_onnx(folder / "ten_classes.onnx", classes=10)
    make_onnx(folder / "image_out.onnx", classes=None)
    make_onnx(folder / "gray.onnx", inp=("batch", 1, 224, 224))
    make_onnx(folder / "nhwc.onnx", inp=("batch", 224, 224, 3), classes=None)
    make_onnx(folder / "flat.onnx", inp=("batch", 150528), classes=None)
    make_onnx(folder / "batch1.onnx", inp=(1, 3, 224, 224))
    make_onnx(folder / "wide.onnx", inp=("batch", 3, 224, 300))
    make_onnx(folder / "fp16.onnx", inp=("batch", 3, 224, 224), classes=None, elem=TensorProto.FLOAT16)
    make_onnx(folder / "any_side.onnx", inp=("batch", 3, "height", "width"))
    return folder


BOMB_HEADER = b"P6\n20000 20000\n255\n"  # a header claiming 400 M pixels: PIL refuses it as a decompression bomb


@pytest.fixture
def garbage_dir(tmp_path: Path) -> Path:
    """ImageNet-named files that are not images."""
    folder = tmp_path / "garbage"
    folder.mkdir()
    for i, wnid in enumerate(("n01440764", "n01443537", "n01484850") * 4):
        (folder / f"{wnid}_{i}.JPEG").write_bytes(BOMB_HEADER if i == 0 else os.urandom(600))
    return folder


def no_runs() -> bool:
    return bool(mlflow.search_runs(search_all_experiments=True).empty)


def refused(cfg: RunConfig, match: str) -> str:
    """Run `cfg`, expect a one-line PtqError matching `match`, and that no MLflow run was opened."""
    with pytest.raises(PtqError, match=match) as info:
        pipeline.run(cfg)
    message = str(info.value)
    assert "\n" not in message
    assert no_runs()
    return message


# 1. int8 without calibration images


def test_int8_without_calibration_images_is_refused(onnx_dir: Path, small_dir: Path) -> None:
    cfg = RunConfig(model=str(onnx_dir / "imagenet224.onnx"), data=small_dir, **{**QUICK, "calib_size": 0})
    refused(cfg, r"calib_size=0: precision=int8 needs calibration images.*calib_size to 1 or more")
    for precision in ("fp32", "fp16"):
        RunConfig(model="lite0", data=small_dir, precision=precision, calib_size=0).validate()


# 2. unreadable images


def test_folder_of_unreadable_images_is_refused_at_scan(onnx_dir: Path, garbage_dir: Path) -> None:
    refused(RunConfig(model=str(onnx_dir / "imagenet224.onnx"), data=garbage_dir, **QUICK), r"none of the 12 images .* is a readable image.*data=")


def _mixed_dir(sample_dir: Path, folder: Path, good: int, bad: int) -> Path:
    folder.mkdir()
    for f in sorted(sample_dir.iterdir())[:good]:
        (folder / f.name).symlink_to(f)
    for i in range(bad):
        (folder / f"n01440764_broken{i}.JPEG").write_bytes(b"GIF89a but not really" if i % 2 else b"")
    return folder


def _seed_where(n: int, calib_size: int, good: set[int], role: str) -> int:
    """A split seed whose calibration (or evaluation) images all fall outside `good`."""
    for seed in range(10_000):
        split = data.split(n, calib_size, None, seed)
        if not set(split.calib if role == "calibration" else split.eval) & good:
            return seed
    raise AssertionError("no such seed")


@pytest.mark.parametrize("role", ["calibration", "evaluation"])
def test_split_without_a_readable_image_is_refused(onnx_dir: Path, sample_dir: Path, tmp_path: Path, role: str) -> None:
    folder = _mixed_dir(sample_dir, tmp_path / "mixed", good=2, bad=6)
    ds = data.scan(folder)
    good = {i for i, f in enumerate(ds.files) if "broken" not in f.name}
    assert ds.readable == tuple(i in good for i in range(len(ds.files)))
    calib_size = 2 if role == "calibration" else 6
    seed = _seed_where(len(ds.files), calib_size, good, role)
    cfg = RunConfig(model=str(onnx_dir / "imagenet224.onnx"), data=folder, **{**QUICK, "calib_size": calib_size, "split_seed": seed})
    refused(cfg, rf"none of the 2 {role} images of data folder .* is readable \(e.g. n01440764_broken\d.JPEG\): replace or remove the broken files")


def test_fp32_does_not_need_readable_calibration_images(sample_dir: Path, tmp_path: Path) -> None:
    folder = _mixed_dir(sample_dir, tmp_path / "mixed", good=2, bad=6)
    ds = data.scan(folder)
    good = {i for i, f in enumerate(ds.files) if "broken" not in f.name}
    split = data.split(len(ds.files), 2, None, _seed_where(len(ds.files), 2, good, "calibration"))
    data.require_readable(ds, split, ds.readable, calibrate=False)
    with pytest.raises(PtqError, match="calibration"):
        data.require_readable(ds, split, ds.readable, calibrate=True)


def test_single_unreadable_images_are_still_skipped(sample_dir: Path, tmp_path: Path) -> None:
    folder = _mixed_dir(sample_dir, tmp_path / "mixed", good=3, bad=2)
    (folder / "n01440764_bomb.JPEG").write_bytes(BOMB_HEADER)
    ds = data.scan(folder)
    assert sum(ds.readable) == 3
    tensors = data.load_tensors(ds, T224, progress=False)
    assert tensors.ok.tolist() == list(ds.readable)


def test_images_that_fail_to_decode_are_refused_after_decoding(sample_dir: Path, tmp_path: Path) -> None:
    """Truncated JPEGs pass the header check; decoding finds that none is usable."""
    folder = tmp_path / "truncated"
    folder.mkdir()
    for f in sorted(sample_dir.iterdir())[:3]:
        (folder / f.name).write_bytes(f.read_bytes()[:700])
    ds = data.scan(folder)
    assert all(ds.readable)
    with pytest.raises(PtqError, match=r"none of the 3 images in data folder .* could be decoded"):
        data.load_tensors(ds, T224, progress=False)


def test_header_check_keeps_scanning_fast(sample_dir: Path) -> None:
    start = time.perf_counter()
    ds = data.scan(sample_dir)
    assert time.perf_counter() - start < 2.0
    assert len(ds.readable) == 1000 and all(ds.readable)


# 3. ONNX input that contradicts what ptq feeds


@pytest.mark.parametrize(
    ("name", "input_size", "match"),
    [
        ("imagenet224.onnx", 260, r"'input' has shape \(batch, 3, 224, 224\), but input_size=260 makes 260x260 crops: pass input_size=224"),
        ("gray.onnx", None, r"shape \(batch, 1, 224, 224\), but ptq feeds RGB images as NCHW \(N, 3, 224, 224\)"),
        ("nhwc.onnx", None, r"shape \(batch, 224, 224, 3\), but ptq feeds RGB images as NCHW"),
        ("flat.onnx", None, r"shape \(batch, 150528\), but ptq feeds RGB images as NCHW"),
        ("batch1.onnx", None, r"fixed batch size of 1.*dynamic batch axis"),
        ("wide.onnx", None, r"shape \(batch, 3, 224, 300\), but ptq feeds square center crops"),
        ("fp16.onnx", None, r"input 'input' is FLOAT16, but ptq feeds float32 images"),
    ],
    ids=["input_size", "gray", "nhwc", "flat", "static_batch", "non_square", "fp16_input"],
)
def test_onnx_input_that_contradicts_the_crop_is_refused(onnx_dir: Path, small_dir: Path, name: str, input_size: int | None, match: str) -> None:
    refused(RunConfig(model=str(onnx_dir / name), data=small_dir, input_size=input_size, **QUICK), match)


def test_onnx_with_dynamic_sides_takes_any_input_size(onnx_dir: Path) -> None:
    export.check_classifier(onnx_dir / "any_side.onnx", 260, accuracy=True)
    export.check_classifier(onnx_dir / "imagenet224.onnx", 224, accuracy=True)


# 4. ONNX output that is not ImageNet class scores


@pytest.mark.parametrize(
    ("name", "shape"), [("ten_classes.onnx", r"\(batch, 10\)"), ("image_out.onnx", r"\(batch, 3, 224, 224\)")], ids=["10_classes", "image"]
)
def test_non_imagenet_output_needs_weights_random(onnx_dir: Path, small_dir: Path, name: str, shape: str) -> None:
    cfg = RunConfig(model=str(onnx_dir / name), data=small_dir, **QUICK)
    refused(cfg, rf"{name} outputs shape {shape}, not scores for the 1000 ImageNet classes \(N, 1000\), .*: run it with weights=random")
    export.check_classifier(onnx_dir / name, 224, accuracy=False)


# 5. corrupt torchvision checkpoints


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return checkpoints


def test_corrupt_torchvision_checkpoint_is_refused(torch_home: Path, small_dir: Path) -> None:
    ckpt = torch_home / "resnet18-f37072fd.pth"
    ckpt.write_bytes(os.urandom(4096))
    message = refused(RunConfig(model="r18", data=small_dir, precision="fp32", **QUICK), "corrupt or incomplete")
    assert message == (
        f"checkpoint {ckpt} is corrupt or incomplete (its SHA-256 does not start with f37072fd): "
        "delete it and download it again, or run with weights=random"
    )


def test_unloadable_checkpoint_with_the_right_hash_is_refused(
    tmp_path: Path, torch_home: Path, small_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    content = b"not a pickle"
    named = tmp_path / f"anything-{hashlib.sha256(content).hexdigest()[:8]}.pth"
    named.write_bytes(content)
    models.verify_checkpoint(named)
    shutil.copyfile(named, torch_home / "resnet18-f37072fd.pth")
    monkeypatch.setattr(models, "verify_checkpoint", lambda _path: None)
    cfg = RunConfig(model="r18", data=small_dir, precision="fp32", **QUICK)
    refused(cfg, r"checkpoint .*resnet18-f37072fd.pth could not be loaded \(UnpicklingError.*delete it")


# 6. threads


@pytest.mark.parametrize("threads", [-1, (os.cpu_count() or 1) + 1, 1000])
def test_threads_outside_the_cores_are_refused(threads: int, onnx_dir: Path, small_dir: Path) -> None:
    cpus = os.cpu_count() or 1
    cfg = RunConfig(model=str(onnx_dir / "imagenet224.onnx"), data=small_dir, threads=threads, **QUICK)
    refused(cfg, rf"threads={threads} must be between 0 and {cpus}.*0 = every core")
    for ok in (0, 1, cpus):
        RunConfig(model="lite0", data=small_dir, threads=ok).validate()


def test_torch_backend_refuses_an_onnx_file_before_a_run(onnx_dir: Path, small_dir: Path) -> None:
    cfg = RunConfig(model=str(onnx_dir / "imagenet224.onnx"), backend="torch", precision="fp32", data=small_dir, **QUICK)
    refused(cfg, "the torch backend needs a torch model.*not an .onnx file: use backend=ort")


# the real command line


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    quick = ["--min-queries", "4", "--min-duration-s", "0", "--blocks", "2", "--warmup", "1"]
    return subprocess.run([str(BIN / "ptq"), "run", *args, *quick], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    ("args", "start"),
    [
        (("--threads", "-1"), "error: threads=-1 must be between 0 and"),
        (("--calib-size", "0"), "error: calib_size=0: precision=int8 needs calibration images"),
        (("--input-size", "260"), "error: imagenet224.onnx's input 'input' has shape (batch, 3, 224, 224), but input_size=260"),
    ],
    ids=["threads", "calib_size", "input_size"],
)
def test_cli_refuses_in_one_line_with_status_2(onnx_dir: Path, small_dir: Path, args: tuple[str, ...], start: str) -> None:
    out = _cli("--model", str(onnx_dir / "imagenet224.onnx"), "--data", str(small_dir), "--calib-size", "4", *args)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2, out.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(start), out.stderr
    assert no_runs()


def test_cli_refuses_unreadable_data(onnx_dir: Path, garbage_dir: Path) -> None:
    out = _cli("--model", str(onnx_dir / "imagenet224.onnx"), "--data", str(garbage_dir), "--calib-size", "4")
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2, out.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: none of the 12 images in data folder"), out.stderr
    assert no_runs()


def _one_line(out: subprocess.CompletedProcess[str]) -> str:
    """The one stderr line of a refused command (status 2)."""
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-3000:]
    return lines[0]


def test_mlflow_3_file_store_is_one_line_naming_the_switch(onnx_dir: Path, small_dir: Path, tmp_path: Path) -> None:
    """MLflow 3 opens its file store only with MLFLOW_ALLOW_FILE_STORE=true: `ptq run` and `ptq report` say so in one line, having made nothing."""
    uri = (tmp_path / "mlruns").as_uri()
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_ALLOW_FILE_STORE"}, "MLFLOW_TRACKING_URI": uri}
    run = subprocess.run([str(BIN / "ptq"), "run", "--model", str(onnx_dir / "imagenet224.onnx"), "--data", str(small_dir), "--calib-size", "4"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    rep = subprocess.run([str(BIN / "ptq"), "report", "--out", str(tmp_path / "rep")], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    expected = f"error: MLFLOW_TRACKING_URI={uri} is MLflow's file store, which MLflow {mlflow.__version__} opens only with MLFLOW_ALLOW_FILE_STORE=true: set that"
    assert _one_line(run).startswith(expected) and _one_line(rep).startswith(expected)
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "rep").exists()


def test_report_out_that_is_a_file_or_unwritable_is_one_line(tmp_path: Path) -> None:
    """Checked before any run is read (there is none here: the folder's error comes first)."""
    (tmp_path / "notes.txt").write_text("mine")

    def report(out: str) -> str:
        return _one_line(subprocess.run([str(BIN / "ptq"), "report", "--out", out], capture_output=True, text=True, timeout=300, cwd=tmp_path))

    assert report("notes.txt") == "error: --out notes.txt is a file: name a folder for the report (it is created if missing)"
    assert report("notes.txt/rep") == f"error: --out notes.txt/rep is inside {tmp_path / 'notes.txt'}, which is a file: name a folder for the report"
    assert report("/proc/ptq-report").startswith("error: --out /proc/ptq-report cannot be written (making a folder in /proc: ")
    assert (tmp_path / "notes.txt").read_text() == "mine" and not list(tmp_path.glob("rep*"))
