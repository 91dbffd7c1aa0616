"""Image folders, ImageNet labels, the seeded calibration/evaluation split and the tensor cache."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import typing
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
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


class Headers(typing.Sequence[bool]):  # typing's: subscriptable at runtime on Python 3.8
    """Whether PIL recognizes each file's header, checked on first access (and remembered): a run opens only the
    files its split uses; `all(headers)` reads every header."""

    def __init__(self, files: tuple[Path, ...]) -> None:
        self._files = files
        self._known: dict[int, bool] = {}

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, i: int) -> bool:  # type: ignore[override]
        i = range(len(self._files))[i]  # negative indices; IndexError past the end
        if i not in self._known:
            self._known[i] = _header_ok(self._files[i])
        return self._known[i]

    def __iter__(self) -> Iterator[bool]:
        return (self[i] for i in range(len(self._files)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, (Sequence, Headers)) and tuple(self) == tuple(other)

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class Dataset:
    """A list of labelled images, their sizes, and the listing hash that identifies the folder."""

    root: Path
    files: tuple[Path, ...]
    labels: tuple[int, ...]
    content_hash: str  # the folder's identity (`data_hash`): sorted relative names and byte sizes, no file read
    readable: Headers  # whether PIL recognizes each file's header (read lazily); decoding may still fail
    sizes: tuple[int, ...] = ()


def _label(wnid: str, path: Path) -> int:
    if wnid not in _WNID_INDEX:
        raise PtqError(f"{path} is not named or filed under an ImageNet wnid (like n01440764): rename it or move it out of the data folder")
    return _WNID_INDEX[wnid]


def scan(root: Path) -> Dataset:
    """List images of an ImageNet-style folder (one sub-folder per wnid) or a flat folder of `<wnid>_*.JPEG`.
    Reads no image: the folder's hash is over names and sizes (one stat per file), the headers are checked lazily."""
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
    sizes = tuple(_size(f) for f in files)
    digest = hashlib.sha256()
    for f, size in zip(files, sizes):
        digest.update(f"{f.relative_to(root)}\0{size}\n".encode())
    return Dataset(root, tuple(files), tuple(labels), digest.hexdigest()[:16], Headers(tuple(files)), sizes)


def _size(path: Path) -> int:
    """A file's size in bytes (through a link), or -1 where it cannot be read: the header check then refuses it."""
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _header_ok(path: Path) -> bool:
    """Whether PIL recognizes the image format from its header alone: catches garbage without decoding pixels."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's notices about garbage (corrupt EXIF, absurd sizes) are not the user's concern
        try:
            Image.open(path).close()
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
    accuracy run on them) is readable: `ok` is the scan's header check before decoding, `Tensors.ok` after.
    Only the split's headers are read, and the whole folder's only to say that none of it is an image."""
    for role, indices in (("calibration", split.calib if calibrate else ()), ("evaluation", split.eval)):
        if indices and not any(ok[i] for i in indices):
            if ok is ds.readable and not any(ds.readable):
                raise PtqError(
                    f"none of the {len(ds.files)} images in data folder {ds.root} is a readable image (e.g. {ds.files[0].name}): "
                    "point data= at a folder of real JPEG/PNG images"
                )
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


CACHE_MAX_GB = 2.0  # default size limit of the tensor cache ($PTQ_CACHE_MAX_GB, in GiB)
CACHE_HEADROOM_BYTES = 256 << 20  # never fill a disk to the last byte for a cache
CHUNK = 64  # images decoded, held and cached together: the loader's memory is O(CHUNK), whatever the folder


def cache_limit_bytes() -> int:
    """The tensor cache's size limit: $PTQ_CACHE_MAX_GB GiB (default CACHE_MAX_GB; 0 caches nothing)."""
    text = os.environ.get("PTQ_CACHE_MAX_GB", str(CACHE_MAX_GB))
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also refuses nan
        raise PtqError(f"PTQ_CACHE_MAX_GB={text!r} is not a size in GiB: set it to a number such as 2, or 0 to cache no decoded images")
    return int(value * (1 << 30))


class Pixels(ABC):
    """Where the decoded rows (uint8 CHW) of a Tensors live: in memory, in the cache's chunk files, or nowhere
    (decoded again on demand); `read` returns just the rows asked for, so a batch costs O(batch) memory."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def read(self, rows: list[int]) -> np.ndarray: ...


class InMemory(Pixels):
    """Rows held in one array (small sets, tests)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def read(self, rows: list[int]) -> np.ndarray:
        return self.array[rows]


