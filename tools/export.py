#!/usr/bin/env python
"""Export a run's weights: ``python tools/export.py run=runs/x [step=N] [format=safetensors|diffusers] [out=DIR]``.

Consolidates the checkpoint of any strategy (DDP, FSDP2, DeepSpeed ZeRO-1/2/3) in one process, through the
strategy that wrote it (``bigdit.export.consolidated_weights``), and writes, with a model card
(``README.md``: model, data, steps and images seen, sampler settings, evaluation results) in every case:

- ``format=safetensors`` (default, every backbone): ``ema.safetensors`` (and ``model.safetensors`` with
  ``raw=true``) plus ``model_config.json``, loadable by ``build_model(**config)`` + ``load_weights`` and by
  ``tools/sample.py ckpt=... model=...``; DiT models also get ``ema.pt``, the official DiT checkpoint format.
- ``format=diffusers`` (class-conditional latent DiT): a diffusers ``DiTPipeline`` (``save_pretrained``):
  ``DiTTransformer2DModel`` with the EMA weights, the run's VAE, DDIM on the exact training betas and the
  manifest's class names as ``id2label``; ``DiTPipeline.from_pretrained(out)`` samples it
  (:mod:`bigdit.diffusers_export`). U-DiT, U-ViT, text-to-image and pixel-space runs are refused with the
  reason before anything is read: their format is safetensors.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import bigdit  # noqa: F401
from bigdit.checkpoint import latest_checkpoint, step_tag
from bigdit.export import (consolidated_weights, safetensors_usage, sample_defaults, write_model_card,
                           write_safetensors)
from bigdit.models import build_model

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
FORMATS = ("safetensors", "diffusers")


def _diffusers_notes(model, betas_len: int, settings_guidance: str | None) -> str:
    from bigdit.diffusers_export import PIPELINE_NULL_LABEL, ddim_steps_that_match

    c = model.in_channels
    steps = ", ".join(map(str, ddim_steps_that_match(betas_len)))
    return f"""### DiTPipeline and bigdit's sampler

- **Scheduler**: DDIM (eta 0) on the exact training betas (`trained_betas`, {betas_len} steps),
  `timestep_spacing="leading"`, `steps_offset=0`, `set_alpha_to_one=True`: the same timesteps and updates as
  `tools/sample.py sampler=ddim steps=N` whenever N divides {betas_len} ({steps}).
