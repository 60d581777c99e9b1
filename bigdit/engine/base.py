"""The small interface every distributed strategy implements for the one training loop.

Shaped like Lightning Fabric's Strategy: the model and optimizer are set up together (sharding
strategies must build the optimizer over sharded parameters), and the loop only calls ``backward``,
``clip_grad_norm``, ``optimizer_step``, ``no_sync``, ``save``/``load`` and a few collectives.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in the job, read from torchrun/srun/submitit environment variables."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def rank_info_from_env() -> RankInfo:
    """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``LOCAL_WORLD_SIZE``; a plain process is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    if world > 1 and not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        raise ValueError(f"WORLD_SIZE={world} but MASTER_ADDR/MASTER_PORT are not set: launch with torchrun or srun")
    return RankInfo(rank, world, local_rank, local_world)


def init_distributed(info: RankInfo, timeout_s: float = 600.0) -> torch.device:
    """Pick the device and, for more than one rank, join the process group (nccl on GPU, gloo on CPU)."""
    if torch.cuda.is_available():
        device = torch.device("cuda", info.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        # Ranks sharing a CPU host split its cores instead of each spawning one thread per core.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.local_world_size))
    if info.world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            rank=info.rank,
            world_size=info.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    return device


class Strategy(ABC):
    """One distributed training strategy: owns the wrapped model, the optimizer and their checkpoints."""

    def __init__(self, info: RankInfo, device: torch.device):
        self.info = info
        self.device = device
        self.module: nn.Module | None = None  # the bare model, as built by the model file
        self.model: nn.Module | None = None  # what the loop calls forward on (possibly wrapped)
        self.optimizer: torch.optim.Optimizer | None = None

    @property
    def is_main(self) -> bool:
        return self.info.is_main

    @abstractmethod
    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> None:
        """Move/wrap/shard ``model`` and build its optimizer over the resulting parameters."""

    def no_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """Skip gradient synchronisation for accumulation micro-steps (when ``enabled``)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    @abstractmethod
    def clip_grad_norm(self, max_norm: float | None) -> torch.Tensor:
        """Global gradient norm (before clipping), clipping to ``max_norm`` when given. No host sync."""

    def optimizer_step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def ema_targets(self) -> list[torch.Tensor]:
        """The parameter tensors this rank keeps an EMA of (its own shard under sharding strategies)."""
        return [p.detach() for p in self.module.parameters()]

    @abstractmethod
    def save(self, directory: Path, extra: dict[str, Any]) -> None:
        """Write model, optimizer and ``extra`` (EMA, counters, config) into ``directory`` (collective)."""

    @abstractmethod
    def load(self, directory: Path) -> dict[str, Any]:
        """Restore model and optimizer from ``directory``; return the ``extra`` saved with them."""

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.info.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor /= self.info.world_size
        return tensor

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.info.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.info.world_size > 1:
            dist.barrier()

    def teardown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.module.parameters()
