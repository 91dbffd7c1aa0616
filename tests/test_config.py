"""Each run parameter is written once, in RunConfig: the CLI and MLproject must offer it with the same default."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
import yaml

from ptq.backends import BACKENDS, options_class
from ptq.options import option_params, user_options
from ptq.cli import app
from ptq.config import RunConfig

pytestmark = pytest.mark.device  # torch-free: the Jetson lanes of .ci/run run it too

ROOT = Path(__file__).resolve().parents[1]
NOT_IN_MLPROJECT = {"experiment", "progress"}  # `mlflow run --experiment-name`; a terminal
BACKEND_OPTIONS = {f.name for b in BACKENDS for f in user_options(options_class(b))}  # unset: the backend's default


def _same(a: object, b: object) -> bool:
    try:
        return float(a) == float(b)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(a).lower() == str(b).lower()


def defaults() -> dict[str, str]:
    """RunConfig's own defaults, spelled as params (the CLI's spelling: 0 = default, true/false)."""
    params = RunConfig(model="m").params()
    params.pop("threads_used")
    params.pop("model")
    params.update(input_size="0", mean="", std="")
    return {k: v for k, v in params.items() if k not in option_params(RunConfig(model="m").backend_options())}


def test_cli_offers_every_run_parameter_with_its_default() -> None:
    command = typer.main.get_command(app).commands["run"]  # type: ignore[attr-defined]
    cli = {p.name: p.default for p in command.params}
    missing = set(defaults()) - set(cli) - {"data"}
    assert not missing
    wrong = {k: (v, cli[k]) for k, v in defaults().items() if k in cli and cli[k] is not None and not _same(v, cli[k])}
    assert not wrong
    assert {k: cli.get(k, "missing") for k in BACKEND_OPTIONS} == dict.fromkeys(BACKEND_OPTIONS)  # unset = the backend's default


def test_mlproject_offers_every_run_parameter_with_its_default() -> None:
    main = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["main"]
    mlproject = {k: v.get("default") for k, v in main["parameters"].items()}
    expected = {k: v for k, v in defaults().items() if k not in NOT_IN_MLPROJECT and k != "data"}
    assert set(expected) <= set(mlproject), set(expected) - set(mlproject)
    wrong = {k: (v, mlproject[k]) for k, v in expected.items() if not _same(v, mlproject[k])}
    assert not wrong
    assert {k: mlproject.get(k, "missing") for k in BACKEND_OPTIONS} == dict.fromkeys(BACKEND_OPTIONS, "")
    for name in mlproject:  # and the command passes each one on
        assert f"{{{name}}}" in main["command"]


@pytest.mark.parametrize(("field", "value", "message"), [("blocks", 1, "blocks=1 must be at least 2"), ("min_queries", 0, "min_queries=0 must be at least 1"), ("min_duration_s", -1, "min_duration_s=-1 must be 0 or more")])
def test_latency_method_is_validated(field: str, value: object, message: str, small_dir: Path) -> None:
    from ptq.errors import PtqError

    with pytest.raises(PtqError, match=message):
        RunConfig(model="lite0", data=small_dir, **{field: value}).validate()  # type: ignore[arg-type]


def test_a_run_logs_only_its_own_backends_options(small_dir: Path) -> None:
    ort = RunConfig(model="lite0", data=small_dir, options={"calib_method": "entropy"}).params()
    trt = RunConfig(model="lite0", data=small_dir, backend="tensorrt", options={"workspace_mb": "2048"}).params()
    assert ort["calib_method"] == "entropy" and ort["per_channel"] == "true" and "workspace_mb" not in ort and "int8_mode" not in ort
    assert trt["workspace_mb"] == "2048" and trt["int8_mode"] == "auto" and "per_channel" not in trt and "activation_type" not in trt