- **Timestep features**: diffusers' DiT port uses frequencies `10000 ** (-i / 127)`, DiT (and this model)
  `10000 ** (-i / 128)`; the stock pipeline is therefore close to, not exactly, the trained model (as for the
  hub's `facebook/DiT-XL-2-256`). The two lines in the example above make it exact.
- **Guidance**: `guidance_scale` is in DiT's convention (1 = none; the pipeline guides only above 1) and
  guides all {c} latent channels: `tools/sample.py guidance=all`.{
    f" The run's `guidance=dit` guides DiT's first 3 channels only, which differs for {c}-channel latents."
    if settings_guidance == "dit" and c > 3 else ""}
  The null label is {PIPELINE_NULL_LABEL} (hard-coded in DiTPipeline): the label table is padded to
  {PIPELINE_NULL_LABEL + 1} rows, the null embedding at {PIPELINE_NULL_LABEL}.
- **Learned sigma**: DiTPipeline drops the variance channels, so DDPM with the learned variance
  (`sampler=ddpm`) is not reproduced; DDIM ignores them in both.
- **Noise**: `tools/sample.py seed=s` draws sample k's noise from its own generator,
  `torch.Generator().manual_seed(stream_seed(s, k))` with
  `stream_seed(s, k) = int(numpy.random.SeedSequence([s, k]).generate_state(1, numpy.uint64)[0] >> 1)`;
  passing the list of those generators as `generator=` makes the pipeline start from the same noise
  (it draws `torch.randn((1, {c}, {model.input_size}, {model.input_size}), generator=generator[k])` per sample).
- **Decoding**: `vae.decode(latents / vae.config.scaling_factor)`, the scaling factor being the shards'.
"""


def export_safetensors(cfg: DictConfig, run_dir: Path, run_cfg: DictConfig, model, ckpt: Path, out: Path,
                       manifest, settings: dict) -> str:
    """``ema.safetensors`` (+ ``model.safetensors``), ``model_config.json``, ``ema.pt`` in the official format for DiT
    and ADM; returns the usage."""
    weights = {which: consolidated_weights(ckpt, run_cfg.model, which) for which in
               (("model", "ema") if cfg.raw else ("ema",))}
    write_safetensors(out, run_cfg.model, model, weights)
    return safetensors_usage(out, run_cfg, settings, manifest, run_dir)


def export_diffusers(run_cfg: DictConfig, model, ckpt: Path, out: Path, manifest, vae: str,
                     settings: dict) -> tuple[str, str]:
    """The ``DiTPipeline`` (``save_pretrained``); returns the card's usage and notes."""
    from bigdit.diffusers_export import build_pipeline
    from bigdit.diffusion import dit_cfg_scale, make_betas

    weights = consolidated_weights(ckpt, run_cfg.model, "ema")
    model.load_state_dict(weights, strict=True)
    betas = make_betas(**(OmegaConf.to_container(run_cfg.diffusion, resolve=True) if "diffusion" in run_cfg else {}))
    # the shards' latent scaling (a VAE given by vae= is the one they were encoded with, e.g. a local copy)
    scaling = manifest.scaling_factor if manifest is not None and manifest.vae != "none" else None
    pipe = build_pipeline(model, weights, betas, vae, scaling, manifest.classes if manifest is not None else ())
    pipe.save_pretrained(out)
    scale = dit_cfg_scale(settings["cfg_scale"], settings["cfg_convention"])
    usage = f"""```python
import torch
from diffusers import DiTPipeline

pipe = DiTPipeline.from_pretrained("{out}")
# DiT's timestep frequencies (diffusers' DiT port differs slightly): sample exactly as the trained model
for block in pipe.transformer.transformer_blocks:
    block.norm1.emb.time_proj.downscale_freq_shift = 0
images = pipe(class_labels=[0], guidance_scale={scale:g}, num_inference_steps=50,
              generator=torch.Generator().manual_seed(0)).images
```

Class names map to labels with `pipe.get_label_ids([...])` (`pipe.labels` lists them)."""
    return usage, _diffusers_notes(model, len(betas), settings.get("guidance"))


def run(cfg: DictConfig) -> Path:
    """Export ``cfg.run``'s checkpoint as ``cfg.format`` into ``cfg.out``; returns the export directory."""
    import torch

    from bigdit.model_card import run_manifest, sampler_settings

    fmt = cfg.get("format", "safetensors")
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}; valid: {', '.join(FORMATS)}")
    if fmt == "diffusers" and cfg.raw:
        raise ValueError("raw=true exports the raw weights beside the EMA ones as safetensors; format=diffusers "
                         "holds one transformer (the EMA weights)")
    run_dir = Path(cfg.run)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir}/config.yaml not found: run= must be a bigdit run directory")
    run_cfg = OmegaConf.load(run_dir / "config.yaml")
    model_cfg = OmegaConf.to_container(run_cfg.model, resolve=True)
    _, manifest = run_manifest(run_cfg)
    vae = cfg.get("vae") or (manifest.vae if manifest is not None else None)
    if fmt == "diffusers":  # refused before any checkpoint is read
        from bigdit.diffusers_export import check_exportable
        from bigdit.diffusion import diffusion_kind

        if diffusion_kind(run_cfg.get("diffusion")) == "flow":
            raise ValueError("a flow-matching run (diffusion=flow) has no diffusers DiTPipeline form (its scheduler is "
                             "DDIM on betas): export it with format=safetensors and sample it with tools/sample.py")

        with torch.device("meta"):
            check_exportable(build_model(**model_cfg), model_cfg["name"], vae,
                             manifest.shift_factor if manifest is not None else 0.0)

    ckpt_root = run_dir / "checkpoints"
    ckpt = latest_checkpoint(ckpt_root) if cfg.step is None else ckpt_root / step_tag(cfg.step)
    if ckpt is None or not ckpt.is_dir():
        raise FileNotFoundError(f"no checkpoint {'latest' if cfg.step is None else step_tag(cfg.step)} in {ckpt_root}")
    out = Path(cfg.out) if cfg.out else run_dir / "export" / (ckpt.name + ("-diffusers" if fmt == "diffusers" else ""))
    out.mkdir(parents=True, exist_ok=True)
    defaults = sample_defaults(run_cfg)
    settings, _ = sampler_settings(run_cfg, defaults)
    model = build_model(**model_cfg)
    if fmt == "safetensors":
        usage, notes = export_safetensors(cfg, run_dir, run_cfg, model, ckpt, out, manifest, settings), ""
    else:
        usage, notes = export_diffusers(run_cfg, model, ckpt, out, manifest, vae, settings)
    write_model_card(out, run_dir=run_dir, run_cfg=run_cfg, model=model, ckpt=ckpt, fmt=fmt, sample_defaults=defaults,
                     usage=usage, notes=notes)
    print(f"exported {ckpt} -> {out} ({fmt})")
    return out


@hydra.main(config_path=CONFIG_DIR, config_name="export", version_base=None)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
