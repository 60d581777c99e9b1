#!/usr/bin/env python
"""Encode images into latent shards: ``python tools/encode_latents.py input=<images> out=<dir> vae=<hub id|dir|none>``.

Keys (configs/encode_latents.yaml, or ``--help``): input, out, format=wds|mds, vae, resolution, flip,
batch_size, shard_size. The input list is shuffled with ``seed`` and cut into shards of ``shard_size``;
shard ``i`` belongs to rank ``i % world_size``, so any number of processes (torchrun ranks, SLURM tasks or
array tasks) write disjoint shards; ``launcher=slurm`` (``launcher.tasks_per_node``, ``launcher.array``)
submits this tool as such a job itself (:func:`bigdit.launch.submit_tool`). A shard is written under a
temporary name and renamed when whole, then recorded in ``<shard>.json``; rerunning skips recorded shards.
The last rank to finish writes ``manifest.json`` (and for MDS the root ``index.json``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

import bigdit  # noqa: F401  (torchvision shim before diffusers)
from bigdit.codec import pixel_moments, vae_moments, vae_scaling
from bigdit.data.images import DIGITS, Item, list_inputs, load_pixels
from bigdit.data.schema import ChannelStats, Manifest, finalize, shard_io, write_json_atomic
from bigdit.data.wds import shard_name
from bigdit.launch import run_or_submit, work_slice

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


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


def encode_shard(cfg: DictConfig, root: Path, name: str, items: list[Item], vae, io, progress) -> dict:
    """Encode ``items`` into shard ``name``; returns its record (count, bytes, latent shape, stats)."""
    loader = torch.utils.data.DataLoader(_Pixels(items, cfg.resolution), batch_size=cfg.batch_size,
                                         num_workers=cfg.num_workers)
    writer = io.Writer(root, name)
    stats = ChannelStats()
    shape = None
    try:
        start = 0
        for pixels in loader:
            batch = items[start : start + len(pixels)]
            start += len(pixels)
            if vae is None:
                moments = pixel_moments(pixels)
                flipped = pixel_moments(pixels.flip(3)) if cfg.flip else None
            else:
                moments = vae_moments(vae, pixels)
                flipped = vae_moments(vae, pixels.flip(3)) if cfg.flip else None
            m = moments.numpy()
            c = m.shape[1] // 2
            shape = [c, m.shape[2], m.shape[3]]
            stats.add(m[:, :c])
            f = None if flipped is None else flipped.numpy()
            for j, it in enumerate(batch):
                writer.write({"key": it.key, "moments": m[j], "moments_flip": None if f is None else f[j],
                              "cls": it.cls, "txt": it.txt, "json": dict(it.meta, source=os.path.basename(it.source))})
            progress.update(len(batch))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    record = {"count": writer.count, "bytes": io.shard_bytes(root, name), "latent_shape": shape,
              "stats": stats.to_json()}
    write_json_atomic(root / f"{name}.json", record)  # after the rename: a record means a whole shard
    return record


#: The keys that decide what each shard holds: a rerun may only resume shards made with the same values.
SHARD_KEYS = ("input", "format", "vae", "vae_subfolder", "resolution", "flip", "shard_size", "shuffle", "seed", "limit")


def check_same_settings(cfg: DictConfig, root: Path) -> None:
    """Record the shard-defining settings in ``out``; refuse to resume shards written with others."""
    now = {k: str(cfg[k]) for k in SHARD_KEYS}
    path = root / "encode_settings.json"
    if path.is_file():
        before = json.loads(path.read_text())
        diff = {k: (before.get(k), v) for k, v in now.items() if before.get(k) != v}
        if diff:
            raise ValueError(f"{root} holds shards encoded with other settings {diff} (before, now): "
                             f"use a new out, or the original settings to resume")
    else:
        write_json_atomic(path, now)


def run(cfg: DictConfig) -> Manifest | None:
    """Encode this rank's shards of ``cfg.input`` into ``cfg.out``; returns the manifest once all shards exist."""
    from tqdm import tqdm

    io = shard_io(cfg.format)
    if cfg.input is None or cfg.out is None:
        raise ValueError("give input=<image folder | tar dir/glob | sklearn:digits> and out=<shard dir>")
    if cfg.shard_size <= 0 or cfg.batch_size <= 0:
        raise ValueError("shard_size and batch_size must be positive")
    items, classes = list_inputs(str(cfg.input))
    if cfg.limit:
        items = items[: int(cfg.limit)]
    if cfg.shuffle:  # mixed classes in every shard: the loader only shuffles within shards
        items = [items[i] for i in np.random.default_rng(cfg.seed).permutation(len(items))]
    names = [shard_name(i) for i in range((len(items) + cfg.shard_size - 1) // cfg.shard_size)]
    rank, world = work_slice(cfg)
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    check_same_settings(cfg, root)
    digits = cfg.input == DIGITS
    todo = [i for i in range(rank, len(names), world) if not (root / f"{names[i]}.json").is_file()]

    device = torch.device(cfg.device if cfg.device != "auto" else
                          (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"))
    vae, scale, shift = None, 1.0, 0.0
    if str(cfg.vae).lower() != "none":
        vae = load_vae(cfg, device)
        scale, shift = vae_scaling(vae)
    base = Manifest(format=cfg.format, latent_shape=[], vae=str(cfg.vae), scaling_factor=scale, shift_factor=shift,
                    resolution=8 if digits else int(cfg.resolution), flip=bool(cfg.flip), classes=classes)

    n_todo = sum(len(items[i * cfg.shard_size : (i + 1) * cfg.shard_size]) for i in todo)
    print(f"rank {rank}/{world}: {len(items)} images in {len(names)} shards, {len(todo)} shard(s) "
          f"({n_todo} images) to encode here, vae={cfg.vae} on {device}", flush=True)
    t0 = time.perf_counter()
    with tqdm(total=n_todo, unit="img", disable=not cfg.progress) as progress:
        for i in todo:
            encode_shard(cfg, root, names[i], items[i * cfg.shard_size : (i + 1) * cfg.shard_size], vae, io,
                         progress)
    elapsed = time.perf_counter() - t0
    manifest = finalize(root, base, names)
    if manifest is None:
        print(f"rank {rank}: done in {elapsed:.1f}s; other ranks still own missing shards, the last one to "
              f"finish writes {root}/manifest.json", flush=True)
        return None
    total_bytes = sum(int(json.loads((root / f"{n}.json").read_text())["bytes"]) for n in names)
    print(f"{manifest.count} samples, {len(names)} {cfg.format} shards, {total_bytes / 2**20:.1f} MiB, latents "
          f"{manifest.latent_shape} -> {root}/manifest.json ({n_todo / max(elapsed, 1e-9):.1f} img/s here)\n"
          f"per-channel latent mean {manifest.stats['mean']}\nper-channel latent std  {manifest.stats['std']}",
          flush=True)
    return manifest


@hydra.main(config_path=CONFIG_DIR, config_name="encode_latents", version_base=None)
def main(cfg: DictConfig) -> None:
    run_or_submit(cfg, __file__, run)  # launcher=slurm|local: a job whose tasks each encode their slice


if __name__ == "__main__":
    main()
