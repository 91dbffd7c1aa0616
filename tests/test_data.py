"""Data: labels, the seeded disjoint split, the tensor cache, unreadable images."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ptq import data
from ptq.errors import PtqError
from ptq.models import Transform

T224 = Transform(256, 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_labels_follow_sorted_wnids(sample_dir: Path) -> None:
    ds = data.scan(sample_dir)
    assert len(ds.files) == 1000
    assert ds.labels == tuple(range(1000))  # one image per class, in torchvision's class order
    assert ds.files[0].name.startswith("n01440764_")  # tench is class 0


def test_imagenet_style_folder(sample_dir: Path, tmp_path: Path) -> None:
    for f in sorted(sample_dir.iterdir())[:3]:
        (tmp_path / f.name.split("_")[0]).mkdir()
        (tmp_path / f.name.split("_")[0] / "img.JPEG").symlink_to(f)
    assert data.scan(tmp_path).labels == (0, 1, 2)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_split_is_disjoint_seeded_and_capped(seed: int) -> None:
    s = data.split(1000, 100, None, seed)
    assert len(s.calib) == 100 and len(s.eval) == 900
    assert not set(s.calib) & set(s.eval)
    assert data.split(1000, 100, None, seed) == s
    assert len(data.split(1000, 100, 50, seed).eval) == 50
    assert set(data.split(1000, 100, 50, seed).calib) == set(s.calib)


def test_split_changes_with_seed() -> None:
    assert data.split(1000, 100, None, 0).calib != data.split(1000, 100, None, 1).calib


def test_split_rejects_bad_sizes() -> None:
    with pytest.raises(PtqError, match="calib_size"):
        data.split(10, 10, None, 0)
    with pytest.raises(PtqError, match="eval_size"):
        data.split(10, 2, 0, 0)


def test_cache_second_load_decodes_nothing(small_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PTQ_CACHE_DIR", str(tmp_path / "cache"))
    ds = data.scan(small_dir)
    first = data.load_tensors(ds, T224, progress=False)
    assert not first.from_cache and first.ok.all()

    def no_decode(*_: object) -> None:
        raise AssertionError("decoded a JPEG although the cache holds it")

    monkeypatch.setattr(data, "_decode", no_decode)
    second = data.load_tensors(ds, T224, progress=False)
    assert second.from_cache
    np.testing.assert_array_equal(first.pixels, second.pixels)
    batch = second.batch([0, 1])
    assert batch.shape == (2, 3, 224, 224) and batch.dtype == np.float32
    assert -1.0 <= batch.min() and batch.max() <= 1.0


def test_cache_keeps_interpolations_and_old_decodes_apart(sample_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PTQ_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "images"
    folder.mkdir()
    for f in sorted(sample_dir.iterdir())[:4]:
        (folder / f.name).symlink_to(f)
    ds = data.scan(folder)
    bilinear = Transform(232, 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    bicubic = replace(bilinear, interpolation="bicubic")
    assert bilinear.key() != bicubic.key()
    old = tmp_path / "cache" / "tensors" / f"{ds.content_hash}-232-224"  # where the pre-torchvision-parity decode cached
    old.parent.mkdir(parents=True)
    np.save(old.with_suffix(".npy"), np.zeros((4, 3, 224, 224), np.uint8))
    old.with_suffix(".json").write_text(json.dumps({"ok": [True] * 4}))
    first = data.load_tensors(ds, bilinear, progress=False)
    assert not first.from_cache and first.pixels.any()
    second = data.load_tensors(ds, bicubic, progress=False)
    assert not second.from_cache and not np.array_equal(first.pixels, second.pixels)
    assert data.load_tensors(ds, bicubic, progress=False).from_cache


def test_unknown_interpolation_is_refused() -> None:
    with pytest.raises(PtqError, match="interpolation"):
        Transform(256, 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "trilinear")


def test_unreadable_image_is_skipped_with_warning(sample_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for f in sorted(sample_dir.iterdir())[:4]:
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / "n01443537_broken.JPEG").write_bytes(b"not a jpeg at all")
    ds = data.scan(tmp_path)
    with caplog.at_level(logging.WARNING):
        tensors = data.load_tensors(ds, T224, progress=False)
    assert tensors.ok.sum() == 4 and not tensors.ok[ds.files.index(tmp_path / "n01443537_broken.JPEG")]
    assert "n01443537_broken.JPEG" in caplog.text


def test_missing_and_empty_folders(tmp_path: Path) -> None:
    with pytest.raises(PtqError, match="does not exist"):
        data.scan(tmp_path / "nope")
    with pytest.raises(PtqError, match="no images"):
        data.scan(tmp_path)


def test_foreign_file_name_is_refused(tmp_path: Path) -> None:
    (tmp_path / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(PtqError, match="wnid"):
        data.scan(tmp_path)
