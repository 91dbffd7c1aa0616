"""Accuracy (top-1/top-5 with per-image predictions) and latency (warm-up, fixed iterations, percentiles)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ptq.backends import Session
from ptq.data import Tensors
from ptq.progress import track


@dataclass
class Accuracy:
    """Top-k accuracy as fractions, and the top-5 class indices of every image (rows follow `indices`)."""

    top1: float
    top5: float
    top5_pred: np.ndarray  # (N, 5) int, best first
    labels: np.ndarray  # (N,) int


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
    preds = []
    for s in track(starts, total=len(starts), description=description, enabled=progress):
        logits = session.run(tensors.batch(indices[s : s + batch_size]))
        top5 = np.argpartition(-logits, 5, axis=1)[:, :5]  # the 5 best unordered, then ordered: no full sort
        preds.append(np.take_along_axis(top5, np.argsort(-np.take_along_axis(logits, top5, axis=1), axis=1), axis=1))
    top5 = np.concatenate(preds)
    hit1 = top5[:, 0] == labels
    hit5 = (top5 == labels[:, None]).any(axis=1)
    return Accuracy(float(hit1.mean()), float(hit5.mean()), top5, labels)


@dataclass
class Latency:
    """Per-query latency statistics in milliseconds and throughput in images per second."""

    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    img_s: float
    samples_ms: np.ndarray

    def metrics(self) -> dict[str, float]:
        """The DESIGN.md metric names."""
        return {
            "latency/p50_ms": self.p50_ms,
            "latency/p90_ms": self.p90_ms,
            "latency/p99_ms": self.p99_ms,
            "latency/mean_ms": self.mean_ms,
            "latency/std_ms": self.std_ms,
            "throughput/img_s": self.img_s,
        }


def warm_up(session: Session, batch: np.ndarray, queries: int) -> None:
    """Untimed queries that let caches, allocators, JIT and clocks settle before timing."""
    for _ in range(queries):
        session.run(batch)


def measure_latency(session: Session, batch: np.ndarray, iters: int) -> Latency:
    """LoadGen-style single stream: `iters` timed back-to-back queries, each timed on its own."""
    samples = np.empty(iters, dtype=np.float64)
    total_start = time.perf_counter()
    for i in range(iters):
        t0 = time.perf_counter()
        session.run(batch)
        samples[i] = time.perf_counter() - t0
    total = time.perf_counter() - total_start
    ms = samples * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return Latency(float(p50), float(p90), float(p99), float(ms.mean()), float(ms.std(ddof=1) if iters > 1 else 0.0), len(batch) * iters / total, ms)
