"""Accuracy scoring and latency statistics on a session with known outputs."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import numpy as np
import pytest

from ptq import bench
from ptq.backends import Session
from ptq.data import Tensors
from ptq.models import Transform

pytestmark = pytest.mark.device  # torch-free: the Jetson lanes of .ci/run run it too


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
    tensors = Tensors.of(pixels, np.ones(n, bool), Transform(2, 2, (0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255)))
    expected = np.argsort(-logits, axis=1)[:, :5]
    labels = expected[:, 0].copy()
    labels[::2] = expected[::2, 3]  # half the images: right in the top-5 but not top-1
    acc = bench.evaluate(Lookup(logits), tensors, list(range(n)), labels, batch_size=32, progress=False)
    np.testing.assert_array_equal(acc.top5_pred, expected)
    assert acc.top1 == 0.5 and acc.top5 == 1.0


def test_fidelity_is_top1_agreement_and_the_kl_of_fp32s_distribution(monkeypatch: pytest.MonkeyPatch) -> None:
    from scipy import stats

    monkeypatch.setattr(bench, "FIDELITY_IMAGES", 50)  # distributions kept for the first 50 images only
    rng = np.random.default_rng(1)
    n = 70
    fp32 = rng.normal(size=(n, 1000)).astype(np.float32)
    model = fp32 + rng.normal(scale=0.3, size=fp32.shape).astype(np.float32)
    model[:7] = rng.normal(size=(7, 1000))  # 7 images whose outputs quantization scrambled
    pixels = np.zeros((n, 3, 2, 2), np.uint8)
    pixels[:, 0, 0, 0] = np.arange(n)
    tensors = Tensors.of(pixels, np.ones(n, bool), Transform(2, 2, (0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255)))
    labels = np.zeros(n, int)
    ref, mine = (bench.evaluate(Lookup(x), tensors, list(range(n)), labels, batch_size=32, progress=False) for x in (fp32, model))
    assert ref.log_probs is not None and ref.log_probs.shape == (50, 1000)
    got = bench.fidelity(mine, ref)
    assert got["fidelity/top1_agreement"] == float((fp32.argmax(1) == model.argmax(1)).mean())
    softmax = lambda x: np.exp(x - x.max(1, keepdims=True)) / np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True)  # noqa: E731
    want = np.mean([stats.entropy(p, q) for p, q in zip(softmax(fp32[:50].astype(np.float64)), softmax(model[:50].astype(np.float64)))])
    assert got["fidelity/kl_mean"] == pytest.approx(want, rel=1e-4)


class FakeClock:
    """A clock that only moves when a fake session runs."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Timed(Session):
    """Takes `ms` (a number, or a function of how many queries it ran) of fake time per query; logs each call."""

    def __init__(self, name: str, clock: FakeClock, ms: float | Callable[[int], float], calls: list[str]) -> None:
        self.name, self.clock, self.ms, self.calls, self.n = name, clock, ms, calls, 0

    def run(self, batch: np.ndarray) -> np.ndarray:
        ms = self.ms(self.n) if callable(self.ms) else self.ms
        self.clock.now += ms / 1e3
        self.calls.append(self.name)
        self.n += 1
        return np.zeros((len(batch), 1000), np.float32)


def test_blocks_alternate_after_warm_up_and_stop_at_count_and_duration() -> None:
    clock, calls = FakeClock(), []  # type: FakeClock, list[str]
    # warm-up queries are slow (1000 ms): if they leaked into the statistics, p99 would show it
    a = Timed("a", clock, lambda n: 1000.0 if n < 2 else 2.0, calls)
    b = Timed("b", clock, lambda n: 1000.0 if n < 2 else 5.0, calls)
    method = bench.LatencyMethod(warmup=2, min_queries=12, min_duration_s=0.05, blocks=3, batch_size=4)
    assert method.block_queries == 4
    lat = bench.time_blocks({"": a, "fp32_": b}, np.zeros((4, 3, 2, 2), np.float32), method, clock=clock)
    # warm-up a a, b b; then blocks of 4 alternating: a needs 0.05 s / 8 ms per block = 7 rounds (count alone: 3)
    assert calls[:4] == ["a", "a", "b", "b"]
    assert calls[4:] == (["a"] * 4 + ["b"] * 4) * 7
    mine, ref = lat[""], lat["fp32_"]
    assert len(mine.ms) == len(ref.ms) == 28 and list(mine.block) == [r for r in range(7) for _ in range(4)]
    np.testing.assert_allclose(mine.ms, 2.0)
    np.testing.assert_allclose(ref.ms, 5.0)
    assert mine.seconds == pytest.approx(0.056) and ref.seconds == pytest.approx(0.14)
    m = mine.metrics()
    assert m["latency/p99_ms"] == pytest.approx(2.0) and m["throughput/img_s"] == pytest.approx(4 * 28 / 0.056)
    assert ref.metrics("fp32_")["latency/fp32_p50_ms"] == pytest.approx(5.0)


