"""Exponential moving average of the weights, kept in fp32 next to whatever tensors the strategy owns.

The EMA tracks the tensors handed to it (the full parameters under DDP; a rank's own shard under
sharding strategies), so it never needs the full model gathered to be updated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_into(self, tensors: list[torch.Tensor]) -> Iterator[None]:
        """Within the block the live ``tensors`` (same order as at construction: the strategy's own shards,
        which its forward uses) hold the EMA weights; afterwards they hold exactly what they held before.

        Same-dtype tensors (fp32 weights, the default) are swapped with the shadows one tensor at a time, so
        no copy of the model is made; bf16 compute weights keep a bf16 backup instead (a swap through bf16 would
        round the fp32 EMA). Exact both ways: evaluation never changes the training trajectory.
        """
        def swap(t: torch.Tensor, e: torch.Tensor) -> None:
            tmp = t.clone()
            t.copy_(e)
            e.copy_(tmp)

        backups = []
        for t, e in zip(tensors, self.shadow):
            backups.append(None if t.dtype == e.dtype else t.clone())
            if backups[-1] is None:
                swap(t, e)
            else:
                t.copy_(e)
        try:
            yield
        finally:
            for t, e, backup in zip(tensors, self.shadow, backups):
                if backup is None:
                    swap(t, e)
                else:
                    t.copy_(backup)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.names) ^ set(state)
        if missing:
            raise KeyError(f"EMA state does not match the model; differing keys: {sorted(missing)[:8]}")
        for name, shadow in zip(self.names, self.shadow):
            shadow.copy_(state[name])
