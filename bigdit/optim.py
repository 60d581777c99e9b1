"""Optimizer construction and the learning-rate schedule (a pure function of the step)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def build_adamw(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float, betas, eps: float,
                fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW; the fused kernel is used on GPU unless ``fused=False``."""
    params = list(params)
    if fused is None:
        fused = bool(params) and params[0].is_cuda
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps, fused=fused)


def lr_at(step: int, lr: float, warmup_steps: int = 0, schedule: str = "constant", total_steps: int = 0,
          min_lr: float = 0.0) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then constant, cosine or linear decay
    (``linear``: ADM's ``anneal_lr``, ``lr * (1 - step / total_steps)`` without warmup)."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr + (lr - min_lr) * (1 - progress)
    raise ValueError(f"unknown lr schedule {schedule!r}; use 'constant', 'cosine' or 'linear'")
