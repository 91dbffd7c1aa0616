"""Accuracy scoring and latency statistics on a session with known outputs."""

from __future__ import annotations

import numpy as np

from ptq import bench
from ptq.backends import Session
from ptq.data import Tensors
from ptq.models import Transform


class Lookup(Session):
    """Returns fixed logits per image, recognised by its first pixel value (the image index)."""

    def __init__(self, logits: np.ndarray) -> None:
        self.logits = logits

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.logits[np.rint(batch[:, 0, 0, 0]).astype(int)]


def test_top5_matches_a_full_sort_and_scores_top1_top5() -> None:
    rng = np.random.default_rng(0)
    n = 70
    logits = rng.normal(size=(n, 1000)).astype(np.float32)
    pixels = np.zeros((n, 3, 2, 2), np.uint8)
    pixels[:, 0, 0, 0] = np.arange(n)
    tensors = Tensors(pixels, np.ones(n, bool), Transform(2, 2, (0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255)), from_cache=False)
    expected = np.argsort(-logits, axis=1)[:, :5]
    labels = expected[:, 0].copy()
    labels[::2] = expected[::2, 3]  # half the images: right in the top-5 but not top-1
    acc = bench.evaluate(Lookup(logits), tensors, list(range(n)), labels, batch_size=32, progress=False)
    np.testing.assert_array_equal(acc.top5_pred, expected)
    assert acc.top1 == 0.5 and acc.top5 == 1.0


def test_latency_percentiles_and_throughput() -> None:
    class Zeros(Session):
        def run(self, batch: np.ndarray) -> np.ndarray:
            return np.zeros((len(batch), 1000), np.float32)

    lat = bench.measure_latency(Zeros(), np.zeros((4, 3, 2, 2), np.float32), 50)
    assert len(lat.samples_ms) == 50 and lat.p50_ms <= lat.p90_ms <= lat.p99_ms
    assert lat.img_s > 0 and set(lat.metrics()) >= {"latency/p50_ms", "latency/p99_ms", "throughput/img_s"}
