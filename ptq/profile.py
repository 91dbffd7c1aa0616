"""Per-op latency profile of an ONNX model on ONNX Runtime's CPU provider: where INT8 does or does not pay.

A model's latency says whether INT8 pays; this says where. ONNX Runtime's own profiler times every kernel of every
run; the runs after a warm-up are averaged per node and per op type, so an FP32 model and its INT8 QDQ model can be
compared op type by op type. What an INT8 model still runs in float between its Q/DQ pairs (the "float islands":
MobileNetV3's hard-swish and squeeze-excite ops, say) and what its QuantizeLinear/DequantizeLinear kernels cost
are what explain an INT8 model no faster, or slower, than FP32.

Neither onnxruntime nor matplotlib is imported until a function needs it.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np

from ptq.errors import PtqError

KERNEL_SUFFIX = "_kernel_time"
RUN_EVENT = "model_run"
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
# Kernels that compute on integers: ORT's QLinear* family and the other integer kernels its QDQ fusions produce.
INT_OPS = frozenset(
    {"QGemm", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QAttention", "QEmbedLayerNormalization"}
)
FLOAT_TYPES = frozenset({"float", "float16", "double", "bfloat16"})
# Ops that only move data: without type information in a profile they are not counted as float compute.
LAYOUT_OPS = frozenset(
    {"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Shape", "Gather", "Slice", "Concat", "Split", "Expand"}
)


def is_quantized_op(op_type: str) -> bool:
    """Whether a kernel computes on integers (QLinear*, QGemm, ConvInteger, MatMulInteger...)."""
    return op_type.startswith("QLinear") or op_type in INT_OPS


# Kernels whose float counterpart does not follow from dropping a "QLinear" prefix.
FAMILIES = {
    "QGemm": "Gemm",
    "FusedGemm": "Gemm",
    "FusedConv": "Conv",
    "ConvInteger": "Conv",
    "NhwcFusedConv": "Conv",
    "MatMulInteger": "MatMul",
    "MatMulIntegerToFloat": "MatMul",
    "DynamicQuantizeMatMul": "MatMul",
    "FusedMatMul": "MatMul",
    "NhwcMaxPool": "MaxPool",
    "QuantizeLinear": "Q/DQ",
    "DequantizeLinear": "Q/DQ",
    "DynamicQuantizeLinear": "Q/DQ",
    "ReorderInput": "layout",  # NCHWc conversions of the FP32 graph
    "ReorderOutput": "layout",
    "Transpose": "layout",  # NCHW <-> NHWC of the INT8 graph
}


def op_family(op_type: str) -> str:
    """The float op a kernel stands for, so an FP32 and an INT8 graph line up: QLinearConv, ConvInteger and
    FusedConv -> Conv, QGemm -> Gemm, Q/DQ kernels -> "Q/DQ", reorders and transposes -> "layout"."""
    if op_type in FAMILIES:
        return FAMILIES[op_type]
    return op_type[len("QLinear") :] if op_type.startswith("QLinear") else op_type


@dataclass(frozen=True)
class NodeTime:
    """One node of the optimized graph ONNX Runtime ran: its kernel's mean time per query and the element types
    it consumed and produced (None where the profile does not say)."""

    name: str
    op_type: str
    us: float
    provider: str = ""
    input_type: Optional[str] = None
    output_type: Optional[str] = None

    @property
    def runs_float(self) -> bool:
        """Whether the kernel computes in float: not a Q/DQ or integer kernel, and float in or out (or, where the
        profile gives no types, any op that does more than move data)."""
        if self.op_type in QDQ_OPS or is_quantized_op(self.op_type):
            return False
        if self.input_type is None and self.output_type is None:
            return self.op_type not in LAYOUT_OPS
        return self.input_type in FLOAT_TYPES or self.output_type in FLOAT_TYPES


@dataclass
class OpProfile:
    """Mean kernel time per query of each node and op type of one model, from ONNX Runtime's profile.

    `total_us` is the sum of the kernels; `run_us` the mean `model_run` (the whole `session.run`), so
    `overhead_us` is what the framework spends outside kernels (profiling included)."""

    nodes: List[NodeTime]
    queries: int
    run_us: float
    threads: Optional[int] = None
    source: str = ""
    notes: List[str] = field(default_factory=list)

    @property
    def total_us(self) -> float:
        """Kernel time per query, all nodes."""
        return float(sum(n.us for n in self.nodes))

    @property
    def overhead_us(self) -> float:
        """Mean `model_run` time per query not spent in kernels."""
        return self.run_us - self.total_us

    def _share(self, us: float) -> float:
        total = self.total_us
        return us / total if total > 0 else 0.0

    def by_node(self) -> List[Dict[str, Any]]:
        """One row per node, slowest first: node, op_type, provider, us (mean per query), share of the kernel
        time, input_type, output_type."""
        return [
            {
                "node": n.name,
                "op_type": n.op_type,
                "provider": n.provider,
                "us": n.us,
                "share": self._share(n.us),
                "input_type": n.input_type,
                "output_type": n.output_type,
            }
            for n in sorted(self.nodes, key=lambda n: (-n.us, n.name))
        ]

    def by_op(self, family: bool = False) -> List[Dict[str, Any]]:
        """One row per op type, slowest first: op_type, us (sum of its nodes' means), share, nodes (count).
        With `family`, kernels are grouped by `op_family` instead (QLinearConv with Conv...)."""
        sums: Dict[str, List[float]] = {}
        for n in self.nodes:
            sums.setdefault(op_family(n.op_type) if family else n.op_type, []).append(n.us)
        rows = [{"op_type": op, "us": float(sum(v)), "share": self._share(float(sum(v))), "nodes": len(v)} for op, v in sums.items()]
        return sorted(rows, key=lambda r: (-r["us"], r["op_type"]))

    def table(self, other: Optional[OpProfile] = None, family: bool = False) -> Dict[str, list]:
        """Column -> values (what `mlflow.log_table` takes). Alone: this profile per op type. With `other`: this
        profile as the reference (FP32) against `other` (INT8) per op type present in either, largest first;
        `int8_over_fp32` is None where one side lacks the op type. `family` groups kernels by `op_family`, which
        lines Conv up with QLinearConv."""
        if other is None:
            rows = self.by_op(family)
            return {key: [r[key] for r in rows] for key in ("op_type", "us", "share", "nodes")}
        mine = {r["op_type"]: r for r in self.by_op(family)}
        theirs = {r["op_type"]: r for r in other.by_op(family)}
        ops = sorted(set(mine) | set(theirs), key=lambda op: (-max(mine.get(op, {}).get("us", 0.0), theirs.get(op, {}).get("us", 0.0)), op))
        cols: Dict[str, list] = {k: [] for k in ("op_type", "fp32_us", "int8_us", "int8_over_fp32", "fp32_nodes", "int8_nodes")}
        for op in ops:
            a, b = mine.get(op), theirs.get(op)
            cols["op_type"].append(op)
            cols["fp32_us"].append(a["us"] if a else 0.0)
            cols["int8_us"].append(b["us"] if b else 0.0)
            cols["int8_over_fp32"].append(b["us"] / a["us"] if a and b and a["us"] > 0 else None)
            cols["fp32_nodes"].append(a["nodes"] if a else 0)
            cols["int8_nodes"].append(b["nodes"] if b else 0)
        return cols


def _first_type(shapes: Any) -> Optional[str]:
    """The element type of the first tensor in ORT's `input_type_shape`/`output_type_shape` ([{"float": [..]}, ...])."""
    if isinstance(shapes, list) and shapes and isinstance(shapes[0], dict) and shapes[0]:
        return str(next(iter(shapes[0])))
    return None


def parse_events(events: Iterable[Dict[str, Any]], warmup: int) -> OpProfile:
    """An OpProfile from ONNX Runtime's profile events, the first `warmup` runs left out.

    Every `model_run` event bounds one `session.run` (ts, dur in µs); a node's `*_kernel_time` event belongs to
    the run whose interval holds its start. Each node's mean is its summed time over the kept runs divided by
    their number."""
    events = list(events)
    runs = sorted(((int(e["ts"]), int(e["ts"]) + int(e["dur"])) for e in events if e.get("name") == RUN_EVENT), key=lambda r: r[0])
    if len(runs) <= warmup:
        raise PtqError(f"the profile has {len(runs)} model_run events: nothing is left after {warmup} warm-up runs")
    kept = runs[warmup:]
    starts = [r[0] for r in kept]
    sums: Dict[str, float] = {}
    info: Dict[str, Tuple[str, str, Optional[str], Optional[str]]] = {}
    for e in events:
        name = str(e.get("name", ""))
        if e.get("cat") != "Node" or not name.endswith(KERNEL_SUFFIX):
            continue
        ts = int(e["ts"])
        i = int(np.searchsorted(starts, ts, side="right")) - 1
        if i < 0 or ts > kept[i][1]:
            continue  # a warm-up run's kernel (or one outside every run)
        node = name[: -len(KERNEL_SUFFIX)]
        args = e.get("args", {})
        sums[node] = sums.get(node, 0.0) + float(e["dur"])
        if node not in info:
            info[node] = (
                str(args.get("op_name", "?")),
                str(args.get("provider", "")),
                _first_type(args.get("input_type_shape")),
                _first_type(args.get("output_type_shape")),
            )
    n = len(kept)
    nodes = [NodeTime(node, info[node][0], sums[node] / n, *info[node][1:]) for node in sums]
    run_us = float(np.mean([b - a for a, b in kept]))
    return OpProfile(nodes=nodes, queries=n, run_us=run_us)


def parse_profile(path: Path, warmup: int) -> OpProfile:
    """Parse an ONNX Runtime profile JSON file (a list of trace events, or {"traceEvents": [...]})."""
    data = json.loads(Path(path).read_text())
    events = data.get("traceEvents", []) if isinstance(data, dict) else data
    profile = parse_events(events, warmup)
    profile.source = str(path)
    return profile


def profile_onnx(path: Path, batch: np.ndarray, threads: int, queries: int = 50, warmup: int = 5) -> OpProfile:
    """Run `path` on ORT's CPU provider (all graph optimizations, `threads` intra-op threads, sequential) with
    profiling on: `warmup` runs then `queries` runs of `batch`; per-node means over the `queries` runs only.
    The times include the profiler's own small per-kernel cost, the same for both models compared."""
    import onnxruntime as ort

    if queries < 1 or warmup < 0:
        raise PtqError(f"queries={queries} must be >= 1 and warmup={warmup} >= 0")
    with tempfile.TemporaryDirectory(prefix="ptq-profile-") as tmp:
        opts = ort.SessionOptions()
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "ort-profile")
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise PtqError(f"{path} has {len(inputs)} inputs: the profile feeds one batch to a single-input model")
        feed = {inputs[0].name: np.ascontiguousarray(batch, dtype=np.float32)}
        for _ in range(warmup + queries):
            session.run(None, feed)
        written = Path(session.end_profiling())
        del session
        profile = parse_profile(written, warmup)
    if profile.queries != queries:
        profile.notes.append(f"{profile.queries} of {queries} runs found in the profile (ORT caps its event count)")
    profile.threads = threads
    profile.source = str(path)
    return profile


