#!/usr/bin/env python
"""Sample a trained model: ``python tools/sample.py run=runs/demo per_class=16 cfg_scale=4``.

Writes ``grid.png`` (one row per class) and an ADM-style ``samples.npz`` (``arr_0``: uint8 NHWC images,
``arr_1``: labels) to ``out`` (default ``<run>/samples``). EMA weights by default. Keys: configs/sample.yaml.
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

import bigdit  # noqa: F401
from bigdit.diffusion import make_schedule
from bigdit.inference import generate, load_run, resolve_device, save_grid, to_uint8_images
from bigdit.models import build_model, load_weights

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def load_model(cfg: DictConfig):
    """(model, diffusion config, default output dir) from ``run=`` or ``ckpt=`` + ``model=``."""
    if (cfg.run is None) == (cfg.ckpt is None):
        raise ValueError("give exactly one of run=<run dir> or ckpt=<checkpoint file> (with model={name: ...})")
    if cfg.run is not None:
        model, run_cfg = load_run(cfg.run, cfg.step, cfg.weights)
        return model, run_cfg.diffusion, Path(cfg.run) / "samples"
    if cfg.model is None:
        raise ValueError("ckpt= needs the model config, e.g. 'model={name: DiT-XL/2, input_size: 32}'")
    model = load_weights(build_model(**cfg.model), cfg.ckpt, cfg.weights).eval()
    return model, OmegaConf.load(Path(CONFIG_DIR) / "diffusion" / "gaussian.yaml"), Path("samples")


def decode(x: torch.Tensor, cfg: DictConfig, device: torch.device) -> torch.Tensor:
    """Model outputs -> images in [-1, 1]: pixels as they are, latents through the VAE decoder."""
    if cfg.vae is None:
        if x.shape[1] not in (1, 3):
            raise ValueError(f"the model makes {x.shape[1]}-channel latents: pass vae=<AutoencoderKL hub id or dir>")
        return x
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(cfg.vae).to(device).eval()
    with torch.no_grad():
        return torch.cat([vae.decode(z.to(device) / cfg.vae_scale).sample.cpu() for z in x.split(32)])


@hydra.main(config_path=CONFIG_DIR, config_name="sample", version_base=None)
def main(cfg: DictConfig) -> None:
    device = resolve_device(cfg.device)
    model, diffusion_cfg, default_out = load_model(cfg)
    classes = list(range(model.num_classes)) if cfg.classes is None else list(cfg.classes)
    bad = [c for c in classes if not 0 <= c < model.num_classes]
    if bad:
        raise ValueError(f"classes {bad} are outside 0..{model.num_classes - 1}")
    labels = torch.tensor(classes).repeat_interleave(cfg.per_class)
    t0 = time.perf_counter()
    x = generate(model, make_schedule(**diffusion_cfg), labels, sampler=cfg.sampler, steps=cfg.steps,
                 cfg_scale=cfg.cfg_scale, guidance=cfg.guidance, eta=cfg.eta, seed=cfg.seed,
                 clip_denoised=cfg.vae is None if cfg.clip_denoised is None else cfg.clip_denoised,
                 batch_size=cfg.batch_size, device=device)
    images = to_uint8_images(decode(x, cfg, device))
    out = Path(cfg.out) if cfg.out else default_out
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "samples.npz", images, labels.numpy())
    grid = save_grid(images, rows=len(classes), path=out / "grid.png")
    print(f"{len(images)} samples of {len(classes)} classes in {time.perf_counter() - t0:.1f}s "
          f"({cfg.sampler}, {cfg.steps} steps, cfg {cfg.cfg_scale}) -> {grid}, {out / 'samples.npz'}")


if __name__ == "__main__":
    main()
