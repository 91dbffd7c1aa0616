"""Image folders, ImageNet labels, the seeded calibration/evaluation split and the tensor cache."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ptq.errors import PtqError
from ptq.models import PIL_FILTERS, Transform

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}
# What PIL raises on a file that is not a usable image (garbage headers can also claim decompression-bomb sizes).
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def imagenet_classes() -> list[tuple[str, str]]:
    """The 1000 ImageNet (wnid, name) pairs in torchvision's class order (sorted wnids)."""
    text = (Path(__file__).parent / "imagenet_classes.tsv").read_text()
    return [tuple(line.split("\t", 1)) for line in text.splitlines() if line]  # type: ignore[misc]


_WNID_INDEX = {wnid: i for i, (wnid, _) in enumerate(imagenet_classes())}


@dataclass(frozen=True)
class Dataset:
    """A list of labelled images and the content hash that identifies it."""

    root: Path
    files: tuple[Path, ...]
    labels: tuple[int, ...]
    content_hash: str
    readable: tuple[bool, ...]  # whether PIL recognizes each file's header; decoding may still fail


def _label(wnid: str, path: Path) -> int:
    if wnid not in _WNID_INDEX:
        raise PtqError(f"{path} is not named or filed under an ImageNet wnid (like n01440764): rename it or move it out of the data folder")
    return _WNID_INDEX[wnid]


def scan(root: Path) -> Dataset:
    """List images of an ImageNet-style folder (one sub-folder per wnid) or a flat folder of `<wnid>_*.JPEG`."""
    root = Path(root)
    if not root.is_dir():
        raise PtqError(f"data folder {root} does not exist: pass data=PATH to an ImageNet-style or flat <wnid>_*.JPEG folder")
    files: list[Path] = []
    labels: list[int] = []
    for entry in sorted(root.iterdir()):
        if entry.is_dir():
            for f in sorted(entry.iterdir()):
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    files.append(f)
                    labels.append(_label(entry.name, f))
        elif entry.suffix.lower() in IMAGE_SUFFIXES:
            files.append(entry)
            labels.append(_label(entry.name.split("_", 1)[0], entry))
    if not files:
        raise PtqError(f"data folder {root} holds no images (.JPEG/.jpg/.png): point data= at a folder of ImageNet images")
    digest = hashlib.sha256()
    readable = []
    for f in files:
        content = f.read_bytes()
        digest.update(str(f.relative_to(root)).encode())
        digest.update(hashlib.sha256(content).digest())
        readable.append(_header_ok(content))
    if not any(readable):
        raise PtqError(
            f"none of the {len(files)} images in data folder {root} is a readable image (e.g. {files[0].name}): "
            "point data= at a folder of real JPEG/PNG images"
        )
    return Dataset(root, tuple(files), tuple(labels), digest.hexdigest()[:16], tuple(readable))


def _header_ok(content: bytes) -> bool:
    """Whether PIL recognizes the image format from its header alone: catches garbage without decoding pixels."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's notices about garbage (corrupt EXIF, absurd sizes) are not the user's concern
        try:
            Image.open(io.BytesIO(content)).close()
        except UNREADABLE:
            return False
    return True


@dataclass(frozen=True)
class Split:
    """Disjoint calibration and evaluation indices into a Dataset, drawn with a logged seed."""

    calib: tuple[int, ...]
    eval: tuple[int, ...]


def split(n: int, calib_size: int, eval_size: int | None, seed: int) -> Split:
    """Seeded permutation: the first `calib_size` images calibrate, the next `eval_size` (default: the rest) evaluate."""
    if calib_size < 0 or calib_size >= n:
        raise PtqError(f"calib_size={calib_size} must be between 0 and {n - 1} (the data folder has {n} images)")
    order = np.random.default_rng(seed).permutation(n)
    rest = order[calib_size:]
    if eval_size is not None:
        if eval_size <= 0:
            raise PtqError(f"eval_size={eval_size} must be positive, or left out to evaluate every non-calibration image")
        rest = rest[:eval_size]
    return Split(tuple(int(i) for i in sorted(order[:calib_size])), tuple(int(i) for i in sorted(rest)))


def require_readable(ds: Dataset, split: Split, ok: Sequence[bool] | np.ndarray, calibrate: bool) -> None:
    """Refuse a split in which no calibration image (when calibrating) or no evaluation image (latency and
    accuracy run on them) is readable: `ok` is the scan's header check before decoding, `Tensors.ok` after."""
    for role, indices in (("calibration", split.calib if calibrate else ()), ("evaluation", split.eval)):
        if indices and not any(ok[i] for i in indices):
            raise PtqError(
                f"none of the {len(indices)} {role} images of data folder {ds.root} is readable (e.g. {ds.files[indices[0]].name}): "
                "replace or remove the broken files"
            )


# Bumped whenever _decode's pixels change, so tensor caches written by an older decode are never reused.
DECODE_VERSION = "tv2"


