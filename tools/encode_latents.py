#!/usr/bin/env python
"""Encode images into latent shards: ``python tools/encode_latents.py input=<images> out=<dir> vae=<hub id|dir|none>``.

Keys (configs/encode_latents.yaml, or ``--help``): input, out, format=wds|mds, vae, resolution, flip,
batch_size, shard_size, and for REPA repa_encoder (the patch features of each image, :mod:`bigdit.repa_features`). Any number of processes (torchrun ranks, SLURM tasks or array tasks) write disjoint
shards, and each shard holds the same samples whatever their number:

- listed inputs (an image folder, ``sklearn:digits``): the list is shuffled with ``seed`` and cut into
  shards ``shard-NNNNNN`` of ``shard_size``; shard ``i`` belongs to rank ``i % world_size``.
- WebDataset tars (a path, folder, glob or brace pattern of local tars, ``pipe:`` commands, http(s) URLs; see
  :func:`bigdit.data.images.input_tars`), read through the webdataset library: input tar ``t`` belongs to rank
  ``t % world_size``, which streams it once (its DataLoader workers split its tars between them) and cuts its
  samples, in stream order, into shards ``shard-TTTTTT-PPPP`` of at most ``shard_size`` (part ``P`` holds
  samples ``P * shard_size`` onwards of tar ``T``). A bad image (undecodable, or no image member) is skipped
  and counted, in its shard's record, in the tar's record ``inputs/TTTTTT.json`` and in the summary.

``launcher=slurm`` (``launcher.tasks_per_node``, ``launcher.array``) submits this tool as such a job itself
(:func:`bigdit.launch.submit_tool`). A shard is written under a temporary name and renamed when whole, then
recorded in ``<shard>.json``; rerunning skips recorded shards (and input tars with a record). The last rank
to finish writes ``manifest.json`` (and for MDS the root ``index.json``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
import webdataset as wds
from omegaconf import DictConfig

import bigdit  # noqa: F401  (torchvision shim before diffusers)
from bigdit.codec import pixel_moments, quantize_pixels, vae_moments, vae_scaling
from bigdit.data.images import DIGITS, Item, decode_sample, input_tars, list_inputs, load_pixels, sanitize_key, tar_samples
from bigdit.data.schema import ChannelStats, Manifest, shard_name
from bigdit.data.shards import finalize, shard_io, write_shard
from bigdit.fsio import write_json_atomic
from bigdit.launch import run_or_submit, work_slice
from bigdit.repa_features import PatchFeatures, default_input_size, load_patch_encoder

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
#: Folder (under ``out``) of the input tar records: ``<t>.json`` once every shard of tar ``t`` is written.
INPUTS = "inputs"


def load_vae(cfg: DictConfig, device: torch.device):
    """diffusers ``AutoencoderKL`` in eval mode: bf16 on GPU (fp16 with dtype=fp16), fp32 on CPU."""
    from diffusers import AutoencoderKL

    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "fp32": torch.float32,
             "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.dtype]
    kwargs = {"subfolder": cfg.vae_subfolder} if cfg.vae_subfolder else {}
    try:
        vae = AutoencoderKL.from_pretrained(cfg.vae, torch_dtype=dtype, **kwargs)
    except (OSError, ValueError) as e:
        raise ValueError(f"vae={cfg.vae}: cannot load an AutoencoderKL ({e}); give a hub id, a local "
                         f"save_pretrained dir (vae_subfolder=vae for full pipelines) or vae=none") from e
    return vae.to(device).eval()


def pixel_shards(cfg: DictConfig) -> bool:
    """Whether ``cfg`` writes uint8 pixel shards: ``vae=none`` on images. ``sklearn:digits`` keep float16 moments
    (their 17 grey levels 0..16 are no 8-bit image; the demo's measured numbers were made from those)."""
    return str(cfg.vae).lower() == "none" and str(cfg.input) != DIGITS


class ShardOut:
    """One output shard being written (a held-open :func:`bigdit.data.shards.write_shard` block): encodes pixel
    batches into it, as VAE moments, or with ``pixels`` as uint8 images (pixel shards; flips are the loader's), and
    with ``repa`` also their REPA features. ``close()`` finishes it and writes its record (count, bytes, latent
    shape, channel stats and ``skipped``, the input samples dropped from it, which the caller may fill in);
    ``close(*exc_info)`` drops it. Also a ``with`` block."""

    def __init__(self, cfg: DictConfig, root: Path, name: str, vae, repa: PatchFeatures | None = None):
        self.vae, self.pixels, self.repa = vae, pixel_shards(cfg), repa
        self.flip = bool(cfg.flip) and not self.pixels
        self.record: dict[str, Any] = {"skipped": []}
        self.stats, self.shape = ChannelStats(), None
        self._block = write_shard(root, cfg.format, name, self.record)
        self._writer = self._block.__enter__()

    def __enter__(self) -> ShardOut:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close(*exc)

    def _moments(self, pixels: torch.Tensor) -> np.ndarray:
        return (pixel_moments(pixels) if self.vae is None else vae_moments(self.vae, pixels)).numpy()

    def add(self, pixels: torch.Tensor, samples: list[dict[str, Any]]) -> None:
        """Encode ``pixels`` (N, C, H, W) in [-1, 1] and write them with the other fields of ``samples``."""
        r = None if self.repa is None else self.repa(pixels).cpu().half().numpy()
        if self.pixels:
            self.shape = list(pixels.shape[1:])
            self.stats.add(pixels.numpy())
            for j, (sample, image) in enumerate(zip(samples, quantize_pixels(pixels).numpy())):
                self._writer.write(dict(sample, pixels=image, repa_feats=None if r is None else r[j]))
            return
        m = self._moments(pixels)
        f = self._moments(pixels.flip(3)) if self.flip else None
        c = m.shape[1] // 2
        self.shape = [c, m.shape[2], m.shape[3]]
        self.stats.add(m[:, :c])
        for j, sample in enumerate(samples):
            self._writer.write(dict(sample, moments=m[j], moments_flip=None if f is None else f[j],
                                    repa_feats=None if r is None else r[j]))

    def close(self, *exc: Any) -> None:
        """Finish the shard and write its record; given an exception's (type, value, traceback), drop it instead."""
        self.record.update(latent_shape=self.shape, stats=self.stats.to_json())
        self._block.__exit__(*(exc or (None, None, None)))


# ------------------------------------------------------------------------ listed inputs: folders, digits


class _Pixels(torch.utils.data.Dataset):
    def __init__(self, items: list[Item], resolution: int):
        self.items, self.resolution = items, resolution

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        try:
            return torch.from_numpy(load_pixels(self.items[i], self.resolution))
        except Exception as e:  # name the file: PIL's own messages do not
            raise ValueError(f"cannot read image {self.items[i].source} (key {self.items[i].key}): {e}") from e


def encode_shard(cfg: DictConfig, root: Path, name: str, items: list[Item], vae, progress,
                 repa: PatchFeatures | None = None) -> dict:
    """Encode ``items`` into shard ``name``; returns its record (count, bytes, latent shape, stats)."""
    loader = torch.utils.data.DataLoader(_Pixels(items, cfg.resolution), batch_size=cfg.batch_size,
                                         num_workers=cfg.num_workers)
    with ShardOut(cfg, root, name, vae, repa) as out:
        start = 0
        for pixels in loader:
            batch = items[start : start + len(pixels)]
            start += len(pixels)
            out.add(pixels, [{"key": it.key, "cls": it.cls, "json": {"source": os.path.basename(it.source)}}
                             for it in batch])
            progress.update(len(batch))
    return out.record


# ------------------------------------------------------------------------------- WebDataset tar inputs


def part_name(tar: int, part: int) -> str:
    """The output shard holding part ``part`` (samples ``part * shard_size`` onwards) of input tar ``tar``."""
    return f"{shard_name(tar)}-{part:04d}"


class _TarBatches(torch.utils.data.IterableDataset):
    """A rank's input tars ``[(index, url)]`` as pixel batches, each inside one output shard: what the DataLoader
    workers send the encoding loop.

    Every worker streams whole tars (``wds.split_by_worker``), so the samples of a shard come from one stream,
    in input order, whatever the number of workers. Yields ``{tar, part, samples, pixels, end, skipped}`` batches
    (``end`` on the last batch of a part, which may be empty, with the samples skipped in that part) and after a
    tar's last part ``{tar, count}``. Parts in ``done`` (names of recorded shards) are read past, not decoded.
    """

    def __init__(self, tars: list[tuple[int, str]], resolution: int, shard_size: int, batch_size: int,
                 done: set[str]):
        self.tars, self.done = tars, done
        self.resolution, self.shard_size, self.batch_size = resolution, shard_size, batch_size

    def __iter__(self):
        for t, url in wds.split_by_worker(self.tars):
            yield from self._tar(t, url)

    def _tar(self, t: int, url: str):
        part, batch, skipped, count = 0, [], [], 0
        for count, sample in enumerate(tar_samples(url), 1):
            if count > (part + 1) * self.shard_size:  # this sample starts the next part: the current one is whole
                yield from self._end(t, part, batch, skipped)
                part, batch, skipped = part + 1, [], []
            if part_name(t, part) in self.done:
                continue
            key = sanitize_key(sample["__key__"])
            try:
                pixels, txt, meta = decode_sample(sample, self.resolution)
            except ValueError as e:  # a bad image costs its sample, not the run; it is counted and listed
                print(f"input tar {url}: skipped sample {key}: {e}", file=sys.stderr, flush=True)
                skipped.append({"key": key, "error": str(e)})
                continue
            batch.append({"key": key, "cls": -1, "txt": txt, "json": dict(meta, source=url), "pixels": pixels})
            if len(batch) == self.batch_size:
                yield self._batch(t, part, batch)
                batch = []
        if count:
            yield from self._end(t, part, batch, skipped)
        yield {"tar": t, "count": count}

    @staticmethod
    def _batch(t: int, part: int, batch: list[dict[str, Any]], skipped: list | None = None) -> dict[str, Any]:
        return {"tar": t, "part": part, "end": skipped is not None, "skipped": skipped or [],
                "pixels": torch.from_numpy(np.stack([s.pop("pixels") for s in batch])) if batch else None,
                "samples": batch}

    def _end(self, t: int, part: int, batch: list[dict[str, Any]], skipped: list):
        if part_name(t, part) not in self.done:
            yield self._batch(t, part, batch, skipped)


def input_record_path(root: Path, tar: int) -> Path:
    """The record of input tar ``tar``: url, sample count, shards and skipped samples."""
    return root / INPUTS / f"{tar:06d}.json"


def _record_tar(root: Path, t: int, url: str, count: int, shard_size: int, empty: dict[str, list]) -> None:
    """Write the record of input tar ``t`` once its ``count`` samples are in shards: the shards and the samples
    skipped in every part, from the shard records (of this run or earlier ones) or, for a part without a readable
    sample (no shard), from ``empty``."""
    shards, skipped = [], []
    for part in range(-(-count // shard_size)):
        name = part_name(t, part)
        path = root / f"{name}.json"
        if path.is_file():
            shards.append(name)
            lost = json.loads(path.read_text())["skipped"]
        else:
            lost = empty.pop(name)
        skipped += [dict(s, shard=name) for s in lost]
    write_json_atomic(input_record_path(root, t), {"url": url, "count": count, "shards": shards, "skipped": skipped})


def encode_tars(cfg: DictConfig, root: Path, tars: list[tuple[int, str]], vae, progress,
                repa: PatchFeatures | None = None) -> tuple[int, int]:
    """Encode input tars ``[(index, url)]`` into their shards, then record each tar; returns the images encoded
    and skipped."""
    if not tars:  # no DataLoader workers to start
        return 0, 0
    urls = dict(tars)
    done = {p.stem for p in root.glob("shard-*.json")}
    batches = _TarBatches(tars, int(cfg.resolution), int(cfg.shard_size), int(cfg.batch_size), done)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=cfg.num_workers)
    writing: dict[str, ShardOut] = {}  # at most one per worker: each streams one tar at a time
    empty: dict[str, list] = {}        # skipped samples of parts that had no readable one
    encoded = skipped = 0
    try:
        for msg in loader:
            if "count" in msg:
                _record_tar(root, msg["tar"], urls[msg["tar"]], msg["count"], int(cfg.shard_size), empty)
                continue
            name = part_name(msg["tar"], msg["part"])
            if msg["samples"]:
                if name not in writing:
                    writing[name] = ShardOut(cfg, root, name, vae, repa)
                writing[name].add(msg["pixels"], msg["samples"])
                encoded += len(msg["samples"])
                progress.update(len(msg["samples"]))
            if msg["end"]:
                skipped += len(msg["skipped"])
                if name in writing:
                    out = writing.pop(name)
                    out.record["skipped"] = msg["skipped"]
                    out.close()
                else:
                    empty[name] = msg["skipped"]
    except BaseException as e:
        for out in writing.values():
            out.close(type(e), e, e.__traceback__)
        raise
    return encoded, skipped


def tar_records(root: Path, n: int) -> list[dict[str, Any]] | None:
    """The records of input tars ``0..n-1``; None while some tar has none (another rank still works)."""
    paths = [input_record_path(root, t) for t in range(n)]
    if not all(p.is_file() for p in paths):
        return None
    return [json.loads(p.read_text()) for p in paths]


# ------------------------------------------------------------------------------------------------ the tool


#: The keys that decide what each shard holds: a rerun may only resume shards made with the same values.
SHARD_KEYS = ("input", "format", "vae", "vae_subfolder", "resolution", "flip", "shard_size", "shuffle", "seed", "limit",
              "repa_encoder", "repa_model", "repa_input_size", "repa_layer")


def check_same_settings(cfg: DictConfig, root: Path) -> None:
    """Record the shard-defining settings in ``out``; refuse to resume shards written with others."""
    now = {k: str(cfg[k]) for k in SHARD_KEYS}
    path = root / "encode_settings.json"
    if path.is_file():
        before = json.loads(path.read_text())
        # keys added later (repa_*) are absent from older records, which were written without them
        diff = {k: (before.get(k), v) for k, v in now.items() if before.get(k, "None") != v}
        if diff:
            raise ValueError(f"{root} holds shards encoded with other settings {diff} (before, now): "
                             f"use a new out, or the original settings to resume")
    else:
        write_json_atomic(path, now)


def load_repa(cfg: DictConfig, resolution: int, device: torch.device) -> PatchFeatures | None:
    """REPA's encoder (``repa_encoder``) at ``repa_input_size`` (default REPA's, 224 per 256 pixels), or None."""
    if cfg.repa_encoder is None:
        return None
    size = int(cfg.repa_input_size or default_input_size(resolution))
    encoder = load_patch_encoder(str(cfg.repa_encoder), size, int(cfg.repa_layer), cfg.repa_model, device)
    print(f"REPA features: {cfg.repa_encoder} at {size}x{size}, block {encoder.layer}, {encoder.tokens} x "
          f"{encoder.dim} per image (float16)", flush=True)
    return encoder


def run(cfg: DictConfig) -> Manifest | None:
    """Encode this rank's shards of ``cfg.input`` into ``cfg.out``; returns the manifest once all shards exist."""
    from tqdm import tqdm

    shard_io(cfg.format)  # an unknown format fails here, before any work
    if cfg.input is None or cfg.out is None:
        raise ValueError("give input=<image folder | WebDataset tars: path, folder, glob, {000000..000099} pattern, "
                         "pipe: command or http(s) URL | sklearn:digits> and out=<shard dir>")
    if cfg.shard_size <= 0 or cfg.batch_size <= 0 or int(cfg.resolution) <= 0:
        raise ValueError("shard_size, batch_size and resolution must be positive")
    spec = str(cfg.input)
    if spec == DIGITS and str(cfg.vae).lower() != "none":
        raise ValueError(f"input={DIGITS}: the digits are 8x8 single-channel images, which no image VAE encodes: "
                         f"use vae=none")
    urls = input_tars(spec)
    if urls is None:
        items, classes = list_inputs(spec)
        if cfg.limit:
            items = items[: int(cfg.limit)]
        if cfg.shuffle:  # mixed classes in every shard: the loader only shuffles within shards
            items = [items[i] for i in np.random.default_rng(cfg.seed).permutation(len(items))]
        names = [shard_name(i) for i in range((len(items) + cfg.shard_size - 1) // cfg.shard_size)]
    elif cfg.limit:
        raise ValueError(f"limit={cfg.limit} counts listed images; input={spec} is streamed: name fewer tars "
                         f"instead (e.g. a shorter {{000000..000009}} range)")
    else:
        classes = []
    rank, world = work_slice(cfg)
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    check_same_settings(cfg, root)

    device = torch.device(cfg.device if cfg.device != "auto" else
                          (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"))
    vae, scale, shift = None, 1.0, 0.0
    if str(cfg.vae).lower() != "none":
        vae = load_vae(cfg, device)
        scale, shift = vae_scaling(vae)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)  # each encoder block but the last halves the side
        if int(cfg.resolution) % factor:
            raise ValueError(f"resolution={cfg.resolution}: vae={cfg.vae} downsamples by {factor}, so the side must be "
                             f"a multiple of {factor} (e.g. resolution={int(cfg.resolution) // factor * factor or factor})")
    pixels = pixel_shards(cfg)
    repa = load_repa(cfg, 8 if spec == DIGITS else int(cfg.resolution), device)
    base = Manifest(format=cfg.format, latent_shape=[], vae=str(cfg.vae), scaling_factor=scale, shift_factor=shift,
                    resolution=8 if spec == DIGITS else int(cfg.resolution), flip=bool(cfg.flip), classes=classes,
                    pixels=pixels, latent_dtype="uint8" if pixels else "float16",
                    repa=None if repa is None else repa.record(str(cfg.repa_encoder), cfg.repa_model))

    t0 = time.perf_counter()
    if urls is None:
        todo = [i for i in range(rank, len(names), world) if not (root / f"{names[i]}.json").is_file()]
        n_todo = sum(len(items[i * cfg.shard_size : (i + 1) * cfg.shard_size]) for i in todo)
        print(f"rank {rank}/{world}: {len(items)} images in {len(names)} shards, {len(todo)} shard(s) "
              f"({n_todo} images) to encode here, vae={cfg.vae} on {device}", flush=True)
        with tqdm(total=n_todo, unit="img", disable=not cfg.progress) as progress:
            for i in todo:
                encode_shard(cfg, root, names[i], items[i * cfg.shard_size : (i + 1) * cfg.shard_size], vae, progress,
                             repa)
        skipped: list[dict[str, Any]] = []
    else:
        (root / INPUTS).mkdir(exist_ok=True)
        mine = [(t, url) for t, url in enumerate(urls) if t % world == rank and not input_record_path(root, t).is_file()]
        print(f"rank {rank}/{world}: {len(urls)} input tars, {len(mine)} to encode here (tar t when t % {world} == "
              f"{rank}, in shards of at most {cfg.shard_size} samples), vae={cfg.vae} on {device}", flush=True)
        with tqdm(unit="img", disable=not cfg.progress) as progress:
            n_todo, n_skipped = encode_tars(cfg, root, mine, vae, progress, repa)
        print(f"rank {rank}: {n_todo} images encoded, {n_skipped} bad ones skipped", flush=True)
        records = tar_records(root, len(urls))
        names = None if records is None else [n for r in records for n in r["shards"]]
        skipped = [] if records is None else [dict(s, url=r["url"]) for r in records for s in r["skipped"]]
        if names == []:
            raise ValueError(f"input={spec}: no readable image in its {len(urls)} tar(s) ({len(skipped)} skipped, "
                             f"the first {skipped[:1]}); see {root / INPUTS}")
    elapsed = time.perf_counter() - t0
    manifest = None if names is None else finalize(root, base, names)
    if manifest is None:
        print(f"rank {rank}: done in {elapsed:.1f}s; other ranks still own missing shards, the last one to "
              f"finish writes {root}/manifest.json", flush=True)
        return None
    total_bytes = sum(int(json.loads((root / f"{n}.json").read_text())["bytes"]) for n in names)
    print(f"{manifest.count} samples, {len(names)} {cfg.format} shards, {total_bytes / 2**20:.1f} MiB, latents "
          f"{manifest.latent_shape} -> {root}/manifest.json ({n_todo / max(elapsed, 1e-9):.1f} img/s here)\n"
          f"per-channel latent mean {manifest.stats['mean']}\nper-channel latent std  {manifest.stats['std']}",
          flush=True)
    if urls is not None:
        print(f"{len(skipped)} bad input sample(s) skipped (listed in {root / INPUTS}/*.json and in their shards' "
              f"records)" + "".join(f"\n  {s['key']} in {s['url']}: {s['error']}" for s in skipped[:5])
              + ("\n  ..." if len(skipped) > 5 else ""), flush=True)
    return manifest


@hydra.main(config_path=CONFIG_DIR, config_name="encode_latents", version_base=None)
def main(cfg: DictConfig) -> None:
    run_or_submit(cfg, __file__, run)  # launcher=slurm|local: a job whose tasks each encode their slice


if __name__ == "__main__":
    main()
