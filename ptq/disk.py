"""Free disk space where a run writes, checked before any work: a disk that fills mid-run fails late, with
tracebacks that name no path."""

from __future__ import annotations

import errno
import shutil
import sqlite3
import tempfile
from pathlib import Path

import mlflow

from ptq.errors import PtqError

HEADROOM_BYTES = 64 << 20
DATABASE_BYTES = 16 << 20  # what one run's rows (params, tags, metric series) and SQLite's journal can add to a database


def database_folder() -> Path | None:
    """The folder of the tracking store's SQLite database (`sqlite:///path`), which a run's every row is written to."""
    uri = mlflow.get_tracking_uri()
    return Path(uri[len("sqlite:///") :]).parent if uri.startswith("sqlite:///") else None


def _free_mb(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(_existing(path)).free >> 20} MB free"
    except OSError:
        return "free space unknown"


def explain_full(exc: BaseException) -> str | None:
    """If `exc` (or what caused it: SQLAlchemy wraps sqlite's error in its own) is a write that failed for lack of
    space, one line naming where and the free space there; else None."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, sqlite3.OperationalError) and "database or disk is full" in str(seen):
            folder = database_folder()
            where = f"the tracking database {mlflow.get_tracking_uri()[len('sqlite:///') :]}" if folder else "a SQLite database"
            return f"disk full: {where} could not be written ({_free_mb(folder) if folder else 'free space unknown'}): free some space, or point MLFLOW_TRACKING_URI at a larger disk"
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            path = Path(str(seen.filename)) if seen.filename else Path(tempfile.gettempdir())
            return f"disk full: {path} could not be written ({_free_mb(path)}): free some space there, or set TMPDIR / MLFLOW_TRACKING_URI to a larger disk"
        seen = seen.__cause__ or seen.__context__
    return None


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
