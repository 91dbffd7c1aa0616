"""Data: labels, the seeded disjoint split, the tensor cache, unreadable images."""

from __future__ import annotations

import json
import logging
import os
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


# Cost follows the work (issue 23): only the split's images are read, decoded and cached.


def _linked(sample_dir: Path, folder: Path, images: int, copies: int = 1) -> Path:
    """A flat folder of `images` real images linked `copies` times each (under new names of the same class)."""
    folder.mkdir()
    for f in sorted(sample_dir.iterdir())[:images]:
        for c in range(copies):
            (folder / (f.name if c == 0 else f"{f.stem}_copy{c}{f.suffix}")).symlink_to(f)
    return folder


class Opened:
    """Records every file opened through builtins.open (PIL's Image.open, ptq's own reads, numpy's files)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import builtins

        self.paths: list[Path] = []
        real = builtins.open

        def spy(file: object, *args: object, **kwargs: object) -> object:
            if isinstance(file, (str, Path)):
                self.paths.append(Path(file))
            return real(file, *args, **kwargs)  # type: ignore[call-overload]

        monkeypatch.setattr(builtins, "open", spy)

    def under(self, folder: Path) -> set[str]:
        return {p.name for p in self.paths if p.parent == folder}


def test_scan_reads_no_image_and_hashes_names_and_sizes(sample_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = _linked(sample_dir, tmp_path / "a", 6)
    b = _linked(sample_dir, tmp_path / "b", 6)  # the same files elsewhere: the same data
    opened = Opened(monkeypatch)
    ds = data.scan(a)
    assert opened.paths == []
    assert ds.content_hash == data.scan(b).content_hash and len(ds.content_hash) == 16
    assert ds.sizes == tuple(f.stat().st_size for f in ds.files)
    (b / ds.files[0].name).unlink()
    (b / ds.files[0].name).write_bytes(ds.files[0].read_bytes()[:-1])  # one byte shorter
    assert data.scan(b).content_hash != ds.content_hash
    (b / ds.files[0].name).unlink()
    assert data.scan(b).content_hash != ds.content_hash  # a file fewer


def test_used_hash_sees_content_the_listing_cannot(sample_dir: Path, tmp_path: Path) -> None:
    a = _linked(sample_dir, tmp_path / "a", 3)
    b = tmp_path / "b"
    b.mkdir()
    for f in sorted(a.iterdir()):
        content = bytearray(f.read_bytes())
        if f == sorted(a.iterdir())[2]:
            content[-3] ^= 0xFF  # same size, other bytes
        (b / f.name).write_bytes(bytes(content))
    da, db = data.scan(a), data.scan(b)
    assert da.content_hash == db.content_hash  # the listing is the same: names and sizes
    assert data.used_hash(da, [0, 1]) == data.used_hash(db, [0, 1])
    assert data.used_hash(da, [0, 2]) != data.used_hash(db, [0, 2])
    assert data.used_hash(da, [0, 1]) != data.used_hash(da, [0, 2])


def test_a_run_reads_only_its_split(sample_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PTQ_CACHE_DIR", str(tmp_path / "cache"))
    folder = _linked(sample_dir, tmp_path / "big", 40, copies=5)
    ds = data.scan(folder)
    split = data.split(len(ds.files), 4, 8, 0)
    used = {ds.files[i].name for i in split.calib + split.eval}
    opened = Opened(monkeypatch)
    data.require_readable(ds, split, ds.readable, calibrate=True)
    tensors = data.load_tensors(ds, T224, progress=False, indices=split.calib + split.eval)
    assert opened.under(folder) == used  # 12 of the 200 files; the other 188 are never opened
    assert tensors.decoded == 12 and tensors.ok.sum() == 12 and not tensors.from_cache
    calib, evaluation = data.usable(ds, split, tensors, calibrate=True)
    assert (calib, evaluation) == (list(split.calib), list(split.eval))
    opened.paths.clear()
    again = data.load_tensors(ds, T224, progress=False, indices=split.calib + split.eval)
    assert again.from_cache and again.decoded == 0 and again.used_hash == tensors.used_hash
    assert opened.under(folder) == used  # read to hash their content, not decoded
    whole = data.load_tensors(ds, T224, progress=False)
    i = split.eval[3]
    np.testing.assert_array_equal(again.batch([i, split.calib[0]]), whole.batch([i, split.calib[0]]))
    with pytest.raises(KeyError):
        again.batch([next(j for j in range(len(ds.files)) if j not in split.calib + split.eval)])


def test_loader_memory_does_not_grow_with_the_folder(sample_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's budget: a folder 10x bigger, with the same calib/eval sizes, peaks within 10 % of the small one;
    counted as the bytes the loader allocated (tracemalloc sees numpy's buffers). Every file links to one image,
    and one decode thread runs, so that only the folder's size differs."""
    import tracemalloc

    monkeypatch.setattr(data.os, "cpu_count", lambda: 1)
    image = sorted(sample_dir.iterdir())[0]

    def folder(name: str, n: int) -> Path:
        (tmp_path / name).mkdir()
        for k in range(n):
            (tmp_path / name / f"n01440764_{k}.JPEG").symlink_to(image)
        return tmp_path / name

    def load(root: Path) -> tuple[data.Tensors, int]:
        monkeypatch.setenv("PTQ_CACHE_DIR", str(tmp_path / f"cache-{root.name}"))
        ds = data.scan(root)
        split = data.split(len(ds.files), 8, 24, 0)
        tracemalloc.start()
        try:
            tensors = data.load_tensors(ds, T224, progress=False, indices=split.calib + split.eval)
            return tensors, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    load(folder("warm", 40))  # first-call costs (imports, PIL's plugins) are not the loader's
    small, small_peak = load(folder("small", 100))
    big, big_peak = load(folder("big", 1000))
    row = 3 * 224 * 224
    assert small.decoded == big.decoded == 32
    assert small.peak_bytes == big.peak_bytes == 32 * row  # the 32 rows fit one chunk
    assert big_peak <= 1.1 * small_peak, (small_peak, big_peak)
    assert big_peak < 2 * 32 * row  # O(chunk): the old loader held a 1000-row array (150 MB) here


