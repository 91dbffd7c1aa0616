"""Shared fixtures: the real ImageNet sample from ../shared, a fresh MLflow store per test, a shared tensor cache."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest

SAMPLE = Path(os.environ.get("PTQ_TEST_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenet-sample-1k"))


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The 1000 real ImageNet images (one per class) that every machine has beside the project."""
    if not SAMPLE.is_dir():
        pytest.fail(f"{SAMPLE} is missing: the tests need ../shared/data/imagenet-sample-1k (or PTQ_TEST_DATA)")
    return SAMPLE


@pytest.fixture(scope="session")
def small_dir(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A flat folder linking 300 of the real images, so end-to-end tests stay fast."""
    folder = tmp_path_factory.mktemp("imagenet-300")
    for f in sorted(sample_dir.iterdir())[::3][:300]:
        (folder / f.name).symlink_to(f)
    return folder


@pytest.fixture(autouse=True)
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Each test logs to its own real MLflow store (SQLite + artifact folder) in a temp dir."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("PTQ_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ptq-cache"))
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id="0")  # forget the experiment an earlier test made active
    yield tmp_path
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(scope="session")
def lite0_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """EfficientNet-Lite0 with its real ImageNet weights as an ONNX file carrying its preprocessing: the file a
    torch-free device runs. Exported here with torch, or (the Jetson lanes of .ci/run) given by PTQ_TEST_LITE0_ONNX."""
    given = os.environ.get("PTQ_TEST_LITE0_ONNX")
    if given:
        if not Path(given).is_file():
            pytest.fail(f"PTQ_TEST_LITE0_ONNX={given} does not exist: export it with `ptq export --model lite0 --out {given}`")
        return Path(given)
    from ptq import pipeline

    return pipeline.export_model("lite0", "pretrained", tmp_path_factory.mktemp("onnx") / "lite0.onnx")
