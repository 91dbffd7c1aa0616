"""Ask pip's resolver whether each JetPack constraint file installs ptq's device dependencies as aarch64 wheels for
that JetPack's Python, without a Jetson: a dry run with --platform, wheels only."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"jetpack5.txt": "3.8", "jetpack6.txt": "3.10"}
EXTRAS = ("ort", "jetson", "report", "dev")  # what a device installs (README "On a Jetson"); torch stays NVIDIA's
PLATFORMS = ("manylinux2014_aarch64", "manylinux_2_17_aarch64", "manylinux_2_28_aarch64", "linux_aarch64")


def main() -> int:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *(d for e in EXTRAS for d in project["optional-dependencies"][e])]
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text("\n".join(wanted) + "\n")
        for constraints, python in TARGETS.items():
            cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--dry-run", "--ignore-installed", "--target", f"{tmp}/t",
                   "--only-binary=:all:", "--python-version", python, "--implementation", "cp", *(f"--platform={p}" for p in PLATFORMS),
                   "-c", str(ROOT / "constraints" / constraints), "-r", str(requirements)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            lines = [line for line in (done.stdout + done.stderr).splitlines() if not line.startswith("WARNING: Location")]
            verdict = next((line for line in lines if line.startswith("Would install")), "\n".join(lines[-5:]))
            print(f"{constraints} (aarch64, CPython {python}): {'ok' if done.returncode == 0 else 'FAILED'}: {verdict[:400]}")
            failed += done.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
