#!/usr/bin/env python
"""Sample a trained model: ``python tools/sample.py run=runs/demo per_class=16 cfg_scale=4``.

Class-conditional models: one row per class. Text-to-image models: ``prompts='[a red bus, two cats]'``
(embedded at sampling time with the CLIP tower the training captions were cached with, read from the run's
data manifest) or ``embeddings=<npz with tokens (N, T, D)>`` (cached embeddings), one row per prompt, guided
against the empty prompt. Writes ``grid.png`` and an ADM-style ``samples.npz`` (``arr_0``: uint8 NHWC
images, ``arr_1``: labels or prompt indices; prompts also in ``prompts.txt``) to ``out`` (default
``<run>/samples``). EMA weights by default. Sampler settings left null come from the run's preset
(``sample:`` in its config.yaml), then DiT's defaults. Keys: configs/sample.yaml.
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

import bigdit  # noqa: F401
from bigdit.codec import LatentCodec
from bigdit.data.schema import Manifest, empty_prompt_context
from bigdit.diffusion import dit_cfg_scale, make_schedule
from bigdit.inference import generate, load_run, resolve_device, save_grid, to_uint8_images
from bigdit.models import build_model, load_weights

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
#: sampler settings when neither the command nor the run's preset gives them (DiT's evaluation setup)
DEFAULT_SETTINGS = {"sampler": "ddpm", "steps": 250, "cfg_scale": 4.0, "cfg_convention": "dit", "guidance": "dit"}


def load_model(cfg: DictConfig):
    """(model, run config or None, default output dir) from ``run=`` or ``ckpt=`` + ``model=``."""
    if (cfg.run is None) == (cfg.ckpt is None):
        raise ValueError("give exactly one of run=<run dir> or ckpt=<checkpoint file> (with model={name: ...})")
    if cfg.run is not None:
        model, run_cfg = load_run(cfg.run, cfg.step, cfg.weights)
        return model, run_cfg, Path(cfg.run) / "samples"
    if cfg.model is None:
        raise ValueError("ckpt= needs the model config, e.g. 'model={name: DiT-XL/2, input_size: 32}'")
    model = load_weights(build_model(**cfg.model), cfg.ckpt, cfg.weights).eval()
    return model, None, Path("samples")


def settings(cfg: DictConfig, run_cfg: DictConfig | None) -> dict:
    """Sampler settings: the command's, else the run preset's ``sample:`` section, else DiT's defaults."""
    preset = run_cfg.get("sample") if run_cfg is not None else None
    preset = OmegaConf.to_container(preset, resolve=True) if preset is not None else {}
    return {k: cfg[k] if cfg[k] is not None else preset.get(k, default) for k, default in DEFAULT_SETTINGS.items()}


def data_manifest(run_cfg: DictConfig | None) -> tuple[str | None, Manifest | None]:
    """The training shards' root and manifest (latent codec, CLIP tower), when the run trained from shards."""
    root = run_cfg.data.get("root") if run_cfg is not None else None
    if root is None or not (Path(root) / "manifest.json").is_file():
        return None, None
    return root, Manifest.load(root)


def text_conditioning(cfg: DictConfig, model, root: str | None, manifest: Manifest | None):
    """(CLIP tokens (N, T, D), empty-prompt tokens (T, D), captions) for a text-to-image model."""
    if (cfg.prompts is None) == (cfg.embeddings is None):
        raise ValueError(f"{type(model).__name__} is text-to-image: give prompts='[a photo of a cat, ...]' or "
                         f"embeddings=<npz with tokens (N, {model.context_tokens}, {model.context_dim})>")
    if cfg.embeddings is not None:
        cached = np.load(cfg.embeddings)
        if root is None:
            raise ValueError("embeddings= takes the empty prompt from the run's shards (empty_prompt.npz); this run "
                             "did not train from shards: use prompts= instead")
        tokens = torch.from_numpy(cached["tokens"]).float()
        return tokens, empty_prompt_context(root, manifest), [f"embedding {i}" for i in range(len(tokens))]
    from bigdit.text import TextEncoder

    text = dict(manifest.text) if manifest is not None and manifest.text else {}
    overrides = {"model": cfg.clip_model, "pretrained": cfg.clip_pretrained, "model_config": cfg.clip_model_config}
    text.update({k: v for k, v in overrides.items() if v is not None})
    if "model" not in text:
        raise ValueError("no CLIP model recorded for this run (it did not train from cached shards): pass "
                         "clip_model=<open_clip name> clip_pretrained=<tag or weights file>")
    enc = TextEncoder(text["model"], text.get("pretrained"), text.get("layer", "last"), "cpu", text.get("model_config"))
    prompts = list(cfg.prompts)
    tokens, _ = enc(prompts)
    empty, _ = enc([""])
    return torch.from_numpy(tokens).float(), torch.from_numpy(empty[0]).float(), prompts


