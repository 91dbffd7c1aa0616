"""Look at a run the way a researcher does: serve the store with `mlflow server`, open the run in headless
Chromium and check that its experiment's runs table names it, its first screen shows the headline and its
logged models, its System metrics tab has charts and the experiment's Models page lists its models;
screenshots of each go to OUT.

Usage: python examples/ui_check.py [RUN_ID] [--out ui-check]   (store: MLFLOW_TRACKING_URI, default the local
mlflow.db; run: the newest FINISHED study run in any experiment). Needs Debian's chromium (/usr/bin/chromium or
$CHROMIUM) and `pip install playwright` (it drives that browser; no browser download).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import mlflow

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@contextmanager
def served(store: str, log: Path) -> Iterator[str]:
    """`mlflow server` over `store` on a free loopback port, stopped on exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--backend-store-uri", store]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"mlflow server did not start: {log.read_text()[-1000:]}") from None
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)


# MLflow 3.17's UI shows an experiment as GenAI or "Model training" by its own switch (default GenAI, remembered
# per browser) or this URL parameter, not by the experiment's mlflow.experimentKind tag
MODEL_TRAINING = "?workflowType=machine_learning"


def check(run_id: str, out: Path) -> dict[str, object]:
    """Open the experiment's runs table, the run's overview and System metrics tab and the experiment's models;
    return what was seen, screenshots in `out`."""
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    run = mlflow.get_run(run_id)
    seen: dict[str, object] = {}
    with served(mlflow.get_tracking_uri(), out / "server.log") as base, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        page.goto(f"{base}/#/experiments/{run.info.experiment_id}/runs{MODEL_TRAINING}")
        with suppress(PlaywrightError):
            page.get_by_text(run.info.run_name, exact=True).first.wait_for(timeout=60000)
        page.wait_for_timeout(2000)
        page.screenshot(path=str(out / "runs_table.png"))
        seen["runs_table"] = page.get_by_text(run.info.run_name, exact=True).count() > 0
        page.goto(f"{base}/#/experiments/{run.info.experiment_id}/runs/{run_id}{MODEL_TRAINING}")
        page.get_by_role("tab", name="Overview").wait_for(timeout=60000)
        page.wait_for_timeout(3000)
        page.screenshot(path=str(out / "overview.png"), full_page=True)
        seen["description"] = page.get_by_text("speed-up over fp32 (p50)").count() > 0
        names = ("fp32-onnx", f"{run.data.params.get('precision', '')}-")
        page.get_by_text("Logged models").first.scroll_into_view_if_needed()  # a table below the run's parameters
        seen["logged_models"] = [n for n in names if page.get_by_text(n).count() > 0]
        page.get_by_role("tab", name="System metrics").click()
        page.wait_for_timeout(5000)
        page.screenshot(path=str(out / "system_metrics.png"), full_page=True)
        seen["system_charts"] = page.locator(".js-plotly-plot, canvas, svg.main-svg").count()
        page.goto(f"{base}/#/experiments/{run.info.experiment_id}/models{MODEL_TRAINING}")
        page.wait_for_timeout(5000)
        page.screenshot(path=str(out / "logged_models.png"), full_page=True)
        seen["models_page"] = [n for n in names if page.get_by_text(n).count() > 0]
        browser.close()
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_id", nargs="?")
    parser.add_argument("--out", type=Path, default=Path("ui-check"))
    args = parser.parse_args()
    run_id = args.run_id
    if not run_id:
        runs = mlflow.search_runs(search_all_experiments=True, filter_string="attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"])
        for column in ("params.precision", "tags.ptq.kind"):
            if column not in runs:
                runs[column] = None
        # a study run: a precision measured, not a report (`mlflow run -e report` logs precision=''), tune or sensitivity run
        runs = runs[runs["params.precision"].isin(["fp32", "fp16", "int8"]) & runs["tags.ptq.kind"].isna()]
        if runs.empty:
            sys.exit("no finished ptq run in any experiment: run the README's main command first")
        run_id = runs.iloc[0].run_id
    seen = check(run_id, args.out)
    for key, value in seen.items():
        print(f"{key}: {value}")
    print(f"screenshots: {args.out}/runs_table.png, {args.out}/overview.png, {args.out}/system_metrics.png, {args.out}/logged_models.png")
    ok = seen["runs_table"] and seen["description"] and seen["system_charts"] and len(seen["models_page"]) == 2  # type: ignore[arg-type]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
