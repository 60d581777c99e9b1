"""Exponential moving average of the weights, kept in fp32 next to whatever tensors the strategy owns.

The EMA tracks the tensors handed to it (the full parameters under DDP; a rank's own shard under
sharding strategies), so it never needs the full model gathered to be updated.
"""

from __future__ import annotations

import torch


class EMA:
    """fp32 shadow copies of named tensors, updated as ``ema <- decay * ema + (1 - decay) * value``."""

    def __init__(self, named_tensors: list[tuple[str, torch.Tensor]], decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema.decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.names = [name for name, _ in named_tensors]
        # Starts equal to the weights (DiT copies the model into the EMA before training).
        self.shadow = [t.detach().float().clone() for _, t in named_tensors]

    @torch.no_grad()
    def update(self, tensors: list[torch.Tensor]) -> None:
        """One EMA step towards ``tensors`` (same order as at construction)."""
        values = [t.detach().float() for t in tensors]
        torch._foreach_lerp_(self.shadow, values, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.names) ^ set(state)
        if missing:
            raise KeyError(f"EMA state does not match the model; differing keys: {sorted(missing)[:8]}")
        for name, shadow in zip(self.names, self.shadow):
            shadow.copy_(state[name])
