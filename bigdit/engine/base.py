"""The small interface every distributed strategy implements for the one training loop.

Shaped like Lightning Fabric's Strategy: the model and optimizer are set up together (sharding
strategies must build the optimizer over sharded parameters), and the loop only calls ``backward``,
``optimizer_step`` (which clips, skips non-finite updates and reports the gradient norm), ``no_sync``,
``save``/``load`` and a few collectives.

Each strategy owns its checkpoint format, writing and offline consolidation alike: ``save``/``load``
during training, and the classmethod ``consolidate`` to turn a checkpoint directory back into full
weights in one process, without a process group (export, sampling). The checkpoint records which
strategy wrote it (``checkpoint_meta``, written by :class:`bigdit.checkpoint.Checkpointer`).
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

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


def _single_process_rendezvous() -> None:
    """Environment for a one-rank process group on a free local port (FSDP2/DeepSpeed need a group)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})


def default_group_timeout(timeout_s: float) -> None:
    """Make process groups created without a timeout in this process use ``timeout_s`` (``strategy.timeout_s``).

    torch gives such groups its own default (30 min on gloo, 10 on nccl), not the world group's timeout, and
    DeepSpeed creates its ZeRO data-parallel group that way (``new_group(ranks)``): without this, its gradient
    reduction waits half an hour for a hung rank whatever ``strategy.timeout_s`` says. A training process is
    one rank of one job, so one timeout for all of its groups is what is meant.
    """
    from torch.distributed import distributed_c10d as c10d

    timeout = datetime.timedelta(seconds=float(timeout_s))
    c10d.default_pg_timeout = timeout
    if c10d.default_pg_nccl_timeout is not None:
        c10d.default_pg_nccl_timeout = timeout


