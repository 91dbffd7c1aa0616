"""The accuracy-budget search: candidate order, early stop, exhaustive choice, closest when nothing fits, the
Pareto front; trials are real MLflow child runs whose drop and latency a fake measurement sets."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from ptq import tune
from ptq.config import RunConfig
from ptq.errors import PtqError

pytestmark = pytest.mark.device  # torch-free

# (drop in points, p50 ms) each configuration "measures"
MEASURED = {
    "minmax/per-tensor/uint8/float 0": (2.0, 2.0),
    "entropy/per-tensor/uint8/float 0": (1.5, 2.1),
    "minmax/per-tensor/uint8/float 2": (0.4, 2.4),
    "entropy/per-tensor/uint8/float 2": (0.2, 2.3),
    "minmax/per-tensor/uint8/float 4": (0.1, 2.2),  # faster than both float-2 ones: latency noise happens
    "entropy/per-tensor/uint8/float 4": (-0.1, 2.9),
}


def fake_trial(cfg: RunConfig, tags: Dict[str, str], parent: str) -> str:
    """A child run as pipeline.run would leave it, with the drop and p50 this configuration 'measures'."""
    label = tags["ptq.tune_trial"]
    drop, p50 = MEASURED[label]
    client = MlflowClient()
    run = client.create_run(client.get_run(parent).info.experiment_id, tags={"mlflow.parentRunId": parent, **tags})
    for k, v in cfg.options.items():
        client.log_param(run.info.run_id, k, v)
    for k, v in {"acc/top1_drop_pt": drop, "latency/p50_ms": p50, "speedup/p50": 5.0 / p50}.items():
        client.log_metric(run.info.run_id, k, v)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def candidates() -> list:
    return tune.space(["minmax", "entropy"], [False], ["uint8"], [4, 0, 2])


def base(small_dir: Path) -> RunConfig:
    return RunConfig(model="lite0", data=small_dir)


def test_space_puts_fewer_float_nodes_first() -> None:
    assert [c.label() for c in candidates()] == list(MEASURED)
    assert candidates()[3].options() == {"calib_method": "entropy", "per_channel": "false", "activation_type": "uint8", "keep_float": "2"}


def test_guided_search_stops_at_the_first_candidate_within_budget(small_dir: Path) -> None:
    result = tune.search(base(small_dir), 0.3, candidates(), run_trial=fake_trial)
    assert [t.candidate.label() for t in result.trials] == list(MEASURED)[:4]  # stops at entropy/float 2
    assert result.chosen is result.trials[3] and result.chosen.drop_pt == 0.2
    children = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert sorted(children["params.keep_float"].fillna("0")) == ["0", "0", "2", "2"]
    parent = mlflow.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["ptq.kind"] == "tune" and parent.data.metrics["tune/trials"] == 4
    assert parent.data.tags["tune.result"].startswith("chosen entropy/per-tensor/uint8/float 2: drop 0.20 points <= 0.3, p50 2.300 ms")
    table = mlflow.load_table("tune.json", run_ids=[result.parent_run_id])
    assert table["within_budget"].tolist() == [False, False, False, True] and table["pareto"].tolist() == [True, True, False, True]


def test_exhaustive_search_picks_the_fastest_within_budget(small_dir: Path) -> None:
    result = tune.search(base(small_dir), 0.3, candidates(), exhaustive=True, run_trial=fake_trial)
    assert len(result.trials) == 6 and result.chosen is not None
    assert result.chosen.candidate.label() == "minmax/per-tensor/uint8/float 4"  # 2.2 ms beats the guided choice's 2.3
    assert [t.candidate.label() for t in result.front] == ["minmax/per-tensor/uint8/float 0", "entropy/per-tensor/uint8/float 0", "minmax/per-tensor/uint8/float 4", "entropy/per-tensor/uint8/float 4"]


def test_no_candidate_within_budget_names_the_closest(small_dir: Path) -> None:
    result = tune.search(base(small_dir), 0.0, tune.space(["minmax"], [False], ["uint8"], [0, 2]), run_trial=fake_trial)
    assert result.chosen is None and len(result.trials) == 2
    assert result.verdict() == f"no configuration within 0 points of top-1; the closest is minmax/per-tensor/uint8/float 2: drop 0.40 points, p50 2.400 ms, run {result.trials[1].run_id}"
    assert mlflow.get_run(result.parent_run_id).data.tags["tune.met_budget"] == "false"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda b: tune.search(b, -0.5, candidates()), r"max_drop=-0.5: the budget is the top-1 drop allowed, in points: give 0 or more"),
        (lambda b: tune.search(RunConfig(model="lite0", data=b.data, weights="random"), 0.3, candidates()), "needs backend=ort and weights=pretrained"),
        (lambda b: tune.search(RunConfig(model="lite0", data=b.data, options={"calib_method": "entropy"}), 0.3, candidates()), "tune searches calib_method itself"),
        (lambda b: tune.space(["minmax"], [True], ["uint8"], [-1]), r"keep_float counts \[-1\] must be 0 or more"),
        (lambda b: tune.search(b, 0.3, tune.space(["magic"], [True], ["uint8"], [0])), "unknown calib_method 'magic'"),
    ],
)
def test_bad_input_fails_before_any_run(small_dir: Path, call: object, message: str) -> None:
    with pytest.raises(PtqError, match=message):
        call(base(small_dir))  # type: ignore[operator]
    assert mlflow.search_runs(search_all_experiments=True).empty


def test_toolkit_techniques_are_candidates_beside_ort_s(small_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    space = tune.space(["minmax"], [False], ["uint8"], [0, 2], ["quark+adaround+iterations=50", "nncf+bias_correction=full"])
    assert [c.label() for c in space] == ["minmax/per-tensor/uint8/float 0", "quark+adaround+iterations=50", "nncf+bias_correction=full", "minmax/per-tensor/uint8/float 2"]
    monkeypatch.setitem(MEASURED, "quark+adaround+iterations=50", (0.1, 2.5))
    monkeypatch.setitem(MEASURED, "nncf+bias_correction=full", (0.0, 6.0))
    seen = {}

    def trial(cfg: RunConfig, tags: Dict[str, str], parent: str) -> str:
        seen[tags["ptq.tune_trial"]] = (cfg.quantizer, cfg.options)
        return fake_trial(cfg, tags, parent)

    result = tune.search(base(small_dir), 0.3, space, exhaustive=True, run_trial=trial)
    assert seen["quark+adaround+iterations=50"] == ("quark", {"adaround": "true", "iterations": "50"})
    assert seen["nncf+bias_correction=full"] == ("nncf", {"bias_correction": "full"})
    assert seen["minmax/per-tensor/uint8/float 0"][0] == "ort"
    assert result.chosen is not None and result.chosen.candidate.label() == "quark+adaround+iterations=50"  # within budget, faster than nncf's
    with pytest.raises(PtqError, match="--quantizers takes toolkit techniques"):
        tune.space(["minmax"], [False], ["uint8"], [0], ["ort+per_channel=false"])