class _Chunks(Pixels):
    """A cache entry: CHUNK rows per `<n>.npy` file, each mapped only while its rows are copied out."""

    def __init__(self, folder: Path, n: int, crop: int) -> None:
        self.folder, self.n, self.crop = folder, n, crop

    def __len__(self) -> int:
        return self.n

    def read(self, rows: list[int]) -> np.ndarray:
        out = np.empty((len(rows), 3, self.crop, self.crop), np.uint8)
        positions = np.asarray(rows, dtype=np.int64)
        for chunk in np.unique(positions // CHUNK):
            where = np.flatnonzero(positions // CHUNK == chunk)
            part = np.load(self.folder / f"{chunk:05d}.npy", mmap_mode="r")
            out[where] = part[positions[where] - chunk * CHUNK]
            del part
        return out


class _Redecode(Pixels):
    """No cache: the rows are decoded again whenever they are read."""

    def __init__(self, files: list[Path], t: Transform) -> None:
        self.files, self.t = files, t

    def __len__(self) -> int:
        return len(self.files)

    def read(self, rows: list[int]) -> np.ndarray:
        pixels, _ok = _decode_many([self.files[r] for r in rows], self.t)
        return pixels


@dataclass
class Tensors:
    """Decoded, cropped images (uint8 NCHW) of some of a dataset's images for one transform; `ok[i]` (over the
    whole dataset) is False where image i is unreadable or was not loaded."""

    source: Pixels
    ok: np.ndarray
    transform: Transform
    from_cache: bool
    rows: dict[int, int] | None = None  # dataset index -> row of `source`; None where they are the same
    used_hash: str = ""  # content hash of the loaded images (`data_used_hash`)
    decoded: int = 0  # images this load decoded
    peak_bytes: int = 0  # the most decoded pixel bytes this load held at once

    @classmethod
    def of(cls, pixels: np.ndarray, ok: np.ndarray, transform: Transform) -> Tensors:
        """Tensors over rows already in memory, one per dataset image."""
        return cls(InMemory(pixels), ok, transform, from_cache=False)

    @property
    def pixels(self) -> np.ndarray:
        """Every loaded row in dataset order, read at once: for tests and small sets, never a run's evaluation."""
        return self.source.read(list(range(len(self.source))))

    def batch(self, indices: list[int] | tuple[int, ...]) -> np.ndarray:
        """Normalized float32 NCHW batch for the given image indices: (x / 255 - mean) / std as one
        per-channel scale and offset, in place (this runs once per evaluation batch)."""
        rows = list(indices) if self.rows is None else [self.rows[i] for i in indices]
        x = self.source.read(rows).astype(np.float32)
        std = np.asarray(self.transform.std, np.float32).reshape(1, 3, 1, 1)
        mean = np.asarray(self.transform.mean, np.float32).reshape(1, 3, 1, 1)
        x *= 1.0 / (255.0 * std)
        x -= mean / std
        return x


def _decode_many(files: list[Path], t: Transform) -> tuple[np.ndarray, np.ndarray]:
    """Decode a few files with a thread pool: uint8 (N, 3, crop, crop), zero where unreadable, and which decoded."""
    pixels = np.zeros((len(files), 3, t.crop, t.crop), dtype=np.uint8)
    ok = np.zeros(len(files), dtype=bool)

    def into(j: int) -> None:  # each thread copies its image in and lets it go: no decoded image waits in a queue
        arr = _decode(files[j], t)
        if arr is not None:
            pixels[j], ok[j] = arr, True

    with ThreadPoolExecutor(max_workers=max(1, min(len(files), os.cpu_count() or 1))) as pool:
        list(pool.map(into, range(len(files))))
    return pixels, ok


def _file_digest(path: Path) -> bytes:
    """sha256 of a file's content (of the error, where it cannot be read: decoding then skips it too)."""
    try:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 16), b""):  # in blocks: memory does not follow the file's size
                digest.update(block)
        return digest.digest()
    except OSError as exc:
        return hashlib.sha256(f"unreadable: {exc.strerror}".encode()).digest()


def used_hash(ds: Dataset, indices: list[int]) -> str:
    """Content hash of the images at `indices` (names and bytes, in index order): `data_used_hash`, and the key
    of their tensor cache. Reads those files and no others."""
    digest = hashlib.sha256()
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for i, content in zip(indices, pool.map(lambda i: _file_digest(ds.files[i]), indices)):
            digest.update(str(ds.files[i].relative_to(ds.root)).encode())
            digest.update(content)
    return digest.hexdigest()[:16]


