"""Named phases of a run (export, calibrate, quantize, build, evaluate, latency...), timed and announced."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Callable, Optional

Listener = Callable[[Optional[str]], None]

# The phases that make up compression, in run order; their times sum to compress/total_s. A toolkit quantizer
# (ptq.quantizers.toolkit) adds its start-up and each technique it applies.
TECHNIQUE_PHASES = ("toolkit_start", "cle", "smoothquant", "bias_correction", "adaround", "adaquant", "seq_mse", "write")
COMPRESS_PHASES = ("export", "sensitivity", "preprocess", *TECHNIQUE_PHASES[:1], "calibrate", *TECHNIQUE_PHASES[1:], "quantize", "select", "convert", "build")


class Phases:
    """Times each phase with a monotonic clock and tells listeners (the monitor) when one starts or ends."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.current: str | None = None
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        """Call `listener(phase)` at every boundary; `None` means between phases."""
        self._listeners.append(listener)

    def _announce(self, phase: str | None) -> None:
        self.current = phase
        for listener in self._listeners:
            listener(phase)

    def carve(self, source: str, target: str, seconds: float) -> None:
        """Attribute `seconds` of phase `source` to `target`: for work a library does inside one call
        (TensorRT calibrates inside its engine build) that ptq can time but not wrap."""
        seconds = min(seconds, self.seconds.get(source, 0.0))
        self.seconds[source] = self.seconds.get(source, 0.0) - seconds
        self.seconds[target] = self.seconds.get(target, 0.0) + seconds

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        """Run the body as phase `name`; repeated phases add up."""
        outer = self.current
        self._announce(name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self._announce(outer)
