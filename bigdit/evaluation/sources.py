"""The images a reference batch is made from (``tools/evaluate.py make_ref=true images=...``), as uint8 NHWC.

An input is cut into *parts* (a run of folder images, one WebDataset tar, one shard, a slice of an
``.npz``); part ``p`` belongs to rank ``p % world_size``, and the DataLoader workers of a rank split its
parts between them. Each part yields ``(key, image)``: the keys decide which images go into the reference's
``arr_0`` (:func:`priority`), so the subset is the same whatever the number of ranks and workers.

Inputs (:func:`open_source`):

* an image folder (class sub-folders or flat), ADM centre-cropped to ``resolution``;
* WebDataset tars (a ``.tar``, a folder of them, a glob, brace pattern, ``pipe:`` or URL; see
  :func:`bigdit.data.images.input_tars`), centre-cropped to ``resolution``; samples without a decodable
  image are skipped and counted;
* a bigdit shard directory of pixel shards (encoded with ``vae=none``): the stored uint8 ``pixels`` (or, in
  float16 pixel moments, the means in [-1, 1]), already centre-cropped (its manifest gives the resolution);
* an ``.npz`` with ``arr_0`` uint8 NHWC (e.g. to add statistics to an existing batch).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

PART_IMAGES = 1000  # folder images / npz rows per part


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """float (C, H, W) in [-1, 1] (what the encoders read, exactly ``x / 127.5 - 1`` of uint8) -> uint8 HWC."""
    return np.rint((np.asarray(pixels, np.float32) + 1.0) * 127.5).clip(0, 255).astype(np.uint8).transpose(1, 2, 0)


def priority(key: str, seed: int = 0) -> int:
    """A key's place in the random order that picks ``arr_0``: the smallest priorities are kept."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "big") >> 1


@dataclass
class FolderPart:
    items: list[Any]   # bigdit.data.images.Item
    resolution: int

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        from bigdit.data.images import load_pixels

        for it in self.items:
            try:
                yield it.key, to_uint8(load_pixels(it, self.resolution))
            except Exception as e:  # name the file: PIL's messages do not
                raise ValueError(f"cannot read image {it.source}: {e}") from e


@dataclass
class TarPart:
    url: str
    resolution: int

    def __iter__(self) -> Iterator[tuple[str, np.ndarray | None]]:
        from bigdit.data.images import decode_sample, tar_samples

        for sample in tar_samples(self.url):
            key = f"{self.url}/{sample['__key__']}"
            try:
                pixels, _, _ = decode_sample(sample, self.resolution)
            except ValueError:
                yield key, None  # skipped, counted by the caller
                continue
            yield key, to_uint8(pixels)


@dataclass
class ShardPart:
    root: str
    fmt: str
    name: str
    count: int | None

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        from bigdit.data.shards import shard_io

        for sample in shard_io(self.fmt).read_shard(self.root, self.name, self.count):
            if "pixels" in sample:
                yield sample["key"], np.ascontiguousarray(sample["pixels"].transpose(1, 2, 0))
                continue
            m = sample["moments"]
            yield sample["key"], to_uint8(m[: m.shape[0] // 2])


@dataclass
class NpzPart:
    path: str
    start: int
    stop: int

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        from bigdit.evaluation.reference import NpzArray

        rows = NpzArray(self.path).read(self.start, self.stop)
        for i, image in enumerate(rows, self.start):
            yield f"{i:09d}", image


@dataclass
class Source:
    """An input cut into parts, with the side of its square images."""

    spec: str
    kind: str            # folder | tars | shards | npz
    parts: list[Any]
    resolution: int
    count: int | None    # images, when known before reading (not for tars)


def open_source(spec: str, resolution: int | None = None) -> Source:
    """The parts of ``images=spec``; raises before reading any pixels when the input cannot make a reference."""
    from bigdit.data.images import DIGITS, input_tars, list_inputs

    path = Path(spec)
    if spec == DIGITS:
        raise ValueError(f"images={DIGITS}: digits are 8x8 grayscale; Inception metrics need RGB images "
                         f"(score digits with tools/eval_digits.py)")
    if path.is_file() and path.suffix == ".npz":
        from bigdit.evaluation.reference import open_batch

        arr = open_batch(path, "images")
        side = _square(arr.shape[1], arr.shape[2], spec)
        _same_resolution(side, resolution, spec)
        parts = [NpzPart(str(path), a, min(a + PART_IMAGES, len(arr))) for a in range(0, len(arr), PART_IMAGES)]
        return Source(spec, "npz", parts, side, len(arr))
    if path.is_dir() and (path / "manifest.json").is_file():
        from bigdit.data.schema import Manifest

        manifest = Manifest.load(path)
        if manifest.vae != "none":
            raise ValueError(f"images={spec}: its shards hold VAE latents (vae={manifest.vae}); a reference needs "
                             f"pixels: give the original images, or shards encoded with vae=none")
        c, h, w = manifest.latent_shape
        if c != 3:
            raise ValueError(f"images={spec}: its pixel shards have {c} channel(s); Inception metrics need RGB")
        side = _square(h, w, spec)
        _same_resolution(side, resolution, spec)
        parts = [ShardPart(str(path), manifest.format, s["name"], s.get("count")) for s in manifest.shards]
        return Source(spec, "shards", parts, side, manifest.count)
    if resolution is None:
        raise ValueError(f"images={spec}: give resolution=<side> (images are ADM centre-cropped to it; use the "
                         f"resolution of the samples you will evaluate)")
    tars = input_tars(spec)
    if tars:
        return Source(spec, "tars", [TarPart(u, int(resolution)) for u in tars], int(resolution), None)
    items, _ = list_inputs(spec)
    parts = [FolderPart(items[a : a + PART_IMAGES], int(resolution)) for a in range(0, len(items), PART_IMAGES)]
    return Source(spec, "folder", parts, int(resolution), len(items))


def _square(h: int, w: int, spec: str) -> int:
    if h != w:
        raise ValueError(f"images={spec}: {h}x{w} images; a reference batch holds square images")
    return int(h)


def _same_resolution(side: int, resolution: int | None, spec: str) -> None:
    if resolution is not None and int(resolution) != side:
        raise ValueError(f"images={spec} holds {side}x{side} images but resolution={resolution} was asked")


class _Stream(torch.utils.data.IterableDataset):
    """(key, image) of this rank's parts; DataLoader workers split them."""

    def __init__(self, parts: list[Any]):
        self.parts = parts

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        parts = self.parts if info is None else self.parts[info.id :: info.num_workers]
        for part in parts:
            yield from part


def _identity(x):
    return x


def iterate(source: Source, rank: int = 0, world_size: int = 1, num_workers: int = 0) -> Iterator[tuple[str, np.ndarray | None]]:
    """(key, uint8 HWC image or None for a skipped tar sample) of the parts of ``rank``."""
    parts = source.parts[rank::world_size]
    workers = min(num_workers, len(parts))
    loader = torch.utils.data.DataLoader(_Stream(parts), batch_size=None, num_workers=workers,
                                         collate_fn=_identity)
    yield from loader
