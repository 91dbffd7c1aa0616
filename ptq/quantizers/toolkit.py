"""Run a toolkit quantizer (NNCF, Quark, AIMET) in a process of its own, in the Python environment that has it.

The toolkits' pins conflict with ptq's and with each other (Quark wants onnx <= 1.22, AIMET torch), so each may run in
a virtual environment of its own that `ptq env NAME` makes, layered on this one (its own pins first, then this
environment's packages: torch and ONNX Runtime are shared, not downloaded again). The FP32 ONNX and the calibration
tensors go in as files, the QDQ ONNX and a record come out; the child announces each technique as it starts, so the
run times it as a phase, and the monitor samples the child's memory and CPU apart from ptq's own.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import venv
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ptq.errors import PtqError
from ptq.phases import Phases

REQUIREMENTS = Path(__file__).parent / "requirements"
LOG = "quantizer.log"  # the child's own output, in the run's work folder
START_PHASE = "toolkit_start"  # the child's interpreter start and the toolkit's import, until its first technique
TAIL_LINES = 3  # of the child's output, in a failed run's one-line error


@dataclass(frozen=True)
class Toolkit:
    """How to reach a toolkit: its pip distribution, the module that proves it is installed, ptq's adapter module."""

    name: str
    distribution: str
    module: str
    adapter: str

    @property
    def requirements(self) -> Path:
        """The pinned requirements of its own environment."""
        return REQUIREMENTS / f"{self.name}.txt"

    def env_dir(self, root: Path) -> Path:
        """Its environment under `root`, named for the requirements' content, so new pins make a new environment."""
        digest = hashlib.sha256(self.requirements.read_bytes()).hexdigest()[:10]
        return root / f"{self.name}-{digest}"


TOOLKITS = {
    "nncf": Toolkit("nncf", "nncf", "nncf", "ptq.quantizers.nncf"),
    "quark": Toolkit("quark", "amd-quark", "quark.onnx", "ptq.quantizers.quark"),
    "aimet": Toolkit("aimet", "aimet-onnx", "aimet_onnx", "ptq.quantizers.aimet"),
}


def envs_root() -> Path:
    """Where ptq keeps the toolkits' environments: $PTQ_CACHE_DIR/envs (default ~/.cache/ptq/envs)."""
    return Path(os.environ.get("PTQ_CACHE_DIR", Path.home() / ".cache" / "ptq")) / "envs"


def python_for(kit: Toolkit) -> tuple[str, str]:
    """The Python that runs `kit` and how it was chosen: $PTQ_<NAME>_PYTHON, this environment where the toolkit is
    installed in it, else the environment `ptq env` made; none of these is one line saying how to get one."""
    pointed = os.environ.get(f"PTQ_{kit.name.upper()}_PYTHON")
    if pointed:
        if not Path(pointed).is_file():
            raise PtqError(f"PTQ_{kit.name.upper()}_PYTHON={pointed} is not a file: point it at the python of an environment that has {kit.distribution}")
        return pointed, f"PTQ_{kit.name.upper()}_PYTHON"
    if _importable(kit.module):
        return sys.executable, "this environment"
    own = kit.env_dir(envs_root()) / "bin" / "python"
    if own.is_file():
        return str(own), f"its own environment ({own.parent.parent})"
    raise PtqError(
        f"quantizer {kit.name} needs {kit.distribution}, which this environment lacks: run `ptq env {kit.name}` once (an environment "
        f"of its own with {kit.requirements.name}'s pins), or set PTQ_{kit.name.upper()}_PYTHON to a python that has it"
    )


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def check(name: str, target: str = "", options: Any = None) -> str:
    """Before any work: the environment that will run quantizer `name` (with `options`) for a backend wanting `target`'s
    Q/DQ layout ("tensorrt" or "" for any), in words; one line naming the fix where there is none, or where the
    toolkit cannot lay these options' Q/DQ out so."""
    python, how = _python_for(name, target, options)
    return f"{python} ({how})"


def _python_for(name: str, target: str, options: Any) -> tuple[str, str]:
    kit = TOOLKITS[name]
    if target == "tensorrt" and not importlib.import_module(kit.adapter).TENSORRT:
        able = ", ".join(k for k, t in TOOLKITS.items() if importlib.import_module(t.adapter).TENSORRT)
        raise PtqError(f"quantizer {name} writes Q/DQ that TensorRT's rules refuse (uint8 and per-channel activations): use quantizer {able} or ort with backend tensorrt")
    if hasattr(options, "check_target"):
        options.check_target(target == "tensorrt")
    return python_for(kit)


