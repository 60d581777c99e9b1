"""Atomic file writes: the one helper for "write under a temporary name, then rename".

Readers (other ranks, a rerun after a crash, a loader on a shared file system) never see a partial file
under the final name: a crash leaves at most a hidden temporary file beside it. The temporary name holds
the pid, so several processes finishing the same file at once (e.g. the last encoder ranks writing a
manifest) do not write into each other's temporary file; the last rename wins with a complete file.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def temp_name(path: str | Path) -> Path:
    """The per-process temporary name beside ``path`` (hidden, so globs of finished files skip it)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def atomic_path(path: str | Path, exclusive: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; on success it is flushed to disk and renamed to
    ``path``, on an exception it is removed and ``path`` is left as it was.

    ``exclusive``: this process is the only writer of ``path`` (e.g. the rank that owns a shard), so temporary
    files of ``path`` left by killed earlier processes are removed first instead of piling up.
    """
    path = Path(path)
    tmp = temp_name(path)
    stale = path.parent.glob(f".{glob.escape(path.name)}.*.tmp") if exclusive else [tmp]
    for old in stale:
        old.unlink(missing_ok=True)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # data on disk before the name points at it
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def write_json_atomic(path: str | Path, obj: Any, indent: int | None = None) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically."""
    return write_atomic(path, json.dumps(obj, indent=indent))


def fsync_tree(root: str | Path, recursive: bool = True) -> None:
    """Flush ``root`` to disk: every file under it and every directory (their entries: new names), or with
    ``recursive=False`` only the directory ``root`` itself (e.g. after a rename inside it)."""
    root = Path(root)
    paths = sorted(root.rglob("*"), reverse=True) + [root] if recursive else [root]
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
