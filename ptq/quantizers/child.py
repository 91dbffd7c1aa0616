"""The child side of a toolkit quantizer: `python -m ptq.quantizers.child JOB.json FD`, run by `ptq.quantizers.toolkit`
in the toolkit's environment. It imports only the adapter (and through it the toolkit), announces each technique on
file descriptor FD as a JSON line, writes the QDQ ONNX and its record."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np


def versions(distribution: str) -> dict[str, str]:
    """The toolkit's version and those of the libraries the QDQ file depends on, as this environment has them."""
    out = {}
    for name in (distribution, "onnx", "onnxruntime", "numpy", "torch"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {**out, "python": platform.python_version()}


def main(argv: list[str]) -> None:
    """Run the job in `argv[0]`, announcing phases on descriptor `argv[1]`."""
    job: dict[str, Any] = json.loads(Path(argv[0]).read_text())
    events = os.fdopen(int(argv[1]), "w", buffering=1)

    def mark(phase: str) -> None:
        events.write(json.dumps({"phase": phase}) + "\n")
        events.flush()

    adapter = importlib.import_module(job["adapter"])
    options = adapter.Options(**job["options"])
    calibration = np.load(job["calibration"])
    record = adapter.quantize(Path(job["model"]), calibration, Path(job["out"]), options, mark, job["tensorrt"])
    record = {"quantizer": adapter.NAME, "techniques": list(options.techniques()), "settings": job["options"], "tensorrt": job["tensorrt"], "versions": versions(adapter.DISTRIBUTION), **record}
    Path(job["record"]).write_text(json.dumps(record, indent=1))
    events.close()


if __name__ == "__main__":
    main(sys.argv[1:])