def decode(x: torch.Tensor, cfg: DictConfig, manifest: Manifest | None, device: torch.device) -> torch.Tensor:
    """Model outputs -> images in [-1, 1]: pixels as they are, latents through the VAE decoder (by default the
    VAE and latent scaling the training shards were encoded with)."""
    vae_id = cfg.vae or (manifest.vae if manifest is not None and manifest.vae != "none" else None)
    if vae_id is None:
        if x.shape[1] not in (1, 3):
            raise ValueError(f"the model makes {x.shape[1]}-channel latents: pass vae=<AutoencoderKL hub id or dir>")
        return x
    from diffusers import AutoencoderKL

    from_shards = cfg.vae_scale is None and manifest is not None and manifest.vae != "none"
    codec = LatentCodec.from_manifest(manifest) if from_shards else LatentCodec(cfg.vae_scale or 0.18215)
    vae = AutoencoderKL.from_pretrained(vae_id).to(device).eval()
    with torch.no_grad():
        return torch.cat([vae.decode(codec.to_vae(z.to(device))).sample.float().cpu() for z in x.split(32)])


@hydra.main(config_path=CONFIG_DIR, config_name="sample", version_base=None)
def main(cfg: DictConfig) -> None:
    device = resolve_device(cfg.device)
    model, run_cfg, default_out = load_model(cfg)
    root, manifest = data_manifest(run_cfg)
    null = None
    if getattr(model, "context_dim", None) is not None:
        cond, null, names = text_conditioning(cfg, model, root, manifest)
    else:
        names = list(range(model.num_classes)) if cfg.classes is None else list(cfg.classes)
        bad = [c for c in names if not 0 <= c < model.num_classes]
        if bad:
            raise ValueError(f"classes {bad} are outside 0..{model.num_classes - 1}")
        cond = torch.tensor(names)
    cond = cond.repeat_interleave(cfg.per_class, dim=0)
    s = settings(cfg, run_cfg)
    cfg_scale = dit_cfg_scale(s["cfg_scale"], s["cfg_convention"])
    pixels = manifest is None or manifest.vae == "none"
    t0 = time.perf_counter()
    schedule = make_schedule(**(run_cfg.diffusion if run_cfg is not None else
                                OmegaConf.load(Path(CONFIG_DIR) / "diffusion" / "gaussian.yaml")))
    x = generate(model, schedule, cond, null=null, sampler=s["sampler"], steps=s["steps"], cfg_scale=cfg_scale,
                 guidance=s["guidance"], eta=cfg.eta, seed=cfg.seed,
                 clip_denoised=(pixels and cfg.vae is None) if cfg.clip_denoised is None else cfg.clip_denoised,
                 batch_size=cfg.batch_size, device=device)
    images = to_uint8_images(decode(x, cfg, manifest, device))
    out = Path(cfg.out) if cfg.out else default_out
    out.mkdir(parents=True, exist_ok=True)
    index = torch.arange(len(names)).repeat_interleave(cfg.per_class) if null is not None else cond
    np.savez(out / "samples.npz", images, index.numpy())
    if null is not None:
        (out / "prompts.txt").write_text("".join(f"{p}\n" for p in names))
    grid = save_grid(images, rows=len(names), path=out / "grid.png")
    print(f"{len(images)} samples of {len(names)} {'prompts' if null is not None else 'classes'} in "
          f"{time.perf_counter() - t0:.1f}s ({s['sampler']}, {s['steps']} steps, cfg {cfg_scale} in DiT's "
          f"convention) -> {grid}, {out / 'samples.npz'}")


if __name__ == "__main__":
    main()
