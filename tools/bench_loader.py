#!/usr/bin/env python
"""Loader throughput on synthetic ImageNet-256-shaped shards; prints JSON.

  python tools/bench_loader.py [--samples 4000] [--text-samples 1000] [--workers 2] [--micro-batch 256] [--reps 6]

Cases: ``class`` (moments 8x32x32 float16 + label, as SD-VAE latents of 256px images) and ``text``
(+ 77x768 float16 CLIP tokens and a 768-d pooled embedding), in both formats. Reported per case:
``worker_samples_s`` (one stream read, decoded and latent-sampled in the calling process: what one
DataLoader worker sustains) and ``process_samples_s`` (what one training process receives from
``--workers`` DataLoader worker processes).

For WebDataset shards also ``readers``: samples/s of reading every shard once, in this process, by
bigdit's reader (``bigdit.data.wds.read_shard``, samples decoded to arrays) and by the webdataset library
(``wds.WebDataset(urls)``: ``webdataset_raw`` yields member bytes, ``webdataset_decoded`` adds ``.decode()``,
the ``.npy`` members to arrays). The sides run ``--reps`` times each, rotating which goes first (the first
of a series measures slower on a busy machine); each side gets its median, min and max.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset

import bigdit  # noqa: F401  (torchvision shim before streaming)
from bigdit.batching import BatchPlan
from bigdit.data.mds import MdsLoader
from bigdit.data.schema import EMPTY_PROMPT_NAME, ChannelStats, Manifest, shard_name
from bigdit.data.shards import finalize, write_shard
from bigdit.data.wds import SUFFIX, WdsLoader, read_shard


def make_shards(root: Path, fmt: str, n: int, shard_size: int, text: bool) -> Path:
    """Random samples with the shapes of the case, written through the real shard writers."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for s in range(0, n, shard_size):
        name = shard_name(len(names))
        names.append(name)
        record = {"latent_shape": [4, 32, 32], "stats": ChannelStats().to_json()}
        with write_shard(root, fmt, name, record) as writer:
            for i in range(s, min(n, s + shard_size)):
                sample = {"key": f"s{i:08d}", "moments": rng.standard_normal((8, 32, 32)).astype(np.float16),
                          "cls": int(i % 1000), "json": {}}
                if text:
                    sample.update(txt="a photo", clip_tokens=rng.standard_normal((77, 768)).astype(np.float16),
                                  clip_pooled=rng.standard_normal(768).astype(np.float16))
                writer.write(sample)
    base = Manifest(format=fmt, latent_shape=[4, 32, 32], vae="synthetic", scaling_factor=0.18215, resolution=256,
                    classes=[str(c) for c in range(1000)],
                    text={"model": "ViT-L-14", "pretrained": "synthetic", "layer": "last", "tokens": 77, "dim": 768,
                          "pooled_dim": 768} if text else None)
    if text:  # a text dataset carries the empty prompt's tokens for caption dropout (tools/cache_text.py writes it)
        np.savez(root / EMPTY_PROMPT_NAME, tokens=np.zeros((77, 768), np.float16), pooled=np.zeros(768, np.float16))
    finalize(root, base, names)
    return root


def rate(loader, steps: int) -> float:
    """Samples/s of ``micro_batches`` over ``steps`` steps after one warm-up step (worker start)."""
    for _ in loader.micro_batches(0):
        pass
    t0 = time.perf_counter()
    n = 0
    for step in range(1, steps + 1):
        for batch in loader.micro_batches(step):
            n += len(batch["y"])
    return n / (time.perf_counter() - t0)


def _read_bigdit(root: Path, manifest: Manifest) -> int:
    return sum(1 for shard in manifest.shards for _ in read_shard(root, shard["name"], shard["count"]))


def _read_webdataset(root: Path, manifest: Manifest, decode: bool) -> int:
    urls = [str(root / f"{shard['name']}{SUFFIX}") for shard in manifest.shards]
    dataset = webdataset.WebDataset(urls, shardshuffle=False)
    return sum(1 for _ in (dataset.decode() if decode else dataset))


READERS = {"bigdit": _read_bigdit, "webdataset_raw": lambda r, m: _read_webdataset(r, m, False),
           "webdataset_decoded": lambda r, m: _read_webdataset(r, m, True)}


def readers(root: Path, reps: int) -> dict[str, dict[str, float]]:
    """Samples/s of each reader over all shards of ``root``: median, min and max of ``reps`` runs, rotating which
    reader runs first in each repetition."""
    manifest = Manifest.load(root)
    rates: dict[str, list[float]] = {name: [] for name in READERS}
    names = list(READERS)
    for rep in range(reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            t0 = time.perf_counter()
            n = READERS[name](root, manifest)
            rates[name].append(n / (time.perf_counter() - t0))
            if n != manifest.count:
                raise RuntimeError(f"{name} read {n} of {manifest.count} samples of {root}")
    return {name: {"median": round(float(np.median(r)), 1), "min": round(min(r), 1), "max": round(max(r), 1)}
            for name, r in rates.items()}


def bench(root: Path, fmt: str, micro: int, workers: int) -> dict[str, float]:
    cls = WdsLoader if fmt == "wds" else MdsLoader
    count = Manifest.load(root).count
    plan = BatchPlan(micro, 1, micro)
    steps = max(1, count // micro - 2)  # about one epoch of one stream
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torch.utils.data sets it in every worker process
    out = {"worker_samples_s": rate(cls(str(root), plan, 0, 0, num_workers=0), steps)}
    torch.set_num_threads(threads)
    if workers:
        loader = cls(str(root), plan, 0, 0, num_workers=workers)
        out["process_samples_s"] = rate(loader, steps)
        loader.close()
    return {k: round(v, 1) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4000, help="class-conditional samples to write")
    parser.add_argument("--text-samples", type=int, default=1000, help="text samples to write")
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--micro-batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for process_samples_s")
    parser.add_argument("--formats", default="wds,mds")
    parser.add_argument("--reps", type=int, default=6, help="repetitions of each reader of the readers row (wds)")
    parser.add_argument("--dir", default=None, help="where to write the shards (default: a temporary dir)")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for fmt in args.formats.split(","):
            for case, n, text in (("class", args.samples, False), ("text", args.text_samples, True)):
                root = make_shards(Path(tmp) / f"{fmt}-{case}", fmt, n, args.shard_size, text)
                results[f"{fmt}/{case}"] = bench(root, fmt, min(args.micro_batch, n // 4), args.workers)
                if fmt == "wds" and args.reps:
                    results[f"{fmt}/{case}"]["readers"] = readers(root, args.reps)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
