"""The monitor's own cost: its CPU use at 1 s, and p50 latency with the monitor on vs off (alternated, one run).

Goals: < 1 % of one core at monitor_interval=1 s; p50 latency within 1 %.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import alternate, calib_batches, exported, int8, p50, tensors_for  # noqa: E402
from ptq import bench  # noqa: E402
from ptq.backends.ort import open_session  # noqa: E402
from ptq.monitor import Monitor  # noqa: E402
from ptq.phases import Phases  # noqa: E402

ITERS, ROUNDS = 1000, 5


def main() -> None:
    spec, fp32 = exported("lite0")
    _, tensors = tensors_for(spec)
    session = open_session(str(int8(fp32, calib_batches(tensors, 100))), 2)
    x = tensors.batch([0])
    bench.warm_up(session, x, 50)

    idle = Monitor(1.0)
    idle.start()
    time.sleep(20)
    idle.stop()
    print(f"monitor alone, 1 s interval, 20 s: {idle.own_cpu_pct():.3f} % of one core ({len(idle.samples)} samples; goal < 1 %)")

    def with_monitor() -> float:
        phases = Phases()
        mon = Monitor(1.0, phases)
        mon.start()
        with phases("latency"):
            median = p50(session, x, ITERS)
        mon.stop()
        return median

    on, off = alternate(ROUNDS, with_monitor, lambda: p50(session, x, ITERS))
    print(f"p50 latency lite0 int8: monitor on {on:.3f} ms, off {off:.3f} ms, ratio {on / off:.4f} (goal within 1 %)")


if __name__ == "__main__":
    main()
