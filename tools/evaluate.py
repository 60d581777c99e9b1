#!/usr/bin/env python
"""Evaluate samples as ADM does: ``python tools/evaluate.py samples=<samples.npz> ref=<reference batch.npz>``.

Prints the result as JSON and writes it to ``<samples dir>/eval-<ref name>.json``: ``fid`` (pool_3),
``sfid`` (``mixed_6/conv``), ``is`` (Inception Score, splits of 5,000), ``precision``/``recall`` (k = 3,
reference images against all samples), with ``dinov2_weights=`` also ``fd_dinov2`` (EDM2), and for a
text-to-image batch ``clip_score``. The network is the 2015 TF Inception as torch-fidelity ports it
(``inception_weights=<weights-inception-2015-12-05-6726825d.pth>``). Every input is checked before any
compute. Under ``torchrun --nproc_per_node=N`` each rank scores a slice of the images and the statistics are
all-reduced (the same numbers as one process).

``make_ref=true images=<image folder | WebDataset tars | pixel shard dir | npz> out=<ref.npz>
[resolution=256]`` writes a reference batch in ADM's format from your own images: statistics over all of
them and ``arr_0`` with ``max_images`` (10,000) of them. Keys: configs/evaluate.yaml.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

import bigdit  # noqa: F401  (torchvision shim before open_clip/timm)
from bigdit.engine.base import init_distributed, rank_info_from_env

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def run_text_tower(samples: Path) -> dict[str, Any] | None:
    """The CLIP tower a run's captions were cached with, when ``samples`` sits in ``<run>/samples``."""
    from bigdit.data.schema import Manifest

    run_cfg = samples.parent.parent / "config.yaml"
    if not run_cfg.is_file():
        return None
    root = OmegaConf.load(run_cfg).get("data", {}).get("root")
    if root is None or not (Path(root) / "manifest.json").is_file():
        return None
    text = Manifest.load(root).text
    if not text or not text.get("model"):
        return None
    return {"model": text["model"], "pretrained": text.get("pretrained"), "model_config": text.get("model_config")}


def clip_settings(cfg: DictConfig) -> dict[str, Any] | None:
    """The open_clip model of the CLIP score, or None: off, or (``clip=auto``) no prompts or no tower."""
    from bigdit.evaluation.reference import npz_keys
    from bigdit.evaluation.runner import prompt_list

    if str(cfg.clip).lower() == "false":
        return None
    if cfg.clip_model:
        return {"model": cfg.clip_model, "pretrained": cfg.clip_pretrained, "model_config": cfg.clip_model_config}
    samples = Path(cfg.samples)
    if not samples.is_file():
        return None  # evaluate() says what is wrong
    has_prompts = bool({"prompts", "captions"} & set(npz_keys(samples))) or prompt_list(samples)[0] is not None
    return run_text_tower(samples) if has_prompts else None


def device_for(cfg: DictConfig):
    """This process's device; under torchrun/srun also joins the process group (gloo on CPU, nccl on GPU)."""
    from bigdit.inference import resolve_device

    info = rank_info_from_env()
    if info.world_size > 1:
        return init_distributed(info, timeout_s=float(cfg.timeout_s))
    return resolve_device(cfg.device)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate (or make a reference batch); the result on every rank."""
    from bigdit.evaluation.runner import evaluate, make_reference

    device = device_for(cfg)
    common = {"inception_weights": cfg.inception_weights, "device": device, "batch_size": int(cfg.batch_size),
              "dinov2_weights": cfg.dinov2_weights, "dinov2_model": cfg.dinov2_model, "progress": bool(cfg.progress)}
    arch = cfg.dinov2_arch
    if arch:
        common["dinov2_arch"] = OmegaConf.to_container(arch, resolve=True)
    if cfg.make_ref:
        if not cfg.images or not cfg.out:
            raise ValueError("make_ref=true needs images=<image folder, tars, pixel shard dir or npz> and "
                             "out=<reference .npz to write>")
        return make_reference(str(cfg.images), cfg.out, resolution=cfg.resolution, max_images=int(cfg.max_images),
                              seed=int(cfg.seed), num_workers=int(cfg.num_workers), **common)
    if not cfg.samples or not cfg.ref:
        raise ValueError("give samples=<samples .npz> and ref=<ADM reference batch .npz> "
                         "(or make_ref=true images=... out=... to make a reference batch)")
    return evaluate(cfg.samples, cfg.ref, num_samples=int(cfg.num_samples), is_split_size=int(cfg.is_split_size),
                    pr_k=int(cfg.pr_k), clip=clip_settings(cfg), out=cfg.out, cache=bool(cfg.cache),
                    fid_method=cfg.fid_method, **common)


@hydra.main(config_path=CONFIG_DIR, config_name="evaluate", version_base=None)
def main(cfg: DictConfig) -> None:
    import torch.distributed as dist

    try:
        result = run(cfg)
        if rank_info_from_env().is_main:
            print(json.dumps(result, indent=1))
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
