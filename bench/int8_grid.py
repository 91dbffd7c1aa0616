"""The INT8 technique grid: calib_method x per_channel x calib_size on lite0/lite1/lite2.

Each setting quantizes with ptq and evaluates on the same 700 evaluation images as the FP32 model
(the split's complement of the largest calibration set), printing the top-1 drop in points and the
compression time. Usage: python bench/int8_grid.py [lite0 lite1 lite2] [--full]
(entropy and percentile run with the smaller calibration set unless --full: each takes minutes)
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import batched, exported, int8, tensors_for  # noqa: E402
from ptq import bench, data  # noqa: E402
from ptq.quantizers import ort as quantize  # noqa: E402
from ptq.backends.ort import open_session  # noqa: E402

METHODS = ("minmax", "entropy", "percentile")
PER_CHANNEL = (True, False)
CALIB_SIZES = (100, 300)


def main(names: list[str], flags: set[str]) -> None:
    print(f"{'model':<6} {'method':<10} {'per_ch':<6} {'calib':>5} {'fp32 top1':>9} {'int8 top1':>9} {'drop pt':>8} {'compress s':>10}")
    for name in names:
        spec, fp32 = exported(name)
        ds, tensors = tensors_for(spec)
        split = data.split(len(ds.files), max(CALIB_SIZES), None, 0)
        eval_idx = list(split.eval)
        order = list(split.calib)  # calibration images: a prefix of the same seeded permutation per size
        labels = np.asarray([ds.labels[i] for i in eval_idx])
        ref = bench.evaluate(open_session(str(fp32), 2), tensors, eval_idx, labels, 32, progress=False).top1
        for method, per_channel, n in itertools.product(METHODS, PER_CHANNEL, CALIB_SIZES):
            if method != "minmax" and n != CALIB_SIZES[0] and "--full" not in flags:  # histogram methods take minutes each
                continue
            batches = batched(tensors, order[:n])
            opts = quantize.QuantOptions(calib_method=method, per_channel=per_channel)
            t0 = time.perf_counter()
            model = int8(fp32, batches, opts, f"-{method}-{per_channel}-{n}")
            seconds = time.perf_counter() - t0
            top1 = bench.evaluate(open_session(str(model), 2), tensors, eval_idx, labels, 32, progress=False).top1
            print(f"{name:<6} {method:<10} {str(per_channel):<6} {n:>5} {ref:9.4f} {top1:9.4f} {100 * (ref - top1):8.2f} {seconds:10.1f}", flush=True)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    main(args or ["lite0", "lite1", "lite2"], {a for a in sys.argv[1:] if a.startswith("--")})