def _tree_bytes(path: Path) -> int:
    """Bytes held by a cache entry (a folder, or a file of the older single-array format)."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return path.stat().st_size


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def evict(folder: Path, room: int) -> None:
    """Delete the least recently used cache entries (oldest modification time first; a hit touches its entry)
    until the cache holds at most `room` bytes. Entries another process is still writing are left alone."""
    if not folder.is_dir():
        return
    entries = sorted((e for e in folder.iterdir() if ".tmp-" not in e.name), key=lambda e: e.stat().st_mtime)
    total = sum(_tree_bytes(e) for e in entries)
    for entry in entries:
        if total <= room:
            break
        total -= _tree_bytes(entry)
        log.info("evicting tensor cache entry %s (the cache is limited to PTQ_CACHE_MAX_GB)", entry.name)
        _remove(entry)


def _open_cache(entry: Path, n: int, t: Transform) -> np.ndarray | None:
    """The per-row `ok` of a complete cache entry for `n` rows of this transform, or None where there is none."""
    meta_path = entry / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        ok = np.asarray(meta["ok"], dtype=bool)
        first = np.load(entry / "00000.npy", mmap_mode="r")
        chunks = -(-n // CHUNK)
        if meta["chunk"] == CHUNK and len(ok) == n and first.shape[1:] == (3, t.crop, t.crop) and (entry / f"{chunks - 1:05d}.npy").is_file():
            os.utime(entry)  # recently used: evicted last
            return ok
    except (OSError, ValueError, KeyError, TypeError):
        pass
    log.warning("tensor cache %s is corrupt; decoding again", entry)
    _remove(entry)
    return None


def _cache_writer(entry: Path, need: int) -> Path | None:
    """A fresh temporary folder to write a cache entry of `need` bytes into, after making room; None where the
    entry is over the size limit or the disk lacks room (a cache only: the run goes on without it)."""
    limit = cache_limit_bytes()
    if need > limit:
        log.info("not caching decoded images: %d MB is over the cache limit of %d MB (PTQ_CACHE_MAX_GB)", need >> 20, limit >> 20)
        return None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        evict(entry.parent, limit - need)
        free = shutil.disk_usage(entry.parent).free
        if free < need + CACHE_HEADROOM_BYTES:
            log.warning("not caching decoded images: %s has %d MB free, %d MB needed", entry.parent, free >> 20, (need + CACHE_HEADROOM_BYTES) >> 20)
            return None
        tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
        _remove(tmp)
        tmp.mkdir()
        return tmp
    except OSError as exc:
        log.warning("not caching decoded images in %s (%s): the next run decodes them again", entry.parent, exc)
        return None


def load_tensors(ds: Dataset, t: Transform, progress: bool = True, indices: Sequence[int] | None = None) -> Tensors:
    """Decode the images at `indices` (default: all) once per (their content, transform), CHUNK at a time, into
    the size-limited cache; later runs read the cache and decode nothing. Other files are never opened, and
    memory stays O(CHUNK) here and O(batch) in `Tensors.batch`, whatever the size of the folder."""
    from ptq.progress import track

    used = sorted(set(range(len(ds.files)) if indices is None else indices))
    files = [ds.files[i] for i in used]
    content = used_hash(ds, used)
    entry = cache_dir() / "tensors" / f"{content}-{DECODE_VERSION}-{t.resize}-{t.crop}-{t.interpolation}"
    ok_rows = _open_cache(entry, len(used), t)
    decoded = peak = 0
    from_cache = stored = ok_rows is not None
    if ok_rows is not None:
        for bad in np.flatnonzero(~ok_rows):
            log.warning("skipping unreadable image %s (cached)", files[bad])
    else:
        tmp = _cache_writer(entry, len(used) * 3 * t.crop * t.crop)
        oks = []
        starts = range(0, len(files), CHUNK)
        for n, s in enumerate(track(starts, total=len(starts), description="decode images", enabled=progress)):
            pixels, ok = _decode_many(files[s : s + CHUNK], t)
            decoded, peak = decoded + len(pixels), max(peak, pixels.nbytes)
            oks.append(ok)
            if tmp is not None:
                try:
                    np.save(tmp / f"{n:05d}.npy", pixels)
                except OSError as exc:
                    log.warning("not caching decoded images in %s (%s): the next run decodes them again", entry.parent, exc)
                    _remove(tmp)
                    tmp = None
            del pixels
        ok_rows = np.concatenate(oks) if oks else np.zeros(0, bool)
        if not ok_rows.any():
            if tmp is not None:
                _remove(tmp)
            raise PtqError(
                f"none of the {len(files)} images in data folder {ds.root} could be decoded: point data= at a folder of real JPEG/PNG images"
            )
        if tmp is not None:
            try:
                meta = {"root": str(ds.root), "transform": t.key(), "decode": DECODE_VERSION, "chunk": CHUNK, "ok": ok_rows.tolist()}
                (tmp / "meta.json").write_text(json.dumps(meta))
                os.replace(tmp, entry)
                stored = True
            except OSError as exc:
                log.warning("not caching decoded images in %s (%s): the next run decodes them again", entry.parent, exc)
                _remove(tmp)
    source: Pixels = _Chunks(entry, len(used), t.crop) if stored else _Redecode(files, t)
    ok_all = np.zeros(len(ds.files), dtype=bool)
    ok_all[used] = ok_rows
    rows = None if indices is None else {i: r for r, i in enumerate(used)}
    return Tensors(source, ok_all, t, from_cache, rows, content, decoded, peak)


def usable(dataset: Dataset, split: Split, tensors: Tensors, calibrate: bool) -> tuple[list[int], list[int]]:
    """The calibration and evaluation images that decoded (a header can open and the image still not decode);
    refuses a split left without the images it needs."""
    require_readable(dataset, split, tensors.ok, calibrate=calibrate)
    return [i for i in split.calib if tensors.ok[i]], [i for i in split.eval if tensors.ok[i]]