def test_cache_is_size_limited_and_evicts_least_recently_used(sample_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PTQ_CACHE_DIR", str(tmp_path / "cache"))
    entry_bytes = 4 * 3 * 224 * 224
    monkeypatch.setenv("PTQ_CACHE_MAX_GB", str(2.5 * entry_bytes / (1 << 30)))  # room for two entries of 4 images
    ds = data.scan(_linked(sample_dir, tmp_path / "images", 12))
    folder = tmp_path / "cache" / "tensors"

    def load(first: int) -> data.Tensors:
        return data.load_tensors(ds, T224, progress=False, indices=range(first, first + 4))

    def entry(t: data.Tensors) -> Path:
        return next(e for e in folder.iterdir() if e.name.startswith(t.used_hash))

    a, b = load(0), load(4)
    os.utime(entry(a), (1000, 1000))
    os.utime(entry(b), (2000, 2000))
    assert load(0).from_cache  # a hit makes A the most recently used
    c = load(8)
    assert sorted(e.name.split("-")[0] for e in folder.iterdir()) == sorted([a.used_hash, c.used_hash])  # B went
    assert sum(f.stat().st_size for e in folder.iterdir() for f in e.iterdir()) <= data.cache_limit_bytes()
    assert not load(4).from_cache


def test_a_split_over_the_cache_limit_is_streamed_uncached(sample_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("PTQ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PTQ_CACHE_MAX_GB", "0")
    ds = data.scan(_linked(sample_dir, tmp_path / "images", 3))
    with caplog.at_level(logging.INFO):
        first = data.load_tensors(ds, T224, progress=False)
    assert "over the cache limit of 0 MB (PTQ_CACHE_MAX_GB)" in caplog.text
    assert not (tmp_path / "cache" / "tensors").exists() or not list((tmp_path / "cache" / "tensors").iterdir())
    second = data.load_tensors(ds, T224, progress=False)
    assert not second.from_cache and second.decoded == 3
    np.testing.assert_array_equal(first.batch([2, 0]), second.batch([2, 0]))  # decoded again on demand, the same pixels


@pytest.mark.parametrize("value", ["lots", "-1", "nan"])
def test_bad_cache_limit_is_refused(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PTQ_CACHE_MAX_GB", value)
    with pytest.raises(PtqError, match=rf"PTQ_CACHE_MAX_GB='{value}' is not a size in GiB: set it to a number such as 2"):
        data.cache_limit_bytes()
