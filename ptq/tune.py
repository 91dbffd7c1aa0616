"""The fastest INT8 configuration within an accuracy budget: candidates tried cheapest first, each a child run.

The space is calibration method x per-channel weights x activation type x nodes kept in float (the k that
sensitivity ranks first) of the backend's own quantizer, and toolkit techniques (`quark+adaround`, ...) beside them.
Candidates are ordered by how much stays in float (fewer float nodes run faster; a toolkit's keep none), then as given; the guided search stops at the first candidate whose paired top-1 drop is within the budget.
`exhaustive` runs them all and picks the fastest within budget by measured p50, which shows what stopping early
saved and whether it chose differently.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional

from ptq import quantizers
from ptq.config import RunConfig
from ptq.errors import PtqError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """One configuration of the space."""

    calib_method: str = ""
    per_channel: bool = True
    activation_type: str = ""
    keep_float: int = 0  # nodes kept in float: the first k of the sensitivity ranking
    technique: str = ""  # a toolkit quantizer's spec (quantizers.parse_spec), in place of the ort settings above

    def quantizer(self) -> str:
        """The quantizer this candidate runs."""
        return quantizers.parse_spec(self.technique)[0] if self.technique else quantizers.BUILT_IN

    def options(self) -> Dict[str, str]:
        """The ort backend options of this candidate, or its toolkit's."""
        if self.technique:
            return quantizers.parse_spec(self.technique)[1]
        out = {"calib_method": self.calib_method, "per_channel": str(self.per_channel).lower(), "activation_type": self.activation_type}
        return {**out, "keep_float": str(self.keep_float)} if self.keep_float else out

    def label(self) -> str:
        """Short name: minmax/per-channel/uint8/float 2, or the toolkit's spec."""
        return self.technique or f"{self.calib_method}/{'per-channel' if self.per_channel else 'per-tensor'}/{self.activation_type}/float {self.keep_float}"


def space(calib_methods: List[str], per_channel: List[bool], activation_types: List[str], keep_float: List[int], techniques: Optional[List[str]] = None) -> List[Candidate]:
    """Every combination, fewest float nodes first (the toolkits' techniques after ort's with none kept), then in the order given."""
    if not (calib_methods and per_channel and activation_types and keep_float):
        raise PtqError("the search space is empty: give at least one calibration method, per-channel value, activation type and keep_float count")
    if any(k < 0 for k in keep_float):
        raise PtqError(f"keep_float counts {keep_float} must be 0 or more")
    toolkits = [Candidate(technique=t) for t in techniques or []]
    if any(c.quantizer() == quantizers.BUILT_IN for c in toolkits):
        raise PtqError("--quantizers takes toolkit techniques (nncf..., quark..., aimet...): ort's space is --calib-methods, --per-channel-values, ...")
    combos = itertools.product(sorted(set(keep_float)), calib_methods, per_channel, activation_types)
    grid = [Candidate(c, p, a, k) for k, c, p, a in combos]
    unkept = sum(c.keep_float == 0 for c in grid)
    return grid[:unkept] + toolkits + grid[unkept:]


@dataclass
class Trial:
    """A candidate's child run and what it measured."""

    candidate: Candidate
    run_id: str
    drop_pt: float
    p50_ms: float
    speedup: float
    seconds: float

    def within(self, budget: float) -> bool:
        """Whether its paired top-1 drop (points) is within `budget`."""
        return self.drop_pt <= budget


@dataclass
class Search:
    """A finished search: every trial, the choice (None where nothing met the budget), its cost."""

    budget: float
    exhaustive: bool
    trials: List[Trial]
    chosen: Optional[Trial]
    seconds: float
    space_size: int
    parent_run_id: str = ""
    front: List[Trial] = field(default_factory=list)

    def closest(self) -> Trial:
        """The trial with the smallest drop (what to report where nothing met the budget)."""
        return min(self.trials, key=lambda t: t.drop_pt)

    def verdict(self) -> str:
        """One line: what was chosen, or that nothing met the budget and the closest."""
        if self.chosen is not None:
            c = self.chosen
            return f"chosen {c.candidate.label()}: drop {c.drop_pt:.2f} points <= {self.budget:g}, p50 {c.p50_ms:.3f} ms ({c.speedup:.2f}x fp32), run {c.run_id}"
        c = self.closest()
        return f"no configuration within {self.budget:g} points of top-1; the closest is {c.candidate.label()}: drop {c.drop_pt:.2f} points, p50 {c.p50_ms:.3f} ms, run {c.run_id}"

    def table(self) -> Dict[str, list]:  # type: ignore[type-arg]
        """Every trial in the order run: configuration, drop, p50, speed-up, seconds, within budget, on the front."""
        front = {t.run_id for t in self.front}
        return {
            "trial": list(range(1, len(self.trials) + 1)),
            "configuration": [t.candidate.label() for t in self.trials],
            "top1_drop_pt": [round(t.drop_pt, 3) for t in self.trials],
            "p50_ms": [round(t.p50_ms, 4) for t in self.trials],
            "speedup": [round(t.speedup, 3) for t in self.trials],
            "seconds": [round(t.seconds, 1) for t in self.trials],
            "within_budget": [t.within(self.budget) for t in self.trials],
            "pareto": [t.run_id in front for t in self.trials],
            "run_id": [t.run_id for t in self.trials],
        }


