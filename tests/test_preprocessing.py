"""Preprocessing parity: ptq's cached uint8 decode, normalized per batch, equals torchvision's own eval transform."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.models as tvm
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification

from ptq import data, models
from ptq.models import Transform

# ptq divides by 255 * std and subtracts mean / std where torchvision divides by 255, subtracts mean and divides
# by std: the same uint8 pixels then differ by float32 rounding only (measured: at most 4.8e-7, two ulps).
TOL = 1e-6

HALF = (0.5, 0.5, 0.5)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# EfficientNet-Lite has no torchvision weights: its reference is the same preset with the lite constants.
LITE_REFERENCE = {
    "lite1": ImageClassification(crop_size=240, resize_size=272, mean=HALF, std=HALF),
    "lite2": ImageClassification(crop_size=260, resize_size=292, mean=HALF, std=HALF),
}


def _reference(name: str) -> ImageClassification:
    """torchvision's eval transform for a ptq model name: the DEFAULT weights' own transforms()."""
    if name in LITE_REFERENCE:
        return LITE_REFERENCE[name]
    tr = tvm.get_model_weights(models.TORCHVISION_ALIASES.get(name, name)).DEFAULT.transforms()
    assert isinstance(tr, ImageClassification)
    return tr


def _assert_parity(folder: Path, t: Transform, reference: ImageClassification) -> float:
    """ptq's batch equals the reference on every image of `folder`, with identical uint8 pixels; returns the max difference."""
    ds = data.scan(folder)
    tensors = data.load_tensors(ds, t, progress=False)
    assert tensors.ok.all()
    ours = tensors.batch(list(range(len(ds.files))))
    theirs = torch.stack([reference(Image.open(f).convert("RGB")) for f in ds.files]).numpy()
    assert ours.shape == theirs.shape
    mean, std = (np.asarray(v, np.float32).reshape(1, 3, 1, 1) for v in (t.mean, t.std))
    np.testing.assert_array_equal(tensors.pixels, np.rint((theirs * std + mean) * 255).astype(np.uint8))
    diff = float(np.abs(ours - theirs).max())
    assert diff <= TOL
    return diff


@pytest.mark.parametrize(
    ("name", "resize", "crop", "interpolation"),
    [
        ("r50", 232, 224, "bilinear"),
        ("efficientnet_b2", 288, 288, "bicubic"),
        ("swin_t", 232, 224, "bicubic"),
        ("lite1", 272, 240, "bilinear"),
        ("lite2", 292, 260, "bilinear"),
    ],
)
def test_sample_images_match_torchvision(name: str, resize: int, crop: int, interpolation: str, sample_dir: Path, tmp_path: Path) -> None:
    t = models.resolve(name).transform
    assert (t.resize, t.crop, t.interpolation) == (resize, crop, interpolation)  # the sample's 256 short side is really resized
    folder = tmp_path / "images"
    folder.mkdir()
    for f in sorted(sample_dir.iterdir())[::61][:16]:
        (folder / f.name).symlink_to(f)
    _assert_parity(folder, t, _reference(name))


@pytest.fixture
def odd_sizes(sample_dir: Path, tmp_path: Path) -> Path:
    """Real images resized to short sides other than the sample's 256, portrait, landscape, square, tiny and very wide."""
    folder = tmp_path / "odd"
    folder.mkdir()
    sizes = [(333, 500), (500, 333), (499, 375), (375, 499), (257, 301), (300, 300), (150, 91), (1001, 233)]
    for i, ((w, h), src) in enumerate(zip(sizes, sorted(sample_dir.iterdir())[::97])):
        with Image.open(src) as img:
            img.convert("RGB").resize((w, h), Image.Resampling.LANCZOS).save(folder / f"{src.name.split('_')[0]}_{i}_{w}x{h}.png")
    return folder


@pytest.mark.parametrize("name", ["r50", "efficientnet_b0", "lite2"])
def test_odd_sizes_match_torchvision(name: str, odd_sizes: Path) -> None:
    _assert_parity(odd_sizes, models.resolve(name).transform, _reference(name))


def test_crop_larger_than_resize_pads_like_torchvision(odd_sizes: Path) -> None:
    reference = ImageClassification(
        crop_size=224, resize_size=199, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation=InterpolationMode.BICUBIC
    )
    _assert_parity(odd_sizes, Transform(199, 224, IMAGENET_MEAN, IMAGENET_STD, "bicubic"), reference)
