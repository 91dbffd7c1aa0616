"""The headline of a run, read back from what it logged: for the terminal (a rich table), `summary.md` and the
run's description in the MLflow UI, so all three say the same."""

from __future__ import annotations

import math
from collections.abc import Mapping

from rich.table import Table

from ptq.phases import COMPRESS_PHASES


def _num(metrics: Mapping[str, float], key: str) -> float | None:
    value = metrics.get(key)
    return None if value is None or math.isnan(value) else float(value)


def rows(params: Mapping[str, str], tags: Mapping[str, str], metrics: Mapping[str, float]) -> list[tuple[str, str]]:
    """(quantity, value) pairs of a run's headline; a figure the run did not measure is left out."""
    def m(key: str) -> float | None:
        return _num(metrics, key)

    precision = params.get("precision", "?")
    by = f" by {params['quantizer']}" if params.get("quantizer", "ort") != "ort" else ""
    out = [("model", f"{params.get('model', '?')} {precision}{by} on {params.get('backend', '?')} (weights={params.get('weights', '?')})")]
    out.append(("device", f"{tags.get('device.name', tags.get('device.host', '?'))}: {tags.get('device.cpu', '?')}, GPU {tags.get('device.gpu', 'none')}"))
    if (fp32 := m("size/fp32_bytes")) and (size := m("size/model_bytes")):
        out.append(("size", f"{fp32 / 1e6:.2f} MB → {size / 1e6:.2f} MB ({fp32 / size:.2f}× smaller)"))
    if (total := m("compress/total_s")) is not None:
        phases = ", ".join(f"{p} {v:.2f}" for p in COMPRESS_PHASES if (v := m(f"compress/{p}_s")) is not None and v >= 0.005)
        out.append(("compression", f"{total:.2f} s ({phases})"))
    if (peak := m("compress/peak_rss_mb")) is not None:
        delta = m("compress/peak_rss_delta_mb")
        added = f" (+{delta:.0f} MB over its level before compression began: compression's own)" if delta is not None else ""
        out.append(("peak memory while compressing", f"{peak:.0f} MB process RSS{added}"))  # the process: ptq, libraries, data, model
    if by and (quantizer := tags.get("numerics.qdq")) is not None:
        peak = m("compress/quantizer_worker_peak_rss_mb")
        out.append(("quantizer", quantizer + (f"; its process peaked at {peak:.0f} MB RSS" if peak is not None else "")))
    if (calibration := tags.get("tensorrt.calibration")) is not None:  # TensorRT's own calibrator: images fed and dropped
        out.append(("TensorRT calibration", calibration))
    if (core := tags.get("tensorrt.dla_core")) is not None:
        placed = f"core {core}: {tags.get('tensorrt.dla_subgraphs', '?')} DLA subgraphs, {tags.get('tensorrt.gpu_layers', '?')} GPU layers"
        out.append(("DLA placement", placed + (f" ({tags['tensorrt.dla_fallback']})" if "tensorrt.dla_fallback" in tags else "")))
    if (shortfall := tags.get("ptq.warning.eval_images")) is not None:  # fewer images evaluated than eval_size asked
        out.append(("evaluation images", shortfall))
    if (top1 := m("acc/top1")) is not None and (ref := m("acc/fp32_top1")) is not None:
        drop = f"drop {100 * (ref - top1):+.2f} points" if precision != "fp32" else "the reference"
        p = m("acc/top1_drop_p")
        out.append(("top-1, fp32 → model", f"{100 * ref:.2f} % → {100 * top1:.2f} % ({drop}" + (f", McNemar p = {p:.2g})" if p is not None else ")")))
    if (agreement := m("fidelity/top1_agreement")) is not None:  # label-free: what quantization changed, on any images
        kl = m("fidelity/kl_mean")
        out.append(("fidelity to fp32 (no labels)", f"top-1 agreement {100 * agreement:.2f} %" + (f", KL {kl:.3g}" if kl is not None else "")))
    if (p50 := m("latency/p50_ms")) is not None:
        p99 = m("latency/p99_ms")
        worker = ", a worker process per model" if params.get("latency_process") == "worker" and "ptq.latency_process" not in tags else ""
        out.append(("latency p50 / p99", f"{p50:.3f} / {p99:.3f} ms (batch {params.get('batch_size', '?')}, {params.get('threads_used', '?')} threads{worker})"))
    if (speedup := m("speedup/p50")) is not None:
        low, high = m("speedup/p50_ci95_low"), m("speedup/p50_ci95_high")
        ci = f" [95 % CI {low:.2f}-{high:.2f}]" if low is not None and high is not None else ""
        out.append(("speed-up over fp32 (p50)", f"{speedup:.2f}×{ci}, fp32 p50 {m('latency/fp32_p50_ms') or float('nan'):.3f} ms"))
    if (gpu := m("latency/gpu_compute_p50_ms")) is not None:  # the device's own clock, host copies left out (as trtexec's)
        fp32_gpu, gpu_speedup = m("latency/fp32_gpu_compute_p50_ms"), m("speedup/gpu_compute_p50")
        fp32_note = f", fp32 {fp32_gpu:.3f} ms" if fp32_gpu is not None else ""
        out.append(("GPU compute p50", f"{gpu:.3f} ms{fp32_note}" + (f" ({gpu_speedup:.2f}× speed-up)" if gpu_speedup is not None else "")))
    if (stability := tags.get("ptq.latency_stability")) and stability != "stable":
        out.append(("latency stability", stability))
    for phase in ("latency", "evaluate"):
        if (joules := m(f"{phase}/energy_per_img_j")) is not None:
            out.append((f"energy per image ({phase})", f"{joules * 1e3:.2f} mJ"))
    return out


def markdown(title: str, pairs: list[tuple[str, str]]) -> str:
    """The headline as Markdown: the run's `summary.md` and its description in the MLflow UI."""
    return "\n".join([f"### {title}", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in pairs)]) + "\n"


def table(title: str, pairs: list[tuple[str, str]]) -> Table:
    """The headline as a rich table for the terminal."""
    out = Table(title=title, show_header=False, title_justify="left")
    out.add_column(style="bold")
    out.add_column()
    for key, value in pairs:
        out.add_row(key, value)
    return out


SWEEP_COLUMNS = ("model", "precision", "calib", "size MB", "compress s", "top-1 %", "drop pt", "p50 ms", "speed-up", "status")


def sweep_row(params: Mapping[str, str], metrics: Mapping[str, float], status: str) -> tuple[str, ...]:
    """One line of a sweep's closing table."""
    def m(key: str, scale: float = 1.0, fmt: str = "{:.2f}") -> str:
        value = _num(metrics, key)
        return "—" if value is None else fmt.format(value * scale)

    calib = params.get("calib_method", "") if params.get("precision") == "int8" else "—"
    return (params.get("model", "?"), params.get("precision", "?"), calib, m("size/model_bytes", 1e-6), m("compress/total_s"),
            m("acc/top1", 100.0), m("acc/top1_drop_pt"), m("latency/p50_ms", fmt="{:.3f}"), m("speedup/p50"), status)
