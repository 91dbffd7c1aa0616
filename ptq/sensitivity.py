"""Which layers lose the accuracy: the whole model quantized but one node, and how much of INT8's damage that
node's staying in float takes away.

"All but one" measures what `keep_float` would buy, with every other node quantized as it will be: quantizing a
node alone misleads, because ONNX Runtime places a lone node's output Q/DQ on a range its fused activation
would have narrowed. One calibration serves every trial (ONNX Runtime quantizes from the saved ranges), so a
trial costs one quantization and one pass over the held-out images. Damage is the divergence of the output
from FP32's on images the calibration did not see: the mean KL divergence of the class distributions (the
ranking metric), the mean cosine distance of the logits, the top-1 agreement; for the nodes that matter most
also the top-1 drop on the evaluation images, where labels are known.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import onnx

from ptq.quantizers import ort as quantize
from ptq.config import RunConfig
from ptq.errors import PtqError

@dataclass
class Damage:
    """The output of the model quantized but for `node` (or every node of a kind, "all <kind>"; "none": the
    whole model), against FP32's; `recovered`: the whole model's ranking metric (KL or cosine distance) minus this one's."""

    node: str
    kind: str
    kl: float
    cosine: float
    agreement: float
    recovered: float = 0.0
    top1_drop_pt: Optional[float] = None


@dataclass
class Ranking:
    """Nodes ranked by damage (worst first), per kind, the whole model quantized, and what it cost."""

    nodes: List[Damage]
    kinds: List[Damage]
    whole: Damage
    seconds: float
    images: int
    quantizations: int
    metric: str = "kl"
    notes: List[str] = field(default_factory=list)

    def top(self, k: int) -> List[str]:
        """The `k` nodes whose float saves the most: what `keep_float` should keep."""
        return [d.node for d in self.nodes[:k]]

    def table(self) -> Dict[str, List[Any]]:
        """Rank, node kept in float, kind and each measure, the per-kind and whole-model rows last (column->values)."""
        rows = [(i + 1, d) for i, d in enumerate(self.nodes)] + [("", d) for d in (*self.kinds, self.whole)]
        return {
            "rank": [r for r, _ in rows],
            "kept_in_float": [d.node for _, d in rows],
            "kind": [d.kind for _, d in rows],
            f"{self.metric}_recovered": [_sig(d.recovered) for _, d in rows],
            "kl": [_sig(d.kl) for _, d in rows],
            "cosine_distance": [_sig(d.cosine) for _, d in rows],
            "top1_agreement": [round(d.agreement, 4) for _, d in rows],
            "top1_drop_pt": [None if d.top1_drop_pt is None else round(d.top1_drop_pt, 2) for _, d in rows],
        }


METRICS = ("kl", "cosine")  # what the ranking orders by: KL of the class distributions, or cosine distance of the logits


def _sig(x: float) -> float:
    """Four significant digits: random weights give KLs of 1e-7, which fixed decimals round to zero."""
    return float(f"{x:.4g}")


def node_kinds(model: Path) -> Dict[str, str]:
    """The weighted nodes of an ONNX model by name, with their kind: depthwise, 1x1 or kxk Conv, Gemm, MatMul."""
    graph = onnx.load(str(model), load_external_data=False).graph
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    kinds = {}
    for n in graph.node:
        if n.op_type not in quantize.WEIGHTED_OPS:
            continue
        kind = n.op_type
        if n.op_type == "Conv":
            group = next((a.i for a in n.attribute if a.name == "group"), 1)
            w = shapes.get(n.input[1], [])
            kind = "Conv depthwise" if group > 1 and len(w) == 4 and w[1] == 1 else "Conv 1x1" if w[2:] == [1, 1] else "Conv kxk"
        kinds[n.name] = kind
    return kinds


def require_weighted(model: Path) -> Dict[str, str]:
    """`node_kinds(model)`, refusing a model without weighted nodes: nothing to quantize, nothing to rank or tune."""
    kinds = node_kinds(model)
    if not kinds:
        raise PtqError(f"{model.name} has no Conv, Gemm or MatMul node: nothing to quantize, so no sensitivity to measure or configuration to tune")
    return kinds


def divergence(reference: np.ndarray, logits: np.ndarray) -> tuple[float, float, float]:
    """(mean KL(softmax(reference) || softmax(logits)), mean cosine distance of the logits, top-1 agreement)."""

    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64) - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    p, q = log_softmax(reference), log_softmax(logits)
    kl = float(np.mean(np.sum(np.exp(p) * (p - q), axis=1)))
    a, b = reference.astype(np.float64), logits.astype(np.float64)
    cos = np.sum(a * b, axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-300)  # random weights: logits of 1e-7
    return kl, float(np.mean(1.0 - cos)), float(np.mean(reference.argmax(1) == logits.argmax(1)))


Runner = Callable[[Path, np.ndarray], np.ndarray]  # (model, batch) -> logits


