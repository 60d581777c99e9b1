"""MosaicML Streaming (MDS) shards and the ``data=mds`` loader.

Each work shard ``shard-NNNNNN`` is one MDS directory (``index.json`` + ``shard.*.mds``) written by
``streaming.MDSWriter``; the encoder also merges a root ``index.json`` so the whole dataset opens
directly with ``streaming.StreamingDataset(local=root)``. The training loader reads the same shard
stream as :mod:`bigdit.data.wds` (same order, resume and equal-batches guarantees), decoding the MDS
files in the worker processes.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bigdit.data.schema import MDS_COLUMNS, check_key, fetch
from bigdit.data.wds import ShardError, ShardLoader, _check_count

class Writer:
    """Writes one MDS shard directory to ``<name>.tmp/`` and renames it to ``<name>/`` on :meth:`close`."""

    def __init__(self, root: str | Path, name: str):
        self.path = Path(root) / name
        self.tmp = Path(root) / f"{name}.tmp"
        shutil.rmtree(self.tmp, ignore_errors=True)  # a crashed earlier attempt
        self.columns: list[str] = []
        self._writer = None
        self.count = 0

    def write(self, sample: dict[str, Any]) -> None:
        """Append one sample (see :mod:`bigdit.data.schema`); the first sample fixes the columns."""
        check_key(sample["key"])
        row = {k: v for k, v in sample.items() if k in MDS_COLUMNS and v is not None}
        if self._writer is None:
            from streaming import MDSWriter

            self.columns = list(row)
            self._writer = MDSWriter(out=str(self.tmp), columns={k: MDS_COLUMNS[k] for k in self.columns},
                                     size_limit=1 << 31)
        missing = [c for c in self.columns if c not in row]
        if missing:
            raise ValueError(f"sample {sample['key']!r} lacks {missing}: every sample of a shard needs the same fields")
        self._writer.write({c: row[c] for c in self.columns})
        self.count += 1

    def close(self) -> Path:
        """Finish the shard and move it under its final name."""
        if self._writer is None:
            raise ValueError(f"{self.path}: no samples written")
        self._writer.finish()
        if self.path.exists():
            shutil.rmtree(self.path)
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the partial shard."""
        if self._writer is not None:
            self._writer.finish()
        shutil.rmtree(self.tmp, ignore_errors=True)


def fetch_shard(remote: str, root: str | Path, name: str) -> None:
    """Cache shard directory ``name`` of a remote dataset under ``root`` (its index first, then its files)."""
    index = json.loads(fetch(remote, root, f"{name}/index.json").read_text())
    for obj in index["shards"]:
        fetch(remote, root, f"{name}/{obj['raw_data']['basename']}")


def exists(root: str | Path, name: str) -> bool:
    """Whether shard ``name`` was completed (the directory gets its final name only once it is whole)."""
    return (Path(root) / name / "index.json").is_file()


def shard_bytes(root: str | Path, name: str) -> int:
    """Size of a finished shard on disk."""
    return sum(p.stat().st_size for p in (Path(root) / name).iterdir())


def read_shard(root: str | Path, name: str, expected: int | None = None) -> Iterator[dict[str, Any]]:
    """Decoded samples of shard ``name``, in stored order; :class:`ShardError` names the shard and key
    (also when it holds other than ``expected`` samples)."""
    from streaming.base.format import reader_from_json

    d = Path(root) / name
    try:
        index = json.loads((d / "index.json").read_text())
    except (OSError, ValueError) as e:
        raise ShardError(f"{d}: unreadable MDS index ({e})") from e
    n = 0
    key = None
    for obj in index["shards"]:
        reader = reader_from_json(str(d), None, obj)
        path = d / obj["raw_data"]["basename"]
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise ShardError(f"{path}: cannot read shard ({e})") from e
        count = obj["samples"]
        if len(raw) != obj["raw_data"]["bytes"] or len(raw) < 4 * (count + 2):
            raise ShardError(f"{path}: truncated shard ({len(raw)} of {obj['raw_data']['bytes']} bytes)")
        offsets = np.frombuffer(raw, np.uint32, count + 1, offset=4)
        for i in range(count):
            try:
                sample = reader.decode_sample(raw[offsets[i] : offsets[i + 1]])
            except Exception as e:  # any decoding failure means corrupt bytes
                raise ShardError(f"{path}: corrupt sample {i} after key {key!r} ({e})") from e
            key = sample.get("key")
            n += 1
            yield sample
    _check_count(d, n, expected, key)


class MdsLoader(ShardLoader):
    """``data=mds``: the shard-stream loader over MDS shard directories (stale shared memory that a
    crashed ``StreamingDataset`` left behind is cleaned at start, as other streaming users may share the node)."""

    format = "mds"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()


def merge_index(root: str | Path, names: list[str]) -> Path:
    """Root ``index.json`` listing every shard directory's MDS files, for ``StreamingDataset(local=root)``."""
    shards = []
    for name in names:
        for obj in json.loads((Path(root) / name / "index.json").read_text())["shards"]:
            obj = json.loads(json.dumps(obj))
            obj["raw_data"]["basename"] = f"{name}/{obj['raw_data']['basename']}"
            if obj.get("zip_data"):
                obj["zip_data"]["basename"] = f"{name}/{obj['zip_data']['basename']}"
            shards.append(obj)
    path = Path(root) / "index.json"
    tmp = path.with_name(f".index.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"version": 2, "shards": shards}))
    os.replace(tmp, path)
    return path
