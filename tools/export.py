#!/usr/bin/env python
"""Export a run's weights: ``python tools/export.py run=runs/x [step=N] [raw=true] [out=DIR]``.

Consolidates the checkpoint of any strategy (DDP, FSDP2, DeepSpeed ZeRO-1/2/3) in one process and writes
``ema.safetensors`` (and ``model.safetensors`` with ``raw=true``) plus ``model_config.json``, loadable by
``build_model(**config)`` + ``load_weights`` and by ``tools/sample.py ckpt=... model=...``; DiT models also
get ``ema.pt``, the official DiT checkpoint format (a plain state dict).
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import bigdit  # noqa: F401
from bigdit.checkpoint import latest_checkpoint, step_tag
from bigdit.export import consolidated_weights
from bigdit.models import build_model

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


@hydra.main(config_path=CONFIG_DIR, config_name="export", version_base=None)
def main(cfg: DictConfig) -> None:
    import torch
    from safetensors.torch import save_file

    run = Path(cfg.run)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run}/config.yaml not found: run= must be a bigdit run directory")
    run_cfg = OmegaConf.load(run / "config.yaml")
    root = run / "checkpoints"
    ckpt = latest_checkpoint(root) if cfg.step is None else root / step_tag(cfg.step)
    if ckpt is None or not ckpt.is_dir():
        raise FileNotFoundError(f"no checkpoint {'latest' if cfg.step is None else step_tag(cfg.step)} in {root}")
    out = Path(cfg.out) if cfg.out else run / "export" / ckpt.name
    out.mkdir(parents=True, exist_ok=True)
    model_cfg = OmegaConf.to_container(run_cfg.model, resolve=True)
    (out / "model_config.json").write_text(json.dumps(model_cfg, indent=2) + "\n")
    for which in ("ema", "model") if cfg.raw else ("ema",):
        weights = consolidated_weights(ckpt, run_cfg.model, which)
        build_model(**model_cfg).load_state_dict(weights, strict=True)  # refuse to write a partial export
        save_file({k: v.contiguous() for k, v in weights.items()}, out / f"{which}.safetensors")
        if which == "ema" and model_cfg["name"].startswith("DiT-"):
            torch.save(weights, out / "ema.pt")
    print(f"exported {ckpt} -> {out}")


if __name__ == "__main__":
    main()