def rank(
    fp32: Path,
    calib_batches: Iterator[np.ndarray],
    heldout: np.ndarray,
    options: quantize.QuantOptions,
    run: Runner,
    evaluate: Optional[Callable[[Path], float]] = None,
    eval_top: int = 5,
    progress: Optional[Callable[[int, int], None]] = None,
    metric: str = "kl",
) -> Ranking:
    """Quantize `fp32` whole, then but for each weighted node in turn, then but for each kind of node (ranges from
    one calibration on `calib_batches`); run each on the `heldout` images with `run` and rank the nodes by the KL
    from FP32's output their float takes away. `evaluate(model) -> top-1` adds the top-1 drop of the whole model
    and of the model with each of the `eval_top` best nodes kept in float."""
    if metric not in METRICS:
        raise PtqError(f"unknown metric {metric!r}: use kl (class distributions; pretrained weights) or cosine (logits; random weights, whose near-uniform outputs leave KL near 0)")
    started = time.perf_counter()
    kinds = require_weighted(fp32)
    options = replace(options, keep_float=())
    with tempfile.TemporaryDirectory(prefix="ptq-sensitivity-") as tmp:
        work = Path(tmp)
        pre, graph = quantize.preprocess(fp32, work / "pre.onnx")
        ranges = quantize.calibrate(pre, calib_batches, options, work)
        cache = work / "ranges.json"
        quantize.save_ranges(ranges, cache)
        present = {n.name for n in onnx.load(str(pre), load_external_data=False).graph.node}
        names = [n for n in kinds if n in present]  # pre-processing keeps node names; a fused node drops out
        reference = run(pre, heldout)
        total = len(names) + len(set(kinds.values())) + 1 + (min(eval_top, len(names)) if evaluate else 0)

        count = 0

        def trial(float_nodes: List[str], label: str, kind: str) -> tuple[Damage, Path]:
            nonlocal count
            count += 1
            out = work / f"q{count}.onnx"
            quantize.quantize_from_ranges(pre, out, ranges, cache, replace(options, keep_float=tuple(float_nodes)))
            if progress:
                progress(count, total)
            return Damage(label, kind, *divergence(reference, run(out, heldout))), out

        whole, whole_path = trial([], "none", "whole model")
        nodes: List[Damage] = []
        per_kind: List[Damage] = []
        for group, label, kind in [([n], n, kinds[n]) for n in names] + [([n for n in names if kinds[n] == k], f"all {k}", k) for k in sorted(set(kinds.values()))]:
            damage, out = trial(group, label, kind)
            out.unlink()
            damage.recovered = getattr(whole, metric) - getattr(damage, metric)
            (nodes if len(group) == 1 and label in kinds else per_kind).append(damage)
        nodes.sort(key=lambda d: -d.recovered)
        if evaluate is not None:
            base = evaluate(pre)
            whole.top1_drop_pt = 100 * (base - evaluate(whole_path))
            for damage in nodes[:eval_top]:
                _, out = trial([damage.node], damage.node, damage.kind)
                damage.top1_drop_pt = 100 * (base - evaluate(out))
                out.unlink()
    notes = [f"graph: {graph}"] + ([f"{len(kinds) - len(names)} nodes fused away by pre-processing"] if len(names) < len(kinds) else [])
    return Ranking(nodes, per_kind, whole, time.perf_counter() - started, len(heldout), count, metric, notes)


def ranked_nodes(fp32: Path, batches: List[np.ndarray], heldout: np.ndarray, options: quantize.QuantOptions, run: Runner) -> tuple[List[str], str]:
    """The nodes in the order `rank` puts them, and where the order came from: `rank` runs once per model file,
    options, calibration images and ONNX Runtime version, and is kept under $PTQ_CACHE_DIR/sensitivity (a tune's
    trials and repeated keep_float=k runs then share it)."""
    import onnxruntime

    from ptq.data import cache_dir

    digest = hashlib.sha256(fp32.read_bytes())
    digest.update(json.dumps([asdict(replace(options, keep_float=())), onnxruntime.__version__, len(heldout)], sort_keys=True).encode())
    for b in batches:
        digest.update(np.ascontiguousarray(b).tobytes())
    path = cache_dir() / "sensitivity" / f"{digest.hexdigest()[:24]}.json"
    if path.is_file():
        return list(json.loads(path.read_text())["order"]), f"cached ranking {path.name}"
    ranking = rank(fp32, iter(batches), heldout, options, run)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"order": ranking.top(len(ranking.nodes)), "table": ranking.table()}))
    return ranking.top(len(ranking.nodes)), f"ranked in {ranking.seconds:.0f} s"


