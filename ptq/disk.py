"""Free disk space where a run writes, checked before any work: a disk that fills mid-run fails late, with
tracebacks that name no path."""

from __future__ import annotations

import shutil
from pathlib import Path

from ptq.errors import PtqError

HEADROOM_BYTES = 64 << 20


def _existing(path: Path) -> Path:
    """The nearest folder of `path` that exists (where it will be created)."""
    path = path.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def require_space(needs: dict[Path, tuple[int, str]]) -> None:
    """Refuse to start when a folder has less free space than the run will write there; `needs` maps each
    folder to (bytes, what to do instead). Folders on one file system add up."""
    by_fs: dict[int, list[tuple[Path, int, str]]] = {}
    for path, (need, remedy) in needs.items():
        folder = _existing(path)
        by_fs.setdefault(folder.stat().st_dev, []).append((folder, need, remedy))
    for entries in by_fs.values():
        folder, _, remedy = entries[0]
        need = sum(n for _, n, _ in entries) + HEADROOM_BYTES
        free = shutil.disk_usage(folder).free
        if free < need:
            where = ", ".join(str(p) for p, _, _ in entries)
            raise PtqError(f"not enough free disk space for this run in {where}: {free >> 20} MB free, about {need >> 20} MB needed: free some space, {remedy}")
