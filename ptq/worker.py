"""Where a model's timed queries run: in this process, or in a lean worker process that holds only the runtime and
the model, as a deployment would (optimum-benchmark's process launcher; trtexec is its own process).

The worker is started with multiprocessing's 'spawn' (no fork of a process holding torch or ONNX Runtime threads),
opens its session itself from the model's files, gets the latency batch once, and answers "warm up" and "time a
block of N queries" with the per-query times it measured around each `session.run`: the pipe is outside the timed
region. It imports neither torch nor mlflow; the parent does the bookkeeping and the logging.
"""

from __future__ import annotations

import json
import multiprocessing
import signal
import sys
import time
import types
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from typing import Any, Callable, Dict, Optional

import numpy as np

from ptq.backends import Compressed, Session, get_backend
from ptq.errors import PtqError

Clock = Callable[[], float]
LATENCY_PROCESSES = ("inprocess", "worker")
WORKER_BACKENDS = ("ort", "tensorrt")  # torch's model is a torch module: its worker would hold torch itself


@dataclass
class Block:
    """One block's timed queries: seconds per query, the block's wall seconds, and the GPU compute time (ms) of
    each query where the session has a device clock."""

    seconds: np.ndarray
    wall_s: float
    gpu_ms: Optional[np.ndarray] = None


def time_queries(session: Session, batch: np.ndarray, queries: int, clock: Clock = time.perf_counter) -> Block:
    """`queries` timed runs of `batch`, each timed alone; the session's GPU times cleared before and collected after,
    so they belong to exactly these queries (a query that ran in chunks sums its chunks)."""
    session.gpu_ms()
    samples = np.empty(queries, dtype=np.float64)
    start = clock()
    for i in range(queries):
        t0 = clock()
        session.run(batch)
        samples[i] = clock() - t0
    wall = clock() - start
    gpu = session.gpu_ms()
    if gpu is None:
        return Block(samples, wall)
    if not gpu or len(gpu) % queries:
        raise RuntimeError(f"the session reported {len(gpu)} GPU times for {queries} queries: they cannot be matched to queries")
    return Block(samples, wall, np.asarray(gpu, dtype=np.float64).reshape(queries, -1).sum(axis=1))


def warm_up(session: Session, batch: np.ndarray, queries: int) -> None:
    """Untimed queries that let caches, allocators, JIT and clocks settle before timing."""
    for _ in range(queries):
        session.run(batch)


class Timer(ABC):
    """One model's queries on the latency batch, timed where the model runs."""

    pid: Optional[int] = None  # the worker process's id; None: this process

    @abstractmethod
    def warm_up(self, queries: int) -> None:
        """Untimed queries."""

    @abstractmethod
    def block(self, queries: int) -> Block:
        """`queries` timed queries."""


class InProcess(Timer):
    """The model's session in this process, timed by `clock`."""

    def __init__(self, session: Session, batch: np.ndarray, clock: Clock = time.perf_counter) -> None:
        self.session, self.batch, self.clock = session, batch, clock

    def warm_up(self, queries: int) -> None:
        warm_up(self.session, self.batch, queries)

    def block(self, queries: int) -> Block:
        return time_queries(self.session, self.batch, queries, self.clock)


def open_session(backend: str, model: Compressed, threads: int) -> Session:
    """The backend's session on `model`'s files. A TensorRT engine is deserialized from its file as it is: the parent
    opened it already, which checked it against this machine (that check names the GPU through ptq.tracking, which
    imports mlflow)."""
    if backend == "tensorrt":
        from ptq.backends.tensorrt import TensorRTBackend, TrtSession

        trt_backend = TensorRTBackend()
        meta = model.path.with_suffix(".json")
        dla_core = int(json.loads(meta.read_text()).get("dla_core", -1)) if meta.is_file() else -1
        return TrtSession(trt_backend.deserialize(model.path, dla_core), trt_backend.new_cuda())
    return get_backend(backend).open(model, threads)