def test_phases_wrap_each_models_warm_up_and_blocks() -> None:
    clock, calls, seen = FakeClock(), [], []  # type: FakeClock, list[str], list[str]

    @contextmanager
    def phase(name: str):  # type: ignore[no-untyped-def]
        seen.append(name)
        yield

    sessions = {"": Timed("a", clock, 1.0, calls), "fp32_": Timed("b", clock, 1.0, calls)}
    bench.time_blocks(sessions, np.zeros((1, 3, 2, 2), np.float32), bench.LatencyMethod(1, 2, 0.0, 2), phase, clock)
    assert seen == ["warmup", "fp32_warmup", "latency", "fp32_latency", "latency", "fp32_latency"]


def test_speedup_interval_resamples_rounds_and_sees_drift() -> None:
    block = np.repeat(np.arange(10), 50)
    reference = bench.Latency(np.full(500, 10.0), block, 5.0, 1)
    steady = bench.Latency(np.full(500, 5.0), block, 2.5, 1)
    assert bench.speedup_ci(reference, steady) == pytest.approx((2.0, 2.0))
    # the compressed model drifts between rounds (4 ms, 6 ms, ...): the interval spans what single rounds show
    drifting = bench.Latency(np.where(block % 2 == 0, 4.0, 6.0), block, 2.5, 1)
    low, high = bench.speedup_ci(reference, drifting)
    assert low == pytest.approx(10 / 6) and high == pytest.approx(10 / 4)
    assert drifting.block_p50_spread_pct() == pytest.approx(100 * np.std([4.0, 6.0] * 5, ddof=1) / 5.0)


def test_latency_stability_flags_a_machine_that_changed_speed() -> None:
    from ptq.pipeline import _stability

    block = np.repeat(np.arange(4), 10)
    steady = bench.Latency(np.full(40, 2.0), block, 1.0, 1)
    flipped = bench.Latency(np.where(block < 2, 5.0, 7.5), block, 1.0, 1)  # fp32 went from 5 to 7.5 ms halfway
    assert _stability({"": steady, "fp32_": steady}) == "stable"
    assert _stability({"": steady, "fp32_": flipped}) == f"unstable: per-block p50 spread fp32 {flipped.block_p50_spread_pct():.1f} %"


class DeviceClock(Session):
    """A session with a device clock, as TrtSession's contract says (ptq/backends/tensorrt.py `gpu_ms`): each run
    records its GPU time, `gpu_ms` returns those since the previous call and clears them. Query i of its life takes
    `gpu[i]` ms on the device; a batch beyond `max_batch` runs in chunks, each recorded, as TrtSession does."""

    def __init__(self, clock: FakeClock, gpu: list[float], max_batch: int = 8) -> None:
        self.clock, self.gpu, self.max_batch, self.n = clock, gpu, max_batch, 0
        self.recorded: list[float] = []

    def run(self, batch: np.ndarray) -> np.ndarray:
        chunks = -(-len(batch) // self.max_batch)
        self.recorded += [self.gpu[self.n] / chunks] * chunks
        self.clock.now += (self.gpu[self.n] + 1.0) / 1e3  # 1 ms of host copies beside the device time
        self.n += 1
        return np.zeros((len(batch), 1000), np.float32)

    def gpu_ms(self) -> list[float] | None:
        out, self.recorded = self.recorded, []
        return out


def test_gpu_times_follow_their_queries_leaving_out_warm_up_and_evaluation() -> None:
    clock = FakeClock()
    model = DeviceClock(clock, [100.0, 100.0] + [2.0, 3.0] * 4)  # 2 slow warm-up queries, then 8 timed
    ref = DeviceClock(clock, [100.0, 100.0] + [6.0] * 8)
    lat = bench.time_blocks({"": model, "fp32_": ref}, np.zeros((1, 3, 2, 2), np.float32), bench.LatencyMethod(2, 8, 0.0, 2), clock=clock)
    mine = lat[""]
    assert mine.gpu_ms is not None and list(mine.gpu_ms) == [2.0, 3.0] * 4 and list(mine.block) == [0] * 4 + [1] * 4
    np.testing.assert_allclose(mine.ms, [3.0, 4.0] * 4)  # end to end: the copies are in it
    assert mine.metrics()["latency/gpu_compute_p50_ms"] == 2.5
    assert lat["fp32_"].metrics("fp32_")["latency/fp32_gpu_compute_p50_ms"] == 6.0
    assert "latency/gpu_compute_p50_ms" not in bench.Latency(mine.ms, mine.block, 1.0, 1).metrics()  # no device clock: no figure
    # evaluation's runs are cleared once it is done, so a session's record never grows outside timing
    evaluated = DeviceClock(clock, [1.0] * 3)
    pixels = np.zeros((3, 3, 2, 2), np.uint8)
    tensors = Tensors.of(pixels, np.ones(3, bool), Transform(2, 2, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))
    bench.evaluate(evaluated, tensors, [0, 1, 2], np.zeros(3, int), batch_size=1, progress=False)
    assert evaluated.recorded == []


def test_a_query_run_in_chunks_sums_its_chunks_gpu_times() -> None:
    clock = FakeClock()
    session = DeviceClock(clock, [4.0, 6.0], max_batch=2)  # a batch of 4 runs as 2 chunks of 2
    block = bench.time_blocks({"": session}, np.zeros((4, 3, 2, 2), np.float32), bench.LatencyMethod(0, 2, 0.0, 2), clock=clock)[""]
    assert block.gpu_ms is not None and list(block.gpu_ms) == [4.0, 6.0]
