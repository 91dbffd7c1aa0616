"""ONNX Runtime backend: FP16 by graph conversion, INT8 by static QDQ PTQ; runs on the CPU provider."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ptq.quantizers import ort as quantize
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
        if job.qdq_onnx is not None:  # quantized beforehand (`ptq quantize`): ONNX Runtime runs the QDQ graph as it is
            shutil.copyfile(job.qdq_onnx, out)
            return Compressed(out, numerics="int8 QDQ as quantized beforehand (numerics.qdq)")
        opts: quantize.QuantOptions = job.options
        tags: dict[str, str] = {}
        k = opts.keep_count()
        if k is not None:
            opts, tags = self._keep_most_sensitive(job, opts, k)
        if opts.quant_mode == "dynamic":  # nothing to calibrate: weights now, activations at run time
            quantize.to_int8_dynamic(job.fp32_onnx, out, opts, job.phases)
            return Compressed(out, numerics=quantize.describe(opts), tags=tags)
        cache = job.workdir / "calibration_ranges.json"
        if opts.activation_type == "auto":
            return self._faster_activation(job, opts, out, cache, tags)
        graph = quantize.to_int8(job.fp32_onnx, out, job.calib_batches(opts.calib_batch), opts, job.phases, cache)
        return Compressed(out, artifacts=[cache], numerics=quantize.describe(opts), tags={"numerics.int8_graph": graph, **tags})

    # activation_type=auto: a short alternating measurement of both models, at the run's batch size and threads
    AUTO_TIMING = {"warmup": 5, "min_queries": 60, "min_duration_s": 1.0, "blocks": 6}

    def _faster_activation(self, job: CompressJob, opts: quantize.QuantOptions, out: Path, cache: Path, tags: dict[str, str]) -> Compressed:
        """Quantize with uint8 and with int8 activations from one calibration, time both side by side, keep the
        faster: which one is faster depends on the CPU (VNNI and AMX have u8*s8 dot products, ARM s8*s8)."""
        from ptq import bench

        quantize.check_keep_float(job.fp32_onnx, opts.keep_float)
        with tempfile.TemporaryDirectory(prefix="ptq-auto-") as tmp:
            with job.phases("preprocess"):
                pre, graph = quantize.preprocess(job.fp32_onnx, Path(tmp) / "pre.onnx")
            with job.phases("calibrate"):
                batches = list(job.calib_batches(opts.calib_batch))
                ranges = quantize.calibrate(pre, iter(batches), opts, Path(tmp))
                quantize.save_ranges(ranges, cache)
            paths = {act: Path(tmp) / f"model_{act}.onnx" for act in ("uint8", "int8")}
            with job.phases("quantize"):
                for act, path in paths.items():
                    quantize.quantize_from_ranges(pre, path, ranges, cache, replace(opts, activation_type=act))
            with job.phases("select"):
                batch = np.concatenate(batches)[: job.batch_sizes[0]]
                method = bench.LatencyMethod(**self.AUTO_TIMING, batch_size=len(batch))  # type: ignore[arg-type]
                sessions: dict[str, Session] = {act: open_session(str(path), job.threads) for act, path in paths.items()}
                p50 = {act: lat.percentiles()[0] for act, lat in bench.time_blocks(sessions, batch, method).items()}
                del sessions
            chosen = min(p50, key=lambda act: p50[act])
            shutil.move(str(paths[chosen]), out)
        opts = replace(opts, activation_type=chosen)
        note = f"{chosen}: p50 uint8 {p50['uint8']:.3f} ms, int8 {p50['int8']:.3f} ms ({method.blocks} alternating blocks of {method.block_queries} queries at batch {len(batch)})"
        return Compressed(
            out, artifacts=[cache], numerics=quantize.describe(opts), tags={"numerics.int8_graph": graph, "numerics.activation_auto": note, **tags},
            metrics={"compress/auto_uint8_p50_ms": p50["uint8"], "compress/auto_int8_p50_ms": p50["int8"]},
        )

    SENSITIVITY_IMAGES = 64  # calibration images the ranking of keep_float=k measures divergence on

    def _keep_most_sensitive(self, job: CompressJob, opts: quantize.QuantOptions, k: int) -> tuple[quantize.QuantOptions, dict[str, str]]:
        """keep_float=k: rank the nodes by what their float saves (sensitivity, on calibration images: the
        evaluation images stay unseen) and keep the first k in float."""
        from ptq import sensitivity

        with job.phases("sensitivity"):
            batches = list(job.calib_batches(opts.calib_batch))
            heldout = np.concatenate(batches)[: self.SENSITIVITY_IMAGES]
            ranked = replace(opts, activation_type="uint8") if opts.activation_type == "auto" else opts  # ranked as ORT's default
            order, how = sensitivity.ranked_nodes(job.fp32_onnx, batches, heldout, ranked, lambda m, x: open_session(str(m), 0).run(x))
        kept = tuple(order[:k])
        note = f"the {k} of {len(order)} nodes whose float saves the most KL on {len(heldout)} calibration images ({how})"
        return replace(opts, keep_float=kept), {"numerics.keep_float": ",".join(kept), "numerics.keep_float_by": note}

    def open(self, model: Compressed, threads: int) -> Session:
        return open_session(str(model.path), threads)

    profiles = True
    PROFILE_QUERIES = 100

    def profile(self, model: Compressed, batch: np.ndarray, threads: int) -> Any:
        """ONNX Runtime's own profiler over PROFILE_QUERIES queries after a warm-up (`ptq.profile`)."""
        from ptq.profile import profile_onnx

        return profile_onnx(model.path, batch, threads, queries=self.PROFILE_QUERIES)

    def versions(self) -> dict[str, str]:
        import onnxruntime as ort

        return {"onnxruntime": ort.__version__}


BACKEND = OrtBackend