def serve(conn: Connection, backend: str, model: Compressed, threads: int, batch: np.ndarray) -> None:
    """The worker's loop: open the session (answering with the packages it imported), then answer ("warmup", n),
    ("block", n) and ("stop", None) until told to stop or the parent is gone; a failure is sent back as ("error", message)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole terminal group: the parent stops its workers
    try:
        session = open_session(backend, model, threads)
        conn.send(("ok", sorted({name.partition(".")[0] for name in sys.modules})))
        while True:
            try:
                kind, n = conn.recv()
            except EOFError:  # the parent is gone
                return
            if kind == "stop":
                return
            if kind == "warmup":
                start = time.perf_counter()
                warm_up(session, batch, n)
                conn.send(("ok", time.perf_counter() - start))
            else:
                conn.send(("ok", time_queries(session, batch, n)))
    except Exception as exc:
        try:
            conn.send(("error", str(exc) if isinstance(exc, PtqError) else f"{type(exc).__name__}: {exc}".splitlines()[0]))
        except OSError:  # the parent is gone: nobody to tell
            pass


class Worker(Timer):
    """A worker process serving one model, started when constructed; `ready` waits for its session."""

    START_TIMEOUT_S = 600.0  # spawning, importing the runtime and opening the model (a TensorRT engine on a Jetson)
    REPLY_TIMEOUT_S = 600.0  # a reply, beyond what the warm-up's pace predicts for a block
    POLL_S = 0.1  # how often a wait checks that the worker is alive
    STOP_TIMEOUT_S = 5.0

    def __init__(self, name: str, backend: str, model: Compressed, threads: int, batch: np.ndarray) -> None:
        self.name = name
        self.per_query_s = 0.0
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=serve, args=(child, backend, replace(model, handle=None), threads, batch), name=f"ptq-latency-{name}", daemon=True
        )
        with _lean_main():
            self.process.start()
        child.close()
        self.pid = self.process.pid

    def ready(self) -> None:
        """Wait until the worker has opened its session; `modules`: the top-level packages it imported, what it holds."""
        self.modules: list[str] = self._reply(self.START_TIMEOUT_S)

    def warm_up(self, queries: int) -> None:
        seconds = self._ask("warmup", queries, self.REPLY_TIMEOUT_S)
        self.per_query_s = seconds / max(queries, 1)

    def block(self, queries: int) -> Block:
        block: Block = self._ask("block", queries, self.REPLY_TIMEOUT_S + 100 * self.per_query_s * queries)
        return block

    def _ask(self, kind: str, n: int, timeout: float) -> Any:
        try:
            self.conn.send((kind, n))
        except OSError:  # a broken pipe: the worker is gone
            raise self._died() from None
        return self._reply(timeout)

    def _reply(self, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while not self.conn.poll(self.POLL_S):
            if not self.process.is_alive():
                raise self._died()
            if time.monotonic() > deadline:
                raise PtqError(f"the latency worker of the {self.name} model (pid {self.pid}) did not answer within {timeout:.0f} s: rerun with latency_process=inprocess")
        try:
            kind, value = self.conn.recv()
        except (EOFError, OSError):
            raise self._died() from None
        if kind == "error":
            raise PtqError(f"the latency worker of the {self.name} model failed: {value}")
        return value

    def _died(self) -> PtqError:
        self.process.join(self.STOP_TIMEOUT_S)
        code = self.process.exitcode
        how = f"died of {signal.Signals(-code).name}" if code is not None and code < 0 else f"exited with status {code}"
        return PtqError(
            f"the latency worker of the {self.name} model (pid {self.pid}) {how} (out of memory? see dmesg): rerun with latency_process=inprocess to see the runtime's own error"
        )

    def close(self) -> None:
        """Stop the worker: asked, then terminated, then killed; always joined."""
        if self.process.is_alive():
            try:
                self.conn.send(("stop", None))
            except OSError:
                pass
            self.process.join(self.STOP_TIMEOUT_S)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(self.STOP_TIMEOUT_S)
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()
        self.process.close()


@contextmanager
def _lean_main() -> Iterator[None]:
    """While a worker is spawned, an empty `__main__`: spawn re-imports the parent's main module in the child
    (CPython Lib/multiprocessing/spawn.py, get_preparation_data), and ptq's CLI would bring torch and mlflow."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


@contextmanager
def workers(backend: str, models: Dict[str, Compressed], names: Dict[str, str], threads: int, batch: np.ndarray) -> Iterator[Dict[str, Timer]]:
    """One worker per model (keys as `models`, named `names`), each terminated and joined on the way out, whatever
    ends the block (an error, Ctrl-C, SIGTERM); multiprocessing's resource tracker goes too where this started it."""
    if backend not in WORKER_BACKENDS:
        raise PtqError(f"latency_process=worker runs backends {', '.join(WORKER_BACKENDS)}, not {backend}: use latency_process=inprocess")
    tracker_was_running = getattr(resource_tracker._resource_tracker, "_fd", None) is not None
    with ExitStack() as stack:
        if not tracker_was_running:  # registered first, so it runs after every worker is gone
            stack.callback(resource_tracker._resource_tracker._stop)  # type: ignore[attr-defined]
        started: Dict[str, Timer] = {}
        for key, model in models.items():
            worker = Worker(names[key], backend, model, threads, batch)
            stack.callback(worker.close)
            worker.ready()
            started[key] = worker
        yield started
