"""PyTorch eager backend: the framework baseline, FP32 and FP16 on CUDA when present, on the CPU otherwise."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import numpy as np

from ptq.backends import Backend, Compressed, CompressJob, Session
from ptq.errors import PtqError

if TYPE_CHECKING:
    import torch


class TorchSession(Session):
    """A module on a device; `run` copies the result to the host, so GPU work is finished when it returns."""

    def __init__(self, module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        self.module, self.device, self.dtype = module, device, dtype

    def run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device, self.dtype, non_blocking=True)
            return self.module(x).float().cpu().numpy()  # type: ignore[no-any-return]


class TorchBackend(Backend):
    name = "torch"
    runs_qdq = False  # it runs the torch module itself, not an ONNX file
    precisions = ("fp32", "fp16")

    def __init__(self) -> None:
        try:
            import torch
        except ImportError:
            raise PtqError("backend=torch needs torch, which is not installed here: pip install 'ptq[torch]' (on a Jetson, NVIDIA's wheel)") from None
        self.dev = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")

    def check(self, precision: str, onnx_only: bool = False) -> None:
        if precision == "int8":
            raise PtqError("the torch backend runs fp32 and fp16 only (eager baseline): use backend=ort or backend=tensorrt for int8")
        if onnx_only:
            raise PtqError("the torch backend needs a torch model (alias, torchvision or lite name), not an .onnx file: use backend=ort")
        super().check(precision)

    def compress(self, job: CompressJob) -> Compressed:
        assert job.module is not None  # check() refused model=*.onnx
        import torch

        with job.phases("convert"):
            module = copy.deepcopy(job.module).eval()
            if job.precision == "fp16":
                module = module.half()
            path = job.workdir / f"model_{job.precision}.pt"
            torch.save(module.state_dict(), path)
        return Compressed(path, handle=module, numerics=self.numerics(job.precision))

    def numerics(self, precision: str) -> str:
        """On CUDA, float32 matmuls and convolutions may run in TF32 (PyTorch's default for cuDNN); ptq turns it off."""
        return f"{precision} (TF32 off)" if self.dev.type == "cuda" and precision == "fp32" else precision

    def open(self, model: Compressed, threads: int) -> Session:
        import torch

        if not isinstance(model.handle, torch.nn.Module):
            raise PtqError(f"{model.path} was not produced by the torch backend in this run")
        if self.dev.type == "cpu":
            torch.set_num_threads(threads)
        else:
            torch.backends.cudnn.benchmark = True  # let cuDNN pick kernels during warm-up, as TensorRT does at build
            torch.backends.cuda.matmul.allow_tf32 = False  # "fp32" means fp32, not TF32 (see numerics)
            torch.backends.cudnn.allow_tf32 = False
        module = model.handle.to(self.dev)
        dtype = next(module.parameters()).dtype
        return TorchSession(module, self.dev, dtype)

    def versions(self) -> dict[str, str]:
        import torch

        out = {"torch": str(torch.__version__)}
        if torch.version.cuda:
            out["cuda"] = str(torch.version.cuda)
        if torch.backends.cudnn.is_available():
            out["cudnn"] = str(torch.backends.cudnn.version())
        return out

    def device(self) -> str:
        import torch

        return torch.cuda.get_device_name(0) if self.dev.type == "cuda" else "cpu"


BACKEND = TorchBackend
