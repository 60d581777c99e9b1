#!/usr/bin/env python
"""Inspect, verify and convert latent shard directories (WebDataset or MDS, with manifest.json).

  python tools/shards.py inspect <dir>            counts, fields, dtypes, shapes, sizes, the manifest
  python tools/shards.py verify <dir>             read every sample; report truncated/corrupt shards, missing
                                                  fields, wrong shapes, NaN/inf (with shard and key);
                                                  exit status 1 when anything is wrong
  python tools/shards.py convert <src> <dst>      wds -> mds or mds -> wds (the other format), losslessly
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

import bigdit  # noqa: F401  (torchvision shim before streaming)
from bigdit.data.schema import EMPTY_PROMPT_NAME, Manifest, ShardError, validate_sample
from bigdit.data.shards import save_manifest, shard_io, write_shard


def describe(value: Any) -> str:
    """dtype/shape of an array, else the Python type."""
    if isinstance(value, np.ndarray):
        return f"{value.dtype}{list(value.shape)}"
    return type(value).__name__


def inspect(root: str) -> dict[str, Any]:
    """Summary of a shard directory: manifest, shard count/sizes and the fields of its first sample."""
    manifest = Manifest.load(root)
    io = shard_io(manifest.format)
    sizes = [io.shard_bytes(root, s["name"]) for s in manifest.shards]
    first = next(io.read_shard(root, manifest.shards[0]["name"]), {}) if manifest.shards else {}
    return {"root": root, "format": manifest.format, "samples": manifest.count, "shards": len(manifest.shards),
            "bytes": int(sum(sizes)), "bytes_per_sample": round(sum(sizes) / max(manifest.count, 1), 1),
            "fields": {k: describe(v) for k, v in first.items()}, "manifest": {
                k: v for k, v in json.loads((Path(root) / "manifest.json").read_text()).items() if k != "shards"}}


def verify(root: str, out=sys.stdout) -> int:
    """Read every sample of every shard; print each problem with shard and key. Returns the number of problems."""
    manifest = Manifest.load(root)
    io = shard_io(manifest.format)
    problems = 0
    seen = 0
    keys: set[str] = set()
    for shard in manifest.shards:
        name, n = shard["name"], 0
        if not io.exists(root, name):
            print(f"{name}: missing shard", file=out)
            problems += 1
            continue
        try:
            for sample in io.read_shard(root, name, shard["count"]):
                n += 1
                key = sample.get("key")
                for p in validate_sample(sample, manifest):
                    print(f"{name}: {key}: {p}", file=out)
                    problems += 1
                if key in keys:
                    print(f"{name}: {key}: duplicate key", file=out)
                    problems += 1
                keys.add(key)
        except ShardError as e:
            print(f"{name}: {e}", file=out)
            problems += 1
        seen += n
    print(f"{root}: {seen} samples in {len(manifest.shards)} shards, "
          + ("OK" if not problems else f"{problems} problem(s)"), file=out)
    return problems


def convert(src: str, dst: str, progress: bool = True) -> Manifest:
    """Copy a shard directory into the other format (same shards, keys, fields and bytes of every array)."""
    from tqdm import tqdm

    manifest = Manifest.load(src)
    fmt = "mds" if manifest.format == "wds" else "wds"
    src_io = shard_io(manifest.format)
    out = Path(dst)
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=manifest.count, unit="sample", disable=not progress) as bar:
        for shard in manifest.shards:
            name = shard["name"]
            if not (out / f"{name}.json").is_file():  # resumable, like the encoder
                record = json.loads((Path(src) / f"{name}.json").read_text())
                with write_shard(out, fmt, name, record) as writer:
                    for sample in src_io.read_shard(src, name):
                        writer.write(sample)
            bar.update(shard["count"])
    if (Path(src) / EMPTY_PROMPT_NAME).is_file():
        shutil.copy(Path(src) / EMPTY_PROMPT_NAME, out / EMPTY_PROMPT_NAME)
    manifest.format = fmt
    save_manifest(out, manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("inspect", help="print counts, fields, dtypes, shapes, sizes and the manifest").add_argument("root")
    sub.add_parser("verify", help="read every sample; non-zero exit status on any problem").add_argument("root")
    p = sub.add_parser("convert", help="wds <-> mds without loss")
    p.add_argument("src")
    p.add_argument("dst")
    args = parser.parse_args(argv)
    if args.command == "inspect":
        print(json.dumps(inspect(args.root), indent=1))
        return 0
    if args.command == "verify":
        return 1 if verify(args.root) else 0
    m = convert(args.src, args.dst)
    print(f"{m.count} samples -> {args.dst} ({m.format})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