def init_distributed(info: RankInfo, timeout_s: float = 600.0, always: bool = False) -> torch.device:
    """Pick the device and join the process group (nccl on GPU, gloo on CPU) when there is more than one
    rank, or ``always`` (strategies built on torch.distributed even for a single process)."""
    if torch.cuda.is_available():
        device = torch.device("cuda", info.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        # Ranks sharing a CPU host split its cores instead of each spawning one thread per core.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.local_world_size))
    if (info.world_size > 1 or always) and not dist.is_initialized():
        default_group_timeout(timeout_s)
        if info.world_size == 1 and "MASTER_ADDR" not in os.environ:
            _single_process_rendezvous()
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            rank=info.rank,
            world_size=info.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    return device


def full_numel(p: torch.Tensor) -> int:
    """Elements of the whole parameter, also when ZeRO-3 has partitioned it away (``ds_numel``)."""
    return getattr(p, "ds_numel", p.numel())


class Strategy(ABC):
    """One distributed training strategy: owns the wrapped model, the optimizer and their checkpoints."""

    #: the ``strategy.name`` config value that selects this class, recorded in its checkpoints
    name: ClassVar[str]
    #: whether the strategy needs a process group even for a single process
    needs_process_group = False

    def __init__(self, info: RankInfo, device: torch.device, precision: str = "fp32"):
        self.info = info
        self.device = device
        self.precision = precision
        self.module: nn.Module | None = None  # the bare model, as built by the model file
        self.model: nn.Module | None = None  # what the loop calls forward on (possibly wrapped)
        self.optimizer: torch.optim.Optimizer | None = None

    @property
    def is_main(self) -> bool:
        return self.info.is_main

    @abstractmethod
    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory, plan: Any = None,
              grad_clip: float | None = None) -> None:
        """Move/wrap/shard ``model`` and build its optimizer over the resulting parameters.

        ``plan`` (the run's :class:`bigdit.batching.BatchPlan`) and ``grad_clip`` are for strategies whose
        engine fixes them at initialisation (DeepSpeed); the others take them per step.
        """

    def no_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """Skip gradient synchronisation for accumulation micro-steps (when ``enabled``)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self, max_norm: float | None, skip_nonfinite: bool = True) -> tuple[torch.Tensor, bool]:
        """Clip gradients to ``max_norm`` (when given), step, zero them; return the global gradient norm before
        clipping as a device tensor, and whether the update was applied.

        ``skip_nonfinite``: when the global norm is inf or NaN (a non-finite loss or gradient on any rank) the
        update is skipped and the gradients dropped. Every rank holds the same global norm, so all ranks skip
        alike. Deciding needs the norm on the host: one readback per step (what Megatron's and DeepSpeed's
        overflow checks do too); without ``skip_nonfinite`` the norm stays on the device.
        """
        params = [p for p in self.module.parameters() if p.grad is not None]
        # With an infinite bound clip_grad_norm_ only measures. Under FSDP2 the norm is a DTensor reduced
        # over the shards; full_tensor() makes it the global value on every rank.
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else math.inf, foreach=True)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        applied = bool(torch.isfinite(norm)) if skip_nonfinite else True
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, applied

    def ema_targets(self) -> list[tuple[str, torch.Tensor]]:
        """Named tensors this rank keeps an EMA of: its own shard of each parameter under sharding
        strategies, the full parameter when parameters are replicated."""
        return [(n, p.detach()) for n, p in self.module.named_parameters()]

    @abstractmethod
    def save(self, directory: Path, extra: dict[str, Any], ema: dict[str, torch.Tensor]) -> None:
        """Write model, optimizer, this rank's ``ema`` tensors (as from :meth:`ema_targets`) and the
        picklable ``extra`` (counters, loader state, config) into ``directory``. Collective."""

    @abstractmethod
    def load(self, directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Restore model and optimizer from ``directory``; return ``extra`` and this rank's EMA tensors,
        resharded to the current world size where the strategy supports it."""

    @abstractmethod
    def save_ema(self, directory: Path, ema: dict[str, torch.Tensor]) -> None:
        """Write only this rank's ``ema`` tensors (as from :meth:`ema_targets`, any dtype) into the existing
        ``directory``, in the strategy's EMA format: :meth:`load_ema` reads them back (resharded) and
        :meth:`consolidate` (``which="ema"``) reads them whole offline. Collective. For the further averages a
        checkpoint keeps (``EMA.extra_states``) and the post-hoc EMA snapshots."""

    @abstractmethod
    def load_ema(self, directory: Path) -> dict[str, torch.Tensor]:
        """This rank's EMA tensors (fp32, on the device) from a :meth:`save_ema` directory, resharded to the
        current world size where the strategy supports it."""

    #: the :meth:`checkpoint_meta` fields a resumed run must share with the checkpoint (the world size may
    #: change where the strategy reshards; the layout may not)
    resume_keys: tuple[str, ...] = ("name",)

    def checkpoint_meta(self) -> dict[str, Any]:
        """What a checkpoint records about the strategy that wrote it (JSON-serialisable): its ``name``,
        which picks the class to consolidate it with, and the layout (world size, precision, ...)."""
        return {"name": self.name, "world_size": self.info.world_size, "precision": self.precision}

    @classmethod
    @abstractmethod
    def consolidate(cls, directory: Path, param_shapes: dict[str, torch.Size],
                    which: str = "ema") -> dict[str, torch.Tensor]:
        """Full (unsharded) fp32 ``ema`` or ``model`` weights from a checkpoint directory this strategy
        wrote, in one process and without a process group; ``param_shapes`` are the model's parameter
        shapes (for formats that do not record them)."""

    #: whether gradients / optimizer state are split over ranks (ZeRO-2/3, FSDP) or replicated (DDP)
    shards_grads = False
    shards_optimizer = False

    def state_bytes(self) -> dict[str, int]:
        """Bytes per rank held for parameters, gradients, AdamW state and EMA (fp32 master state)."""
        local = [(t.numel(), t.element_size()) for _, t in self.ema_targets()]
        trainable = sum(full_numel(p) for p in self.module.parameters() if p.requires_grad)
        world = self.info.world_size
        return {
            "params": int(sum(n * size for n, size in local)),
            "grads": int(trainable * 4 / (world if self.shards_grads else 1)),
            "optimizer": int(trainable * 8 / (world if self.shards_optimizer else 1)),  # AdamW moments, fp32
            "ema": int(sum(n for n, _ in local) * 4),
        }

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.info.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor /= self.info.world_size
        return tensor

    def barrier(self) -> None:
        if self.info.world_size > 1:
            dist.barrier()

    def teardown(self) -> None:
        """Leave the job: every rank at once (rank 0 still plots and closes its loggers when the others get here,
        and destroying a group while a peer is not yet destroying it can hang: pytorch/pytorch#75097)."""
        if dist.is_initialized():
            self.barrier()
            dist.destroy_process_group()