def qdq_overhead(profile: OpProfile) -> Dict[str, Any]:
    """Time per query in QuantizeLinear and DequantizeLinear kernels (what converting between float and int8
    costs), their node counts, and their share of the kernel time."""
    q = [n for n in profile.nodes if n.op_type in ("QuantizeLinear", "DynamicQuantizeLinear")]
    dq = [n for n in profile.nodes if n.op_type == "DequantizeLinear"]
    us = float(sum(n.us for n in q + dq))
    return {
        "quantize_us": float(sum(n.us for n in q)),
        "dequantize_us": float(sum(n.us for n in dq)),
        "qdq_us": us,
        "quantize_nodes": len(q),
        "dequantize_nodes": len(dq),
        "share": us / profile.total_us if profile.total_us > 0 else 0.0,
    }


def _graph_context(model_path: Path) -> Tuple[List[Any], Dict[str, Any], Dict[str, str], Dict[str, List[str]]]:
    """The QDQ graph's nodes, its named nodes, each tensor's producer op type, and each tensor's consumer op types."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    named = {n.name: n for n in graph.node if n.name}
    producer = {out: n.op_type for n in graph.node for out in n.output}
    consumers: Dict[str, List[str]] = {}
    for n in graph.node:
        for inp in n.input:
            consumers.setdefault(inp, []).append(n.op_type)
    return list(graph.node), named, producer, consumers


def _source_node(name: str, op_type: str, nodes: List[Any], named: Dict[str, Any]) -> Any:
    """The QDQ file's node that a profiled node is: by name, or, for a node the file left unnamed (ORT profiles
    it as `<OpType>_<index>`, its index in the loaded graph), the unnamed node of that op type at that index."""
    if name in named:
        return named[name]
    head, _, index = name.rpartition("_")
    if head == op_type and index.isdigit() and int(index) < len(nodes):
        node = nodes[int(index)]
        if not node.name and node.op_type == op_type:
            return node
    return None


def float_islands(qdq_model_path: Path, optimized_profile: OpProfile) -> List[Dict[str, Any]]:
    """The nodes of an INT8 model that ONNX Runtime still runs in float after its QDQ fusions, slowest first:
    node, op_type, us, share, input_type, and where the node is found by name in the QDQ file
    (`in_qdq_graph`; an unnamed node by ORT's `<OpType>_<index>` name), whether the quantizer wrapped it in
    DQ -> op -> Q there (`between_qdq`: ORT has no integer kernel for it, so it pays a dequantize and a quantize
    around a float op) or left it float. Nodes ORT made or renamed (fusions, inlined functions) have
    `in_qdq_graph` False and `between_qdq` None.
    `qdq_overhead(profile)` gives the Q/DQ kernels' own time."""
    nodes, named, producer, consumers = _graph_context(qdq_model_path)
    rows = []
    for node in sorted(optimized_profile.nodes, key=lambda n: (-n.us, n.name)):
        if not node.runs_float:
            continue
        src = _source_node(node.name, node.op_type, nodes, named)
        between: Optional[bool] = None
        if src is not None:
            fed = [producer[i] for i in src.input if i in producer]
            used = [op for o in src.output for op in consumers.get(o, [])]
            between = bool(fed) and all(op == "DequantizeLinear" for op in fed) and bool(used) and all(op == "QuantizeLinear" for op in used)
        rows.append(
            {
                "node": node.name,
                "op_type": node.op_type,
                "us": node.us,
                "share": node.us / optimized_profile.total_us if optimized_profile.total_us > 0 else 0.0,
                "input_type": node.input_type,
                "in_qdq_graph": src is not None,
                "between_qdq": between,
            }
        )
    return rows


def plot(fp32: OpProfile, int8: OpProfile, path: Path, top: int = 15, family: bool = False) -> Path:
    """Horizontal bars of µs per query per op type, FP32 and INT8 side by side, the `top` largest op types
    (by the larger of the two) first, totals per query in the title. `family` groups kernels by `op_family`
    (Conv beside QLinearConv), the clearer picture of where INT8 gains or loses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = fp32.table(int8, family=family)
    shown = list(zip(cols["op_type"], cols["fp32_us"], cols["int8_us"]))[:top][::-1]
    y = np.arange(len(shown))
    height = 0.4
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(shown) + 1.6))
    ax.barh(y + height / 2, [f for _, f, _ in shown], height, label="FP32", color="tab:blue")
    ax.barh(y - height / 2, [i for _, _, i in shown], height, label="INT8", color="tab:orange")
    ax.set_yticks(y)
    ax.set_yticklabels([op for op, _, _ in shown], fontsize=8)
    ax.set_xlabel("µs per query (mean kernel time)" + (", kernels grouped by the float op they stand for" if family else ""))
    threads = f", {fp32.threads} threads" if fp32.threads else ""
    ax.set_title(
        f"Per-op time: FP32 {fp32.total_us:.0f} µs, INT8 {int8.total_us:.0f} µs per query "
        f"(x{int8.total_us / fp32.total_us if fp32.total_us else float('nan'):.2f}{threads})",
        fontsize=9,
    )
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