def describe(record: dict[str, Any]) -> str:
    """A toolkit's QDQ model in words, for the numerics tag: toolkit, version, techniques, weight scales."""
    kit = TOOLKITS[record["quantizer"]]
    scales = "per-channel" if record["settings"].get("per_channel") else "per-tensor"
    layout = ", laid out for TensorRT" if record.get("tensorrt") else ""
    changed = f"; CLE made {record['relu6_made_relu']} ReLU6 into ReLU: the float network changed" if record.get("relu6_made_relu") else ""
    return f"int8 QDQ by {kit.distribution} {record['versions'].get(kit.distribution, '?')}: {', '.join(record['techniques'])}; {scales} weights{layout}{changed}"


def make_env(name: str, root: Path | None = None) -> Path:
    """Create (or bring up to date) `name`'s environment: a venv whose own packages are the toolkit's pins and which
    sees this environment's packages after them; returns its python."""
    kit = TOOLKITS.get(name)
    if kit is None:
        raise PtqError(f"unknown toolkit {name!r}: use one of {', '.join(TOOLKITS)}")
    target = kit.env_dir(root or envs_root())
    python = target / "bin" / "python"
    if not python.is_file():
        venv.EnvBuilder(with_pip=True, clear=True).create(target)
        site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
        (site / "zz_ptq_parent.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # .pth lines go after its own site-packages
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r", str(kit.requirements)]
    done = subprocess.run(pip, capture_output=True, text=True)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise PtqError(f"installing {kit.requirements.name} into {target} failed ({last}): see `{' '.join(pip)}`")
    return python


@dataclass
class Quantized:
    """What a toolkit quantizer made: the QDQ ONNX, its record (toolkit, versions, techniques, settings, environment)."""

    path: Path
    record: dict[str, Any]


@dataclass(frozen=True)
class Job:
    """The files a child reads and writes (all in the run's work folder) and the quantizer's options."""

    adapter: str
    model: str
    calibration: str
    out: str
    record: str
    options: dict[str, Any]
    tensorrt: bool  # Q/DQ laid out as TensorRT takes it


def quantize(
    name: str, options: Any, fp32: Path, batches: Iterator[np.ndarray], work: Path, phases: Phases,
    watch: Callable[[dict[str, int]], None] | None = None, target: str = "",
) -> Quantized:
    """Quantize `fp32` with toolkit `name` in a child process, Q/DQ laid out for `target` ("tensorrt", or "" for any
    runtime); each technique it announces becomes a phase of `phases`, `watch` is told its pid (the monitor samples it).
    A failed child fails the run with its last lines."""
    kit = TOOLKITS[name]
    python, how = _python_for(name, target, options)
    job = Job(kit.adapter, str(fp32), str(work / "calibration.npy"), str(work / "model_int8_qdq.onnx"), str(work / "quantizer_record.json"), asdict(options), target == "tensorrt")
    logfile = work / LOG
    read, write = os.pipe()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    with ExitStack() as stack:
        current = stack.enter_context(ExitStack())
        current.enter_context(phases(START_PHASE))
        np.save(job.calibration, np.concatenate(list(batches)))
        (work / "quantizer_job.json").write_text(json.dumps(asdict(job)))
        with logfile.open("w") as out:
            child = subprocess.Popen(  # in the work folder: toolkits write files where they run (Quark its quantized_info.csv)
                [python, "-m", "ptq.quantizers.child", str(work / "quantizer_job.json"), str(write)], stdout=out, stderr=subprocess.STDOUT, env=env, pass_fds=(write,), cwd=work
            )
        os.close(write)
        stack.callback(_reap, child)
        if watch:
            watch({"quantizer_": child.pid})
            stack.callback(watch, {})
        with os.fdopen(read) as events:
            for line in events:  # {"phase": name} as each technique starts
                current.close()
                current = stack.enter_context(ExitStack())
                current.enter_context(phases(json.loads(line)["phase"]))
        code = child.wait()
        current.close()
    if code:  # its last lines, less the caret lines Python draws under the failing expression
        tail = [ln.strip() for ln in logfile.read_text(errors="replace").splitlines() if ln.strip(" ^~\t")][-TAIL_LINES:]
        raise PtqError(f"quantizer {name} failed (exit {code}; {python}): {' | '.join(tail)[-600:]}: the whole log is {logfile.name} in the run")
    record = json.loads(Path(job.record).read_text())
    record["environment"] = f"{python} ({how})"
    if not qdq_nodes(Path(job.out)):
        raise PtqError(f"quantizer {name} wrote a model without QuantizeLinear/DequantizeLinear nodes: nothing was quantized (see {logfile.name})")
    return Quantized(Path(job.out), record)


def qdq_nodes(path: Path) -> int:
    """How many QuantizeLinear/DequantizeLinear nodes a model has."""
    import onnx

    return sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in onnx.load(str(path), load_external_data=False).graph.node)


def _reap(child: subprocess.Popen) -> None:  # type: ignore[type-arg]
    """A child still running when the run stops (an error, a signal) is ended, never left behind."""
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
