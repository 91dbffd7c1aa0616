"""INT8 vs FP32 (and FP16) throughput at batch 1 on this CPU, side by side in one run, per model.

Usage: python bench/int8_speedup.py [model[:weights] ...] [--activations]
(default models: lite0 r50:random d201:random mob-s:random; --activations also compares uint8 with int8 activations)
Goal: lite0 INT8 >= 2x FP32. Where INT8 does not pay, this prints it.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import alternate, calib_batches, exported, int8, p50, tensors_for  # noqa: E402
from ptq import bench  # noqa: E402
from ptq.quantizers import ort as quantize  # noqa: E402
from ptq.backends.ort import open_session  # noqa: E402

ITERS, ROUNDS, THREADS = 100, 3, 2


def main(names: list[str], flags: set[str]) -> None:
    print(f"{'model':<14} {'fp32 p50 ms':>11} {'int8 p50 ms':>11} {'fp16 p50 ms':>11} {'int8 speed-up':>14} {'fp16 speed-up':>14} {'size ratio':>10}")
    for item in names:
        name, _, weights = item.partition(":")
        spec, fp32 = exported(name, weights or "pretrained")
        _, tensors = tensors_for(spec)
        q = int8(fp32, calib_batches(tensors, 100))
        f16 = quantize.to_fp16(fp32, fp32.with_name(fp32.stem.replace("fp32", "fp16") + ".onnx"))
        x = tensors.batch([0])
        s32, s8, s16 = (open_session(str(p), THREADS) for p in (fp32, q, f16))
        for s in (s32, s8, s16):
            bench.warm_up(s, x, 10)
        p32, p8 = alternate(ROUNDS, lambda: p50(s32, x, ITERS), lambda: p50(s8, x, ITERS))
        p16 = p50(s16, x, ITERS)
        ratio = fp32.stat().st_size / q.stat().st_size
        print(f"{item:<14} {p32:11.2f} {p8:11.2f} {p16:11.2f} {p32 / p8:13.2f}x {p32 / p16:13.2f}x {ratio:10.2f}", flush=True)
        if "--activations" in flags:  # why activation_type=uint8 is the default on this CPU
            q_s8 = int8(fp32, calib_batches(tensors, 100), quantize.QuantOptions(activation_type="int8"), "-s8act")
            s_s8 = open_session(str(q_s8), THREADS)
            bench.warm_up(s_s8, x, 10)
            pu8, ps8 = alternate(ROUNDS, lambda: p50(s8, x, ITERS), lambda: p50(s_s8, x, ITERS))
            print(f"{'':<14} activations uint8: {pu8:.2f} ms ({p32 / pu8:.2f}x), int8: {ps8:.2f} ms ({p32 / ps8:.2f}x)", flush=True)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    main(args or ["lite0", "r50:random", "d201:random", "mob-s:random"], {a for a in sys.argv[1:] if a.startswith("--")})