def _resized_size(w: int, h: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the shorter side at `short_side` and the longer one truncated, as torchvision's
    _compute_resized_output_size (max_size None) computes it."""
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(short_side * long / short)
    return (short_side, new_long) if w <= h else (new_long, short_side)


def _crop_offset(size: int, crop: int) -> int:
    """Start of torchvision's center_crop along one axis: rounded half-to-even, or minus its zero padding when
    the image is smaller than the crop."""
    if crop > size:
        return -((crop - size) // 2)
    return int(round((size - crop) / 2.0))


def _decode(path: Path, t: Transform) -> np.ndarray | None:
    """Pixels exactly as torchvision's ImageClassification sees them before normalization (PIL resize of the
    shorter side with t.interpolation, center crop; outside the image is 0); uint8 CHW, or None if unreadable."""
    try:
        with Image.open(path) as src:
            img = src.convert("RGB")
        size = _resized_size(img.size[0], img.size[1], t.resize)
        if size != img.size:
            img = img.resize(size, PIL_FILTERS[t.interpolation])
        left, top = _crop_offset(img.size[0], t.crop), _crop_offset(img.size[1], t.crop)
        img = img.crop((left, top, left + t.crop, top + t.crop))
        return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()
    except UNREADABLE as exc:
        log.warning("skipping unreadable image %s (%s)", path, exc)
        return None


def cache_dir() -> Path:
    """Where decoded tensors are cached: $PTQ_CACHE_DIR, else ~/.cache/ptq."""
    return Path(os.environ.get("PTQ_CACHE_DIR", Path.home() / ".cache" / "ptq"))


@dataclass
class Tensors:
    """Decoded, cropped images (uint8 NCHW) for one dataset and transform; `ok[i]` is False where unreadable."""

    pixels: np.ndarray
    ok: np.ndarray
    transform: Transform
    from_cache: bool

    def batch(self, indices: list[int] | tuple[int, ...]) -> np.ndarray:
        """Normalized float32 NCHW batch for the given image indices: (x / 255 - mean) / std as one
        per-channel scale and offset, in place (this runs once per evaluation batch)."""
        x = self.pixels[list(indices)].astype(np.float32)
        std = np.asarray(self.transform.std, np.float32).reshape(1, 3, 1, 1)
        mean = np.asarray(self.transform.mean, np.float32).reshape(1, 3, 1, 1)
        x *= 1.0 / (255.0 * std)
        x -= mean / std
        return x


def _write_cache(pix_path: Path, meta_path: Path, pixels: np.ndarray, meta: str) -> None:
    """Keep decoded tensors for the next run. Only a cache: where the disk lacks room or a write fails, warn,
    leave no partial file, and go on without it."""
    tmp = pix_path.with_suffix(".tmp.npy")
    try:
        pix_path.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(pix_path.parent).free
        if free < pixels.nbytes + CACHE_HEADROOM_BYTES:
            log.warning("not caching decoded images: %s has %d MB free, %d MB needed", pix_path.parent, free >> 20, (pixels.nbytes + CACHE_HEADROOM_BYTES) >> 20)
            return
        np.save(tmp, pixels)
        os.replace(tmp, pix_path)
        meta_path.write_text(meta)
    except OSError as exc:
        log.warning("not caching decoded images in %s (%s): the next run decodes them again", pix_path.parent, exc)
        tmp.unlink(missing_ok=True)
        pix_path.unlink(missing_ok=True)


CACHE_HEADROOM_BYTES = 256 << 20  # never fill a disk to the last byte for a cache


def load_tensors(ds: Dataset, t: Transform, progress: bool = True) -> Tensors:
    """Decode every image once per (dataset content, transform); later runs read the cache and decode nothing."""
    key = f"{ds.content_hash}-{DECODE_VERSION}-{t.resize}-{t.crop}-{t.interpolation}"
    folder = cache_dir() / "tensors"
    pix_path, meta_path = folder / f"{key}.npy", folder / f"{key}.json"
    if pix_path.is_file() and meta_path.is_file():
        try:
            ok = np.asarray(json.loads(meta_path.read_text())["ok"], dtype=bool)
            pixels = np.load(pix_path, mmap_mode="r")
            if pixels.shape == (len(ds.files), 3, t.crop, t.crop) and len(ok) == len(ds.files):
                for bad in np.flatnonzero(~ok):
                    log.warning("skipping unreadable image %s (cached)", ds.files[bad])
                return Tensors(pixels, ok, t, from_cache=True)
        except (OSError, ValueError, KeyError):
            log.warning("tensor cache %s is corrupt; decoding again", pix_path)
    from ptq.progress import track

    pixels = np.zeros((len(ds.files), 3, t.crop, t.crop), dtype=np.uint8)
    ok = np.zeros(len(ds.files), dtype=bool)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        decoded = pool.map(lambda f: _decode(f, t), ds.files)
        for i, arr in enumerate(track(decoded, total=len(ds.files), description="decode images", enabled=progress)):
            if arr is not None:
                pixels[i], ok[i] = arr, True
    if not ok.any():
        raise PtqError(
            f"none of the {len(ds.files)} images in data folder {ds.root} could be decoded: point data= at a folder of real JPEG/PNG images"
        )
    _write_cache(pix_path, meta_path, pixels, json.dumps({"root": str(ds.root), "transform": t.key(), "decode": DECODE_VERSION, "ok": ok.tolist()}))
    return Tensors(pixels, ok, t, from_cache=False)


def usable(dataset: Dataset, split: Split, tensors: Tensors, calibrate: bool) -> tuple[list[int], list[int]]:
    """The calibration and evaluation images that decoded (a header can open and the image still not decode);
    refuses a split left without the images it needs."""
    require_readable(dataset, split, tensors.ok, calibrate=calibrate)
    return [i for i in split.calib if tensors.ok[i]], [i for i in split.eval if tensors.ok[i]]
