"""CUDA memory, streams and events for the TensorRT backend, through pycuda or cuda-python, whichever is installed.

As TensorRT's samples do (samples/python/common_runtime.py; trtexec, samples/common/sampleInference.cpp): host
buffers are page-locked, so copies are real DMA and not staged; pycuda uses the device's primary context (the one
cuda-python's runtime API uses too); GPU compute time is taken with CUDA events around the enqueue; every
allocation is freed when the owner closes.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from ptq.errors import PtqError


class Cuda:
    """One stream and the allocations made through it; `close` frees them all."""

    handle: int  # the stream, as TensorRT's execute_async_v3 takes it

    def alloc(self, nbytes: int) -> int:
        """A device allocation's address."""
        raise NotImplementedError

    def free(self, ptr: int) -> None:
        """Free a device allocation made by `alloc`."""
        raise NotImplementedError

    def host(self, shape: tuple[int, ...]) -> np.ndarray:
        """A page-locked float32 host array."""
        raise NotImplementedError

    def to_device(self, dst: int, src: np.ndarray) -> None:
        """Queue a host-to-device copy of all of `src`."""
        raise NotImplementedError

    def to_host(self, dst: np.ndarray, src: int) -> None:
        """Queue a device-to-host copy filling `dst`."""
        raise NotImplementedError

    def synchronize(self) -> None:
        """Wait until every queued copy and kernel has finished."""
        raise NotImplementedError

    def event(self) -> Any:
        """A CUDA event to `record` on the stream."""
        raise NotImplementedError

    def record(self, event: Any) -> None:
        """Record `event` on the stream."""
        raise NotImplementedError

    def elapsed_ms(self, start: Any, end: Any) -> float:
        """GPU time between two recorded events (the stream must be synchronized)."""
        raise NotImplementedError

    def close(self) -> None:
        """Free every device and host allocation still held."""
        raise NotImplementedError


class PyCuda(Cuda):
    """pycuda on the primary context (`pycuda.autoprimaryctx`, pycuda 2021.1+; `autoinit` before that)."""

    def __init__(self, driver: Any) -> None:
        self.drv = driver
        self.stream: Any = driver.Stream()
        self.handle = int(self.stream.handle)
        self.device: dict[int, Any] = {}
        self.pinned: list[np.ndarray] = []

    def alloc(self, nbytes: int) -> int:
        mem = self.drv.mem_alloc(nbytes)
        self.device[int(mem)] = mem
        return int(mem)

    def free(self, ptr: int) -> None:
        self.device.pop(ptr).free()

    def host(self, shape: tuple[int, ...]) -> np.ndarray:
        array: np.ndarray = self.drv.pagelocked_empty(shape, np.float32)
        self.pinned.append(array)
        return array

    def to_device(self, dst: int, src: np.ndarray) -> None:
        self.drv.memcpy_htod_async(dst, src, self.stream)

    def to_host(self, dst: np.ndarray, src: int) -> None:
        self.drv.memcpy_dtoh_async(dst, src, self.stream)

    def synchronize(self) -> None:
        self.stream.synchronize()

    def event(self) -> Any:
        return self.drv.Event()

    def record(self, event: Any) -> None:
        event.record(self.stream)

    def elapsed_ms(self, start: Any, end: Any) -> float:
        return float(end.time_since(start))

    def close(self) -> None:
        for ptr in list(self.device):
            self.free(ptr)
        for array in self.pinned:  # pagelocked_empty's memory goes when its HostAllocation base is freed
            base = getattr(array, "base", None)
            if base is not None and hasattr(base, "free"):
                base.free()
        self.pinned.clear()


class CudaRuntime(Cuda):
    """cuda-python's runtime API (`cuda.bindings.runtime`, or `cuda.cudart` before 12.6), which uses the
    primary context; every call's error code is checked."""

    def __init__(self, cudart: Any) -> None:
        self.rt = cudart
        self.stream: Any = self.ok(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.handle = int(self.stream)
        self.device: set[int] = set()
        self.pinned: dict[int, np.ndarray] = {}
        self.events: list[Any] = []

    @staticmethod
    def ok(result: Any, call: str) -> Any:
        """The value of a cuda-python call ((err, value) or (err,)); a RuntimeError naming the call on an error."""
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise RuntimeError(f"{call} failed: CUDA error {err}")
        return rest[0] if rest else None

    def alloc(self, nbytes: int) -> int:
        ptr = int(self.ok(self.rt.cudaMalloc(nbytes), "cudaMalloc"))
        self.device.add(ptr)
        return ptr

    def free(self, ptr: int) -> None:
        self.device.discard(ptr)
        self.ok(self.rt.cudaFree(ptr), "cudaFree")

    def host(self, shape: tuple[int, ...]) -> np.ndarray:
        nbytes = int(np.prod(shape)) * 4
        ptr = int(self.ok(self.rt.cudaHostAlloc(max(nbytes, 1), self.rt.cudaHostAllocDefault), "cudaHostAlloc"))
        array = np.frombuffer(memoryview((ctypes.c_byte * nbytes).from_address(ptr)).cast("B"), dtype=np.float32).reshape(shape)
        self.pinned[ptr] = array
        return array

    def to_device(self, dst: int, src: np.ndarray) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.ok(self.rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, kind, self.stream), "cudaMemcpyAsync")

    def to_host(self, dst: np.ndarray, src: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.ok(self.rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, kind, self.stream), "cudaMemcpyAsync")

    def synchronize(self) -> None:
        self.ok(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def event(self) -> Any:
        event = self.ok(self.rt.cudaEventCreate(), "cudaEventCreate")
        self.events.append(event)
        return event

    def record(self, event: Any) -> None:
        self.ok(self.rt.cudaEventRecord(event, self.stream), "cudaEventRecord")

    def elapsed_ms(self, start: Any, end: Any) -> float:
        return float(self.ok(self.rt.cudaEventElapsedTime(start, end), "cudaEventElapsedTime"))

    def close(self) -> None:
        for ptr in list(self.device):
            self.free(ptr)
        for ptr in list(self.pinned):
            del self.pinned[ptr]
            self.ok(self.rt.cudaFreeHost(ptr), "cudaFreeHost")
        while self.events:
            self.ok(self.rt.cudaEventDestroy(self.events.pop()), "cudaEventDestroy")
        if self.stream is not None:  # each session and calibrator makes one: destroy it (cudaStreamDestroy, CUDA runtime API)
            stream, self.stream = self.stream, None
            self.ok(self.rt.cudaStreamDestroy(stream), "cudaStreamDestroy")


def open_cuda(install_hint: str) -> Cuda:
    """pycuda on the primary context where pycuda is installed, else cuda-python; `install_hint` if neither is."""
    try:
        try:
            import pycuda.autoprimaryctx  # noqa: F401  (retains the primary context; pycuda >= 2021.1)
        except ImportError as exc:
            if getattr(exc, "name", "") in ("pycuda", "pycuda.driver"):
                raise
            import pycuda.autoinit  # noqa: F401  (older pycuda: a context of its own)
        import pycuda.driver as driver

        return PyCuda(driver)
    except ImportError:
        pass
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError:
            raise PtqError(install_hint) from None
    return CudaRuntime(cudart)
