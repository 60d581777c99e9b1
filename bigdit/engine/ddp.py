"""Data parallelism with torch DDP (one process per device; a single process is the world-size-1 case).

Owns its checkpoint format, writing and offline consolidation alike: rank 0 writes one ``state.pt``
holding the full model, optimizer and EMA state dicts plus ``extra`` (replicas are identical).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bigdit.engine.base import OptimizerFactory, Strategy

STATE_FILE = "state.pt"


class DDPStrategy(Strategy):
    """Full replicas on every rank, gradients averaged by DDP's bucketed all-reduce.

    Replicas are identical, so rank 0 alone writes the checkpoint and every rank reads it back, which
    also makes resuming with a different number of ranks trivial.
    """

    name = "ddp"

    def __init__(self, info, device, precision: str = "fp32", find_unused_parameters: bool = False,
                 bucket_cap_mb: int = 25):
        # bf16 is autocast in the loop; DDP keeps fp32 weights and all-reduces fp32 gradients.
        super().__init__(info, device, precision)
        self.find_unused_parameters = find_unused_parameters
        self.bucket_cap_mb = bucket_cap_mb

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory, plan=None, grad_clip=None) -> None:
        self.module = model.to(self.device)
        if self.info.world_size > 1:
            self.model = DistributedDataParallel(
                self.module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.find_unused_parameters,
                bucket_cap_mb=self.bucket_cap_mb,
            )
        else:
            self.model = self.module
        self.optimizer = make_optimizer([p for p in self.module.parameters() if p.requires_grad])

    def no_sync(self, enabled: bool):
        if enabled and isinstance(self.model, DistributedDataParallel):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def save(self, directory: Path, extra: dict[str, Any], ema: dict[str, torch.Tensor]) -> None:
        if self.is_main:
            state = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(), "ema": ema, **extra}
            torch.save(state, directory / STATE_FILE)
        self.barrier()

    def load(self, directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        state = _read_state(directory, self.device)
        self.module.load_state_dict(state.pop("model"), strict=True)
        self.optimizer.load_state_dict(state.pop("optimizer"))
        return state, state.pop("ema")

    def save_ema(self, directory: Path, ema: dict[str, torch.Tensor]) -> None:
        # Replicas are identical: rank 0's file is the whole EMA, readable by consolidate() as a state.pt.
        if self.is_main:
            torch.save({"ema": ema}, directory / STATE_FILE)
        self.barrier()

    def load_ema(self, directory: Path) -> dict[str, torch.Tensor]:
        return {n: t.float() for n, t in _read_state(directory, self.device)["ema"].items()}

    @classmethod
    def consolidate(cls, directory: Path, param_shapes: dict[str, torch.Size],
                    which: str = "ema") -> dict[str, torch.Tensor]:
        # state.pt already holds the full weights; the shapes are not needed.
        return dict(_read_state(directory, "cpu")[which])


def _read_state(directory: Path, device: torch.device | str) -> dict[str, Any]:
    """The whole ``state.pt`` of ``directory`` on ``device`` (tensors and plain containers only)."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {directory} was not written by strategy=ddp")
    return torch.load(path, map_location=device, weights_only=True)