def pareto(trials: List[Trial]) -> List[Trial]:
    """The trials no other beats on both drop and p50 (lower is better on both), by p50."""
    return sorted(
        (t for t in trials if not any(o.drop_pt <= t.drop_pt and o.p50_ms <= t.p50_ms and (o.drop_pt, o.p50_ms) != (t.drop_pt, t.p50_ms) for o in trials)),
        key=lambda t: t.p50_ms,
    )


RunTrial = Callable[[RunConfig, Dict[str, str], str], str]  # (config, tags, parent run id) -> run id


def search(base: RunConfig, budget: float, candidates: List[Candidate], exhaustive: bool = False, run_trial: Optional[RunTrial] = None) -> Search:
    """Run candidates as child runs of one `tune` run until one is within `budget` points of paired top-1 drop
    (all of them when `exhaustive`), and log the trials, the Pareto front of latency vs drop and the choice."""
    from ptq import models, pipeline, tracking

    if budget < 0 or math.isnan(budget):
        raise PtqError(f"max_drop={budget}: the budget is the top-1 drop allowed, in points: give 0 or more")
    if base.backend != "ort" or base.weights != "pretrained":
        raise PtqError("tune measures top-1 drop with ONNX Runtime's quantizer: it needs backend=ort and weights=pretrained")
    searched = sorted(set(base.options) & set(Candidate("minmax", True, "uint8", 1).options()))
    if searched:
        raise PtqError(f"tune searches {', '.join(searched)} itself: drop them and give the search space instead (--calib-methods, ...)")
    configs = [replace(base, precision="int8", quantizer=c.quantizer(), options={**base.options, **c.options()}) for c in candidates]
    for cfg in configs:
        cfg.validate()
    spec = models.resolve(base.model, base.input_size, base.mean, base.std)
    if spec.onnx_path is not None:
        from ptq.sensitivity import require_weighted

        require_weighted(spec.onnx_path)
    trial_run = run_trial or (lambda cfg, tags, parent: pipeline.run(cfg, tags, parent))
    tracking.select_store()
    params = {**{k: v for k, v in base.params().items() if k in ("model", "data", "calib_size", "eval_size", "split_seed", "batch_size", "threads_used")},
              "max_drop": f"{budget:g}", "exhaustive": str(exhaustive).lower(), "space": ";".join(c.label() for c in candidates)}
    started = time.perf_counter()
    with tracking.run(base.experiment, f"{spec.name}-tune", params, {"ptq.kind": "tune"}) as rec:
        trials: List[Trial] = []
        for number, (candidate, cfg) in enumerate(zip(candidates, configs), 1):
            log.info("tune %d/%d: %s", number, len(candidates), candidate.label())
            t0 = time.perf_counter()
            run_id = trial_run(cfg, {"ptq.tune_trial": candidate.label()}, rec.run_id)
            metrics = tracking.stored_run(run_id).data.metrics
            trials.append(Trial(candidate, run_id, metrics["acc/top1_drop_pt"], metrics["latency/p50_ms"], metrics["speedup/p50"], time.perf_counter() - t0))
            if trials[-1].within(budget) and not exhaustive:
                break
        passing = [t for t in trials if t.within(budget)]
        chosen = (min(passing, key=lambda t: t.p50_ms) if exhaustive else passing[0]) if passing else None
        result = Search(budget, exhaustive, trials, chosen, time.perf_counter() - started, len(candidates), rec.run_id, pareto(trials))
        rec.table(result.table(), "tune.json")
        rec.metrics({"tune/trials": len(trials), "tune/seconds": result.seconds, "tune/space": len(candidates)})
        pick = chosen or result.closest()
        rec.metrics({"tune/chosen_top1_drop_pt": pick.drop_pt, "tune/chosen_p50_ms": pick.p50_ms, "tune/chosen_speedup": pick.speedup})
        rec.tags({"tune.result": result.verdict(), "tune.chosen_run": pick.run_id, "tune.met_budget": str(chosen is not None).lower()})
        if importlib.util.find_spec("matplotlib") is not None:  # as the run's and sensitivity's plots
            with tempfile.TemporaryDirectory(prefix="ptq-tune-") as tmp:
                rec.artifact(plot(result, Path(tmp) / "pareto.png"))
        else:
            rec.tags({"tune.plot": "none: matplotlib is not installed (pip install 'ptq[report]')"})
        return result


def plot(result: Search, path: Path) -> Path:
    """Latency p50 against top-1 drop for every trial, the Pareto front joined, the budget and the choice marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t in result.trials:
        ax.scatter(t.drop_pt, t.p50_ms, color="tab:green" if t.within(result.budget) else "tab:grey", zorder=3)
        ax.annotate(t.candidate.label(), (t.drop_pt, t.p50_ms), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.plot([t.drop_pt for t in result.front], [t.p50_ms for t in result.front], color="tab:blue", label="Pareto front")
    ax.axvline(result.budget, color="tab:red", linestyle="--", label=f"budget {result.budget:g} points")
    if result.chosen is not None:
        ax.scatter(result.chosen.drop_pt, result.chosen.p50_ms, s=160, facecolors="none", edgecolors="black", label="chosen", zorder=4)
    ax.set_xlabel("top-1 drop vs fp32 (points, same images)")
    ax.set_ylabel("latency p50 (ms)")
    ax.set_title(f"{'exhaustive' if result.exhaustive else 'guided'} search: {len(result.trials)} of {result.space_size} trials, {result.seconds:.0f} s")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
