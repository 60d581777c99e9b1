#!/usr/bin/env python
"""Cache CLIP text embeddings of the captions: ``python tools/cache_text.py shards=<dir> out=<dir> clip_model=ViT-L-14 pretrained=<tag|file>``.

Reads every sample's ``txt`` from a shard directory, runs the open_clip text tower and writes the same
shards (same names and keys, every field kept) to ``out`` with ``clip_tokens`` (77 x D per-token states
after the final layer norm, from the ``last`` or ``penultimate`` block) and ``clip_pooled`` (the pooled,
projected embedding), both float16. Also writes ``empty_prompt.npz`` (tokens, pooled) beside the manifest
for classifier-free guidance. Resumable per shard; keys: configs/cache_text.yaml or ``--help``.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

import bigdit  # noqa: F401  (torchvision shim before open_clip)
from bigdit.data.schema import EMPTY_PROMPT_NAME, Manifest, shard_io, write_json_atomic

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


class TextEncoder:
    """An open_clip text tower returning per-token states (after ``ln_final``) and pooled embeddings."""

    def __init__(self, model: str, pretrained: str | None, layer: str = "last", device: str = "cpu",
                 model_config: str | None = None):
        import open_clip

        if layer not in ("last", "penultimate"):
            raise ValueError(f"layer={layer!r}: use last or penultimate")
        if model_config:  # a custom architecture (e.g. the tests' tiny tower): register its JSON config
            open_clip.add_model_config(model_config)
        self.model = open_clip.create_model(model, pretrained=pretrained or None, device=device).eval()
        self.tokenizer = open_clip.get_tokenizer(model)
        self.device = device
        self.layer = layer
        blocks = self.model.transformer.resblocks
        self._captured: list[torch.Tensor] = []
        # Hooks see the states the pooled embedding is computed from, so one encode_text call gives both.
        target = self.model.ln_final if layer == "last" else blocks[-2]
        target.register_forward_hook(lambda mod, args, out: self._captured.append(out))
        self.tokens = int(self.model.positional_embedding.shape[0])
        self.dim = int(self.model.ln_final.normalized_shape[0])

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(tokens (N, T, D), pooled (N, P)) float16 for a list of captions."""
        ids = self.tokenizer(texts).to(self.device)
        self._captured.clear()
        pooled = self.model.encode_text(ids)
        states = self._captured[-1]
        if not getattr(self.model.transformer, "batch_first", True):
            states = states.transpose(0, 1)
        if self.layer == "penultimate":
            states = self.model.ln_final(states)
        return states.float().cpu().half().numpy(), pooled.float().cpu().half().numpy()


def run(cfg: DictConfig) -> Manifest:
    """Write ``cfg.out``: the shards of ``cfg.shards`` plus CLIP text embeddings."""
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
    with tqdm(total=manifest.count, unit="caption", disable=not cfg.progress) as bar:
        for shard in manifest.shards:
            name = shard["name"]
            if (out / f"{name}.json").is_file():
                bar.update(shard["count"])
                continue
            samples = list(io.read_shard(cfg.shards, name))
            missing = [s["key"] for s in samples if s.get("txt") is None]
            if missing:
                raise ValueError(f"{cfg.shards}/{name}: samples {missing[:3]} have no txt caption")
            writer = io.Writer(out, name)
            try:
                for i in range(0, len(samples), cfg.batch_size):
                    batch = samples[i : i + cfg.batch_size]
                    tokens, pooled = enc([s["txt"] for s in batch])
                    for s, t, p in zip(batch, tokens, pooled):
                        writer.write(dict(s, clip_tokens=t, clip_pooled=p))
                    bar.update(len(batch))
                writer.close()
            except BaseException:
                writer.abort()
                raise
            record = json.loads((Path(cfg.shards) / f"{name}.json").read_text())
            record["bytes"] = io.shard_bytes(out, name)
            write_json_atomic(out / f"{name}.json", record)
    tokens, pooled = enc([""])
    np.savez(out / EMPTY_PROMPT_NAME, tokens=tokens[0], pooled=pooled[0])
    manifest.text = {"model": cfg.clip_model, "pretrained": cfg.pretrained, "layer": cfg.layer, "tokens": enc.tokens,
                     "dim": enc.dim, "pooled_dim": int(pooled.shape[-1])}
    if manifest.format == "mds":
        from bigdit.data.mds import merge_index

        merge_index(out, [s["name"] for s in manifest.shards])
    manifest.save(out)
    print(f"{manifest.count} captions -> {out} ({cfg.clip_model}, {cfg.layer} layer: tokens {enc.tokens}x{enc.dim}, "
          f"pooled {pooled.shape[-1]}); empty prompt -> {out / EMPTY_PROMPT_NAME}")
    return manifest


@hydra.main(config_path=CONFIG_DIR, config_name="cache_text", version_base=None)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
