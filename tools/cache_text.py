#!/usr/bin/env python
"""Cache CLIP text embeddings of the captions: ``python tools/cache_text.py shards=<dir> out=<dir> clip_model=ViT-L-14 pretrained=<tag|file>``.

Reads every sample's ``txt`` from a shard directory, runs the open_clip text tower and writes the same
shards (same names and keys, every field kept) to ``out`` with ``clip_tokens`` (77 x D per-token states
after the final layer norm, from the ``last`` or ``penultimate`` block) and ``clip_pooled`` (the pooled,
projected embedding), both float16. Also writes ``empty_prompt.npz`` (tokens, pooled) beside the manifest
for classifier-free guidance. Resumable per shard. Shard ``i`` belongs to rank ``i % world_size`` (``rank``/
``world_size`` keys, the SLURM array/task or torchrun environment, or ``launcher=slurm`` with several tasks or
``launcher.array``); the rank that finds every shard done writes the manifest. Keys: configs/cache_text.yaml
or ``--help``.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

import bigdit  # noqa: F401  (torchvision shim before open_clip)
from bigdit.data.schema import EMPTY_PROMPT_NAME, Manifest
from bigdit.data.shards import save_manifest, shard_io, write_shard
from bigdit.fsio import atomic_path
from bigdit.launch import run_or_submit, work_slice
from bigdit.text import TextEncoder

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def run(cfg: DictConfig) -> Manifest | None:
    """Write this rank's shards of ``cfg.out`` (those of ``cfg.shards`` plus CLIP text embeddings); returns the
    manifest once every shard exists, None while other ranks still work."""
    from tqdm import tqdm

    if cfg.shards is None or cfg.out is None:
        raise ValueError("give shards=<shard dir with manifest.json> and out=<new shard dir>")
    if Path(cfg.shards).resolve() == Path(cfg.out).resolve():
        raise ValueError("out must differ from shards: the shards are rewritten with the text fields added")
    manifest = Manifest.load(cfg.shards)
    io = shard_io(manifest.format)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    enc = TextEncoder(cfg.clip_model, cfg.pretrained, cfg.layer, device, cfg.model_config)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rank, world = work_slice(cfg)
    mine = [shard for i, shard in enumerate(manifest.shards)
            if i % world == rank and not (out / f"{shard['name']}.json").is_file()]
    print(f"rank {rank}/{world}: {len(mine)} of {len(manifest.shards)} shards to caption here", flush=True)
    with tqdm(total=sum(s["count"] for s in mine), unit="caption", disable=not cfg.progress) as bar:
        for shard in mine:
            name = shard["name"]
            samples = list(io.read_shard(cfg.shards, name))
            missing = [s["key"] for s in samples if s.get("txt") is None]
            if missing:
                raise ValueError(f"{cfg.shards}/{name}: samples {missing[:3]} have no txt caption")
            record = json.loads((Path(cfg.shards) / f"{name}.json").read_text())  # same samples: same stats
            with write_shard(out, manifest.format, name, record) as writer:
                for i in range(0, len(samples), cfg.batch_size):
                    batch = samples[i : i + cfg.batch_size]
                    tokens, pooled = enc([s["txt"] for s in batch])
                    for s, t, p in zip(batch, tokens, pooled):
                        writer.write(dict(s, clip_tokens=t, clip_pooled=p))
                    bar.update(len(batch))
    if not all((out / f"{shard['name']}.json").is_file() for shard in manifest.shards):
        print(f"rank {rank}: done; other ranks still own missing shards, the last one to finish writes "
              f"{out}/manifest.json", flush=True)
        return None
    tokens, pooled = enc([""])
    # Atomic: several last ranks may finish together. Saved through a file object: np.savez appends ".npz"
    # to a path that lacks it, which the temporary name does.
    with atomic_path(out / EMPTY_PROMPT_NAME) as tmp, open(tmp, "wb") as f:
        np.savez(f, tokens=tokens[0], pooled=pooled[0])
    manifest.text = {"model": cfg.clip_model, "pretrained": cfg.pretrained, "layer": cfg.layer,
                     "model_config": cfg.model_config, "tokens": enc.tokens,
                     "dim": enc.dim, "pooled_dim": int(pooled.shape[-1])}
    save_manifest(out, manifest)
    print(f"{manifest.count} captions -> {out} ({cfg.clip_model}, {cfg.layer} layer: tokens {enc.tokens}x{enc.dim}, "
          f"pooled {pooled.shape[-1]}); empty prompt -> {out / EMPTY_PROMPT_NAME}")
    return manifest


@hydra.main(config_path=CONFIG_DIR, config_name="cache_text", version_base=None)
def main(cfg: DictConfig) -> None:
    run_or_submit(cfg, __file__, run)  # launcher=slurm|local: a job whose tasks each caption their slice


if __name__ == "__main__":
    main()
