"""ONNX Runtime backend: FP16 by graph conversion, INT8 by static QDQ PTQ; runs on the CPU provider."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from ptq import quantize
from ptq.backends import Backend, Compressed, CompressJob, Session


class OrtSession(Session):
    """An InferenceSession bound to the model's single input."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.input = session.get_inputs()[0].name

    def run(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self.input: batch})[0], dtype=np.float32)


def open_session(path: str, threads: int) -> OrtSession:
    """An ONNX Runtime CPU session with full graph optimization and a fixed thread count."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return OrtSession(ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"]))


class OrtBackend(Backend):
    name = "ort"
    Options = quantize.QuantOptions

    def compress(self, job: CompressJob) -> Compressed:
        if job.precision == "fp32":
            return Compressed(job.fp32_onnx, numerics="fp32")
        out = job.workdir / f"model_{job.precision}.onnx"
        if job.precision == "fp16":
            with job.phases("convert"):
                return Compressed(quantize.to_fp16(job.fp32_onnx, out), numerics="fp16 weights and arithmetic, fp32 inputs and outputs")
        opts: quantize.QuantOptions = job.options
        tags: dict[str, str] = {}
        k = opts.keep_count()
        if k is not None:
            opts, tags = self._keep_most_sensitive(job, opts, k)
        cache = job.workdir / "calibration_ranges.json"
        graph = quantize.to_int8(job.fp32_onnx, out, job.calib_batches(opts.calib_batch), opts, job.phases, cache)
        return Compressed(out, artifacts=[cache], numerics=quantize.describe(opts), tags={"numerics.int8_graph": graph, **tags})

    SENSITIVITY_IMAGES = 64  # calibration images the ranking of keep_float=k measures divergence on

    def _keep_most_sensitive(self, job: CompressJob, opts: quantize.QuantOptions, k: int) -> tuple[quantize.QuantOptions, dict[str, str]]:
        """keep_float=k: rank the nodes by what their float saves (sensitivity, on calibration images: the
        evaluation images stay unseen) and keep the first k in float."""
        from ptq import sensitivity

        with job.phases("sensitivity"):
            batches = list(job.calib_batches(opts.calib_batch))
            heldout = np.concatenate(batches)[: self.SENSITIVITY_IMAGES]
            order, how = sensitivity.ranked_nodes(job.fp32_onnx, batches, heldout, opts, lambda m, x: open_session(str(m), 0).run(x))
        kept = tuple(order[:k])
        note = f"the {k} of {len(order)} nodes whose float saves the most KL on {len(heldout)} calibration images ({how})"
        return replace(opts, keep_float=kept), {"numerics.keep_float": ",".join(kept), "numerics.keep_float_by": note}

    def open(self, model: Compressed, threads: int) -> Session:
        return open_session(str(model.path), threads)

    def versions(self) -> dict[str, str]:
        import onnxruntime as ort

        return {"onnxruntime": ort.__version__}


BACKEND = OrtBackend
