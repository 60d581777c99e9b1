"""Shard directories of either format: format dispatch, writing one shard with its record, finishing a directory.

Sits above the format modules (:mod:`bigdit.data.wds`, :mod:`bigdit.data.mds`), which both offer the same
functions: ``Writer`` (a ``with`` block that writes one shard), ``read_shard``, ``exists`` and ``shard_bytes``.
The tools write a directory in two steps that make it resumable and safe for several ranks at once:

1. every shard, once whole under its final name, gets a ``<name>.json`` record (:func:`write_shard`), so a
   record means a complete shard and a rerun skips recorded shards;
2. whoever finds every record present writes ``manifest.json`` (:func:`finalize` from the records, or
   :func:`save_manifest` from a manifest in hand), so a manifest means a finished directory.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from bigdit.data import mds, wds
from bigdit.data.schema import ChannelStats, Manifest, SchemaError
from bigdit.fsio import write_json_atomic

FORMATS: dict[str, ModuleType] = {"wds": wds, "mds": mds}


def shard_io(fmt: str) -> ModuleType:
    """The shard module of a format (``Writer``, ``read_shard``, ``exists``, ``shard_bytes``)."""
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}: use wds (WebDataset tars) or mds (MosaicML Streaming)")
    return FORMATS[fmt]


@contextlib.contextmanager
def write_shard(root: str | Path, fmt: str, name: str,
                record: dict[str, Any]) -> Iterator[wds.Writer | mds.Writer]:
    """Write shard ``name`` of ``root`` in a ``with`` block, then its record ``<name>.json``.

    Yields the format's ``Writer`` (``.write(sample)``). When the block ends cleanly the shard moves under its
    final name and ``record``, with ``count`` and ``bytes`` set, is written after it; the block may still fill
    ``record`` in (e.g. statistics of what it wrote). When the block raises, the partial shard is dropped and no
    record is written.
    """
    io = shard_io(fmt)
    with io.Writer(root, name) as writer:
        yield writer
    record.update(count=writer.count, bytes=io.shard_bytes(root, name))
    write_json_atomic(Path(root) / f"{name}.json", record)  # after the rename: a record means a whole shard


def save_manifest(root: str | Path, manifest: Manifest) -> Path:
    """Write the manifest of a directory whose shards are all written; for MDS first the root ``index.json``
    (:func:`bigdit.data.mds.merge_index`), so the manifest is the last file of a finished directory."""
    if manifest.format == "mds":
        mds.merge_index(root, [s["name"] for s in manifest.shards])
    return manifest.save(root)


def finalize(root: str | Path, base: Manifest, names: list[str]) -> Manifest | None:
    """Write ``manifest.json`` once every shard in ``names`` has its ``<name>.json`` record.

    ``base`` gets the latent shape, shard list, count and channel statistics from the records. Returns the
    manifest, or None while other ranks are still working.
    """
    root = Path(root)
    records = []
    for name in names:
        p = root / f"{name}.json"
        if not p.is_file():
            return None
        records.append(json.loads(p.read_text()))
    stats = ChannelStats()
    for r in records:
        stats.merge(ChannelStats(**r["stats"]))
    shapes = {tuple(r["latent_shape"]) for r in records}
    if len(shapes) != 1:
        raise SchemaError(f"{root}: shards disagree on the latent shape {sorted(shapes)}; re-encode into an empty out")
    base.latent_shape = list(shapes.pop())
    base.shards = [{"name": n, "count": r["count"]} for n, r in zip(names, records)]
    base.count = sum(r["count"] for r in records)
    base.stats = stats.summary()
    save_manifest(root, base)
    return base
