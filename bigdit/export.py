"""Consolidate a training checkpoint of any strategy into full weights, offline and in one process.

The checkpoint names the strategy that wrote it (:func:`bigdit.checkpoint.checkpoint_strategy`), and that
strategy's ``consolidate`` reads its own format back; this module only supplies the model's parameter
shapes, built on the meta device (no memory, no weights initialised).
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from bigdit.checkpoint import checkpoint_strategy
from bigdit.engine import strategy_class
from bigdit.models import build_model
from bigdit.repa import PROJECTOR


def param_shapes(model_cfg: DictConfig) -> dict[str, torch.Size]:
    """Parameter name -> shape of the model ``model_cfg`` describes."""
    with torch.device("meta"):
        model = build_model(**model_cfg)
    return {n: p.shape for n, p in model.named_parameters()}


def consolidated_weights(ckpt_dir: str | Path, model_cfg: DictConfig, which: str = "ema") -> dict[str, torch.Tensor]:
    """Full (unsharded) fp32 ``ema`` or ``model`` weights of the model ``model_cfg`` from the checkpoint directory
    ``ckpt_dir``; training-only modules (REPA's projector, :data:`bigdit.repa.PROJECTOR`) are dropped."""
    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
    ckpt_dir = Path(ckpt_dir)
    strategy = strategy_class(checkpoint_strategy(ckpt_dir)["name"])
    weights = strategy.consolidate(ckpt_dir, param_shapes(model_cfg), which)
    return {k: v for k, v in weights.items() if not k.startswith(f"{PROJECTOR}.")}
