"""ptq's own overhead, each measured side by side with the bare library call in one run.

- latency harness vs a bare ONNX Runtime loop over the same INT8 file (goal <= 1.02x)
- INT8 compression vs calling quant_pre_process + quantize_static directly (goal <= 1.10x)
- evaluating the 1000 sample images vs pure inference over the same tensors (goal <= 1.2x)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import quant_pre_process, quantize_static

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import WORK, alternate, calib_batches, exported, int8, p50, report, tensors_for  # noqa: E402
from ptq import bench, export  # noqa: E402
from ptq.quantizers import ort as quantize  # noqa: E402
from ptq.backends.ort import open_session  # noqa: E402

ITERS, ROUNDS = 300, 5


def main() -> None:
    spec, fp32 = exported("lite0")
    ds, tensors = tensors_for(spec)
    batches = calib_batches(tensors, 100)
    model = int8(fp32, batches)
    threads = 2 if len(sys.argv) < 2 else int(sys.argv[1])
    x = tensors.batch([0])

    # 1. latency: ptq's Session + timing loop vs a bare InferenceSession loop
    harness = open_session(str(model), threads)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    bare = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    name = bare.get_inputs()[0].name
    bench.warm_up(harness, x, 50)

    def bare_p50() -> float:
        samples = np.empty(ITERS)
        for i in range(ITERS):
            t0 = time.perf_counter()
            bare.run(None, {name: x})
            samples[i] = time.perf_counter() - t0
        return float(np.median(samples) * 1e3)

    ptq_p50, ref_p50 = alternate(ROUNDS, lambda: p50(harness, x, ITERS), bare_p50)
    report("latency p50, lite0 int8, batch 1", ptq_p50, ref_p50, "ms", "<= 1.02")

    # 2. compression: ptq.quantizers.ort.to_int8 vs the two ORT calls it wraps, same model, data and options
    o = quantize.QuantOptions()

    def ptq_compress() -> float:
        t0 = time.perf_counter()
        int8(fp32, batches, o, "-bench")
        return time.perf_counter() - t0

    def direct_compress() -> float:
        t0 = time.perf_counter()
        pre = WORK / "direct-pre.onnx"
        quant_pre_process(str(fp32), str(pre))
        quantize_static(
            str(pre), str(WORK / "direct-int8.onnx"), quantize.BatchReader(export.input_name(fp32), iter(batches)),
            quant_format=quantize.QUANT_FORMATS[o.quant_format], per_channel=o.per_channel,
            activation_type=quantize.QUANT_TYPES[o.activation_type], weight_type=quantize.QUANT_TYPES[o.weight_type],
            calibrate_method=quantize.CALIB_METHODS[o.calib_method], extra_options={"ActivationSymmetric": False},
        )
        return time.perf_counter() - t0

    ptq_s, ref_s = alternate(3, ptq_compress, direct_compress)
    report("int8 compression, lite0, 100 calib images", ptq_s, ref_s, "s", "<= 1.10")

    # 3. evaluation of all 1000 images (cached tensors) vs pure inference over pre-normalized batches
    idx = list(range(len(ds.files)))
    labels = np.asarray(ds.labels)
    pre = [tensors.batch(idx[i : i + 32]) for i in range(0, len(idx), 32)]

    def ptq_eval() -> float:
        t0 = time.perf_counter()
        bench.evaluate(harness, tensors, idx, labels, 32, progress=False)
        return time.perf_counter() - t0

    def pure() -> float:
        t0 = time.perf_counter()
        for b in pre:
            bare.run(None, {name: b})
        return time.perf_counter() - t0

    ptq_e, ref_e = alternate(3, ptq_eval, pure)
    report("evaluate 1000 images, lite0 int8, batch 32", ptq_e, ref_e, "s", "<= 1.2")


if __name__ == "__main__":
    main()