def plot(ranking: Ranking, path: Path, top: int = 20) -> Path:
    """Bar chart of the metric that keeping each of the `top` best nodes in float takes away, coloured by kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = ranking.nodes[:top][::-1]
    kinds = sorted({d.kind for d in ranking.nodes})
    colours = {k: plt.get_cmap("tab10")(i) for i, k in enumerate(kinds)}
    fig, ax = plt.subplots(figsize=(9, 0.3 * len(shown) + 1.5))
    ax.barh([d.node[-48:] for d in shown], [d.recovered for d in shown], color=[colours[d.kind] for d in shown])
    whole = getattr(ranking.whole, ranking.metric)
    ax.axvline(whole, color="black", linestyle="--", label=f"{ranking.metric} of the whole model quantized: {whole:.4g}")
    for k in kinds:
        ax.barh([], [], color=colours[k], label=k)
    ax.set_xlabel(f"{ranking.metric} (fp32 vs int8) taken away by keeping the node in float, held-out images")
    ax.set_title(f"Sensitivity: {len(ranking.nodes)} nodes, {ranking.seconds:.0f} s, {ranking.images} images")
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@dataclass
class Result:
    """A sensitivity run: its MLflow run id and the ranking it logged."""

    run_id: str
    ranking: Ranking


def analyze(cfg: RunConfig, images: int = 64, eval_top: int = 5, progress: Optional[Callable[[int, int], None]] = None, metric: str = "kl") -> Result:
    """Rank the nodes of `cfg.model` by what keeping each in float saves (ONNX Runtime's quantizer with the run's
    ort options): divergence from FP32 on the first `images` evaluation images (never used to calibrate), top-1
    drop of the `eval_top` best on all evaluation images with pretrained weights; logged as one MLflow run."""
    from ptq import bench, data, models, pipeline, tracking
    from ptq.backends.ort import open_session

    if cfg.backend != "ort":
        raise PtqError(f"sensitivity quantizes with ONNX Runtime's quantizer, so it takes backend=ort, not {cfg.backend}")
    if metric not in METRICS:
        raise PtqError(f"unknown metric {metric!r}: use {' or '.join(METRICS)}")
    if images < 1 or eval_top < 0:
        raise PtqError(f"images={images} must be at least 1 and eval_top={eval_top} at least 0")
    cfg.validate()
    options: quantize.QuantOptions = cfg.backend_options()
    if options.keep_float:
        raise PtqError("sensitivity measures every node: drop keep_float")
    spec = models.resolve(cfg.model, cfg.input_size, cfg.mean, cfg.std)
    if spec.onnx_path is not None:
        require_weighted(spec.onnx_path)
    assert cfg.data is not None
    dataset = data.scan(cfg.data)
    split = data.split(len(dataset.files), cfg.calib_size, cfg.eval_size, cfg.split_seed)
    data.require_readable(dataset, split, dataset.readable, calibrate=True)
    tracking.select_store()
    params = {**cfg.params(), "images": str(images), "eval_top": str(eval_top), "metric": metric, "data_hash": dataset.content_hash}
    tags = {"ptq.kind": "sensitivity", "ptq.model_source": spec.source}
    with tempfile.TemporaryDirectory(prefix="ptq-sensitivity-") as tmp, tracking.run(cfg.experiment, f"{spec.name}-sensitivity", params, tags) as rec:
        fp32 = spec.onnx_path or pipeline.export_model(cfg.model, cfg.weights, Path(tmp) / "model_fp32.onnx")
        tensors = data.load_tensors(dataset, spec.transform, progress=cfg.progress, indices=split.calib + split.eval)
        calib_idx, eval_idx = data.usable(dataset, split, tensors, calibrate=True)
        heldout = tensors.batch(eval_idx[:images])
        labels = np.asarray([dataset.labels[i] for i in eval_idx])
        batch = quantize.even_batch(len(calib_idx), options.calib_batch)

        def run(model: Path, x: np.ndarray) -> np.ndarray:
            session = open_session(str(model), cfg.threads_used)
            return np.concatenate([session.run(x[s : s + cfg.eval_batch_size]) for s in range(0, len(x), cfg.eval_batch_size)])

        def top1(model: Path) -> float:
            return bench.evaluate(open_session(str(model), cfg.threads_used), tensors, eval_idx, labels, cfg.eval_batch_size, progress=False).top1

        calib = (tensors.batch(calib_idx[s : s + batch]) for s in range(0, len(calib_idx), batch))
        ranking = rank(fp32, calib, heldout, options, run, top1 if cfg.weights == "pretrained" else None, eval_top, progress, metric)
        rec.table(ranking.table(), "sensitivity.json")
        rec.metrics({"sensitivity/seconds": ranking.seconds, "sensitivity/images": ranking.images, "sensitivity/quantizations": ranking.quantizations,
                     "sensitivity/nodes": len(ranking.nodes), "sensitivity/whole_kl": ranking.whole.kl})
        if ranking.whole.top1_drop_pt is not None:
            rec.metrics({"sensitivity/whole_top1_drop_pt": ranking.whole.top1_drop_pt})
        rec.text(",".join(ranking.top(10)), "keep_float_top10.txt")
        rec.tags({"sensitivity.notes": "; ".join(ranking.notes)})
        if importlib.util.find_spec("matplotlib") is not None:
            rec.artifact(plot(ranking, Path(tmp) / "sensitivity.png"))
        return Result(rec.run_id, ranking)
