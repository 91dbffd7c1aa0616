"""Memory and time against the size of the data folder (issue 23): the same run on 1k / 10k / 50k-image folders.

Each folder links the 1000 sample images again and again under new names (`<wnid>_<id>_copy<k>.JPEG`); each
run is lite0 INT8 with calib_size=100, eval_size=500 (--eval-size 0: the default, every other image), in its
own fresh process (peak RSS is the run's own) with a fresh tensor cache (first run: a miss), then once more
on the same cache (a hit). Prints one Markdown row per run: load_data seconds, the process's peak RSS while
compressing and while timing latency, the model's own figures (the increase over the level before each phase),
and the cache's size on disk. Run it alone on a quiet machine:

    .venv/bin/python bench/data_scaling.py [--sizes 1000,10000,50000] [--eval-size 500] [--weights pretrained]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import DATA  # noqa: E402

COLUMNS = ("images", "cache", "load_data s", "compress peak RSS MB", "compress +MB (own)", "latency peak RSS MB", "latency +MB (own)",
           "cache GB", "data_hash")  # fmt: skip


def link_folder(folder: Path, n: int) -> Path:
    """A flat folder of `n` links to the sample images, cycling through them under new names of the same class."""
    folder.mkdir(parents=True)
    images = sorted(DATA.iterdir())
    for k in range(n):
        src = images[k % len(images)]
        copy = k // len(images)
        (folder / (src.name if copy == 0 else f"{src.stem}_copy{copy}{src.suffix}")).symlink_to(src)
    return folder


def one_run(folder: Path, eval_size: int, weights: str) -> dict[str, object]:
    """In this (fresh) process: one run, and its figures read back from what it logged."""
    import mlflow

    from ptq import pipeline
    from ptq.config import RunConfig

    cfg = RunConfig(model="lite0", weights=weights, precision="int8", data=folder, calib_size=100, eval_size=eval_size or None, progress=False)
    run_id = pipeline.run(cfg)
    run = mlflow.get_run(run_id)
    table = mlflow.artifacts.load_dict(f"runs:/{run_id}/phases.json")
    rows = {row[0]: dict(zip(table["columns"], row)) for row in table["data"]}
    return {
        "load_data_s": rows["load_data"]["seconds"],
        "compress_peak": run.data.metrics.get("compress/peak_rss_mb"),
        "compress_delta": run.data.metrics.get("compress/peak_rss_delta_mb"),
        "latency_peak": rows["latency"].get("peak_rss_mb"),
        "latency_delta": rows["latency"].get("peak_rss_delta_mb"),
        "cache": run.data.tags.get("ptq.tensor_cache"),
        "data_hash": run.data.params.get("data_hash"),
    }


def cache_gb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / (1 << 30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,50000")
    parser.add_argument("--eval-size", type=int, default=500)
    parser.add_argument("--weights", default="pretrained")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one folder in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(Path(args.one), args.eval_size, args.weights)))
        return
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    with tempfile.TemporaryDirectory(prefix="ptq-data-scaling-") as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            folder = link_folder(Path(tmp) / f"images-{n}", n)
            env = {**os.environ, "PTQ_CACHE_DIR": str(Path(tmp) / f"cache-{n}"), "MLFLOW_TRACKING_URI": f"sqlite:///{Path(tmp) / 'mlflow.db'}"}
            for _attempt in ("miss", "hit"):
                out = subprocess.run([sys.executable, __file__, "--one", str(folder), "--eval-size", str(args.eval_size), "--weights", args.weights],
                                     env=env, capture_output=True, text=True, check=True).stdout  # fmt: skip
                r = json.loads(out.strip().splitlines()[-1])
                cells = (n, r["cache"], f"{r['load_data_s']:.2f}", *(f"{r[k]:.0f}" if r[k] is not None else "—" for k in
                         ("compress_peak", "compress_delta", "latency_peak", "latency_delta")), f"{cache_gb(Path(env['PTQ_CACHE_DIR'])):.3f}", r["data_hash"])  # fmt: skip
                print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
