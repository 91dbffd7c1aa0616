"""Accuracy (top-1/top-5 with per-image predictions) and latency (alternating blocks, percentiles, block bootstrap)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Callable, ContextManager, Optional, Union
from dataclasses import dataclass

import numpy as np
from scipy import special, stats

from ptq.backends import Session
from ptq.data import Tensors
from ptq.progress import track
from ptq.worker import InProcess, Timer
from ptq.worker import warm_up as warm_up


FIDELITY_IMAGES = 1000  # images whose whole class distribution is kept for the KL to FP32 (4 MB a model): memory stays flat


@dataclass
class Accuracy:
    """Top-k accuracy as fractions, the top-5 class indices of every image (rows follow `indices`), and the log class
    probabilities of the first FIDELITY_IMAGES images (for the label-free fidelity to FP32)."""

    top1: float
    top5: float
    top5_pred: np.ndarray  # (N, 5) int, best first
    labels: np.ndarray  # (N,) int
    log_probs: Optional[np.ndarray] = None  # (min(N, FIDELITY_IMAGES), classes) float32


def fidelity(model: Accuracy, reference: Accuracy) -> dict[str, float]:
    """How far the compressed model's outputs moved from FP32's on the same images, without labels: top-1 agreement
    (every image) and the mean KL divergence KL(fp32 || model) of the class distributions (the first FIDELITY_IMAGES)."""
    out = {"fidelity/top1_agreement": float((model.top5_pred[:, 0] == reference.top5_pred[:, 0]).mean())}
    if model.log_probs is not None and reference.log_probs is not None:
        ref = reference.log_probs.astype(np.float64)
        out["fidelity/kl_mean"] = float((np.exp(ref) * (ref - model.log_probs)).sum(axis=1).mean())
    return out


def evaluate(
    session: Session,
    tensors: Tensors,
    indices: list[int],
    labels: np.ndarray,
    batch_size: int,
    description: str = "evaluate",
    progress: bool = True,
) -> Accuracy:
    """Classify the images at `indices` in batches and score them against `labels`."""
    starts = range(0, len(indices), batch_size)
    preds, kept = [], []
    for s in track(starts, total=len(starts), description=description, enabled=progress):
        logits = session.run(tensors.batch(indices[s : s + batch_size]))
        top5 = np.argpartition(-logits, 5, axis=1)[:, :5]  # the 5 best unordered, then ordered: no full sort
        preds.append(np.take_along_axis(top5, np.argsort(-np.take_along_axis(logits, top5, axis=1), axis=1), axis=1))
        if s < FIDELITY_IMAGES:
            kept.append(special.log_softmax(logits[: FIDELITY_IMAGES - s].astype(np.float64), axis=1).astype(np.float32))
    session.gpu_ms()  # evaluation's runs are no latency samples: a device clock's record starts afresh
    top5 = np.concatenate(preds)
    hit1 = top5[:, 0] == labels
    hit5 = (top5 == labels[:, None]).any(axis=1)
    return Accuracy(float(hit1.mean()), float(hit5.mean()), top5, labels, np.concatenate(kept) if kept else None)


def mcnemar_p(correct: np.ndarray, fp32_correct: np.ndarray) -> float:
    """Exact McNemar p-value for FP32 vs compressed top-1 on the same images (a binomial test on the discordant pairs)."""
    b = int((fp32_correct & ~correct).sum())
    c = int((~fp32_correct & correct).sum())
    return 1.0 if b + c == 0 else float(stats.binomtest(b, b + c, 0.5).pvalue)


@dataclass(frozen=True)
class LatencyMethod:
    """How latency is timed: LoadGen's single stream with a minimum query count *and* a minimum duration,
    the models alternating in blocks so that drift (clocks, heat, other load) hits them alike."""

    warmup: int = 20  # untimed queries per model before the first block
    min_queries: int = 1000  # timed queries per model, at least
    min_duration_s: float = 5.0  # timed seconds per model, at least
    blocks: int = 10  # blocks per model, at least; the confidence interval resamples them
    batch_size: int = 1

    @property
    def block_queries(self) -> int:
        """Queries in one block: the minimum count spread over the minimum number of blocks."""
        return -(-self.min_queries // self.blocks)


@dataclass
class Latency:
    """One model's per-query latencies (ms) and the block each query ran in; where the session has a device clock
    (TensorRT), each query's GPU compute time (ms) too, aligned with `ms`."""

    ms: np.ndarray
    block: np.ndarray
    seconds: float  # wall time of its timed blocks
    batch_size: int
    gpu_ms: Optional[np.ndarray] = None

    def percentiles(self) -> tuple[float, float, float]:
        """p50, p90, p99 over every timed query."""
        p50, p90, p99 = np.percentile(self.ms, [50, 90, 99])
        return float(p50), float(p90), float(p99)

    def block_p50_spread_pct(self) -> float:
        """How much each block's p50 strays from the others: their standard deviation over their mean, in %."""
        medians = np.array([np.median(self.ms[self.block == b]) for b in np.unique(self.block)])
        return float(100 * medians.std(ddof=1) / medians.mean()) if len(medians) > 1 else float("nan")

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Percentiles, mean, spread and throughput; `prefix` names the reference model (fp32_)."""
        p50, p90, p99 = self.percentiles()
        out = {
            f"latency/{prefix}p50_ms": p50,
            f"latency/{prefix}p90_ms": p90,
            f"latency/{prefix}p99_ms": p99,
            f"latency/{prefix}mean_ms": float(self.ms.mean()),
            f"latency/{prefix}block_p50_spread_pct": self.block_p50_spread_pct(),
            f"throughput/{prefix}img_s": self.batch_size * len(self.ms) / self.seconds,
        }
        if self.gpu_ms is not None:
            out[f"latency/{prefix}gpu_compute_p50_ms"] = float(np.median(self.gpu_ms))
        return {k: v for k, v in out.items() if not np.isnan(v)}


Clock = Callable[[], float]
PhaseFactory = Callable[[str], ContextManager[None]]


def time_blocks(
    sessions: Mapping[str, Union[Session, Timer]],
    batch: np.ndarray,
    method: LatencyMethod,
    phase: PhaseFactory | None = None,
    clock: Clock = time.perf_counter,
) -> dict[str, Latency]:
    """Time the sessions in alternating blocks (A B A B ...) on the same batch, after warming each up, until
    every one has both `min_queries` queries and `min_duration_s` seconds in at least `blocks` blocks.
    A session runs in this process, timed by `clock`; a `Timer` (a worker process) runs and times its own queries.
    `phase(name)` wraps each session's warm-up (`<name>warmup`) and blocks (`<name>latency`) for the monitor."""
    phase = phase or (lambda _name: nullcontext())
    timers = {name: s if isinstance(s, Timer) else InProcess(s, batch, clock) for name, s in sessions.items()}
    for name, timer in timers.items():
        with phase(f"{name}warmup"):
            timer.warm_up(method.warmup)
    q = method.block_queries
    ms: dict[str, list[np.ndarray]] = {name: [] for name in timers}
    gpu: dict[str, list[np.ndarray]] = {name: [] for name in timers}
    seconds = dict.fromkeys(timers, 0.0)
    rounds = 0
    while rounds < method.blocks or min(seconds.values()) < method.min_duration_s:
        for name, timer in timers.items():
            with phase(f"{name}latency"):
                block = timer.block(q)
            seconds[name] += block.wall_s
            ms[name].append(block.seconds * 1e3)
            if block.gpu_ms is not None:
                gpu[name].append(block.gpu_ms)
        rounds += 1
    blocks = np.repeat(np.arange(rounds), q)
    return {
        name: Latency(np.concatenate(ms[name]), blocks, seconds[name], len(batch), np.concatenate(gpu[name]) if len(gpu[name]) == rounds else None)
        for name in timers
    }


def speedup_ci(reference: Latency, model: Latency, n_resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % confidence interval of p50(reference) / p50(model) by a bootstrap that resamples whole rounds of
    blocks (each round holds one block of each model, timed side by side), so drift between rounds widens it."""
    rounds = np.unique(model.block)
    ref_blocks = [reference.ms[reference.block == r] for r in rounds]
    blocks = [model.ms[model.block == r] for r in rounds]

    def ratio(idx: np.ndarray) -> float:
        return float(np.median(np.concatenate([ref_blocks[i] for i in idx])) / np.median(np.concatenate([blocks[i] for i in idx])))

    res = stats.bootstrap(
        (np.arange(len(rounds)),), ratio, vectorized=False, n_resamples=n_resamples, method="percentile", random_state=np.random.default_rng(seed)
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)
