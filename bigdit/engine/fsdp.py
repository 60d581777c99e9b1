"""Fully sharded data parallelism with torch FSDP2 (``fully_shard``): full shard or hybrid shard (HSDP).

Each repeated block the model declares (``model.repeated_blocks()``) becomes its own FSDP unit, then the
root. Parameters, gradients, optimizer state and the EMA are sharded over the ``shard`` mesh dimension.
Owns its checkpoint format, writing and offline consolidation alike: a torch distributed checkpoint
(DCP: ``.metadata`` plus one shard file per rank) holding ``model``, ``optimizer`` and ``ema``, and
``extra.pt`` from rank 0. Every rank writes its own shards; loading reshards to whatever world size the
resumed job has, and :meth:`FSDP2Strategy.consolidate` reads them back whole in a single process.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from bigdit.engine.base import OptimizerFactory, Strategy

EXTRA_FILE = "extra.pt"


class FSDP2Strategy(Strategy):
    """FSDP2 over a 1-D mesh (full shard) or a 2-D ``(replicate, shard)`` mesh (hybrid shard).

    ``shard_size``: ranks per shard group for hybrid sharding (e.g. GPUs per node); ``None`` shards over
    the whole world. With ``precision="bf16"`` parameters are cast to bf16 for compute, gradients are
    reduced in fp32 unless ``fp32_reduce=False``, and master weights stay fp32.
    """

    name = "fsdp2"
    needs_process_group = True
    shards_grads = shards_optimizer = True

    def __init__(self, info, device, precision: str = "fp32", shard_size: int | None = None,
                 reshard_after_forward: bool = True, fp32_reduce: bool = True):
        super().__init__(info, device, precision)
        world = info.world_size
        if shard_size is not None and (shard_size < 1 or world % shard_size):
            raise ValueError(f"strategy.shard_size={shard_size} must divide the world size {world}")
        if shard_size is None or shard_size == world:
            self.mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
        else:
            self.mesh = init_device_mesh(device.type, (world // shard_size, shard_size),
                                         mesh_dim_names=("replicate", "shard"))
        self.mp_policy = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16 if precision == "bf16" else None,
            reduce_dtype=torch.float32 if fp32_reduce else None,
        )
        self.reshard_after_forward = reshard_after_forward
        self.shard_size = shard_size

    def checkpoint_meta(self) -> dict[str, Any]:
        return {**super().checkpoint_meta(), "shard_size": self.shard_size}

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory, plan=None, grad_clip=None) -> None:
        model = model.to(self.device)
        for block in model.repeated_blocks():
            fully_shard(block, mesh=self.mesh, mp_policy=self.mp_policy, reshard_after_forward=self.reshard_after_forward)
        fully_shard(model, mesh=self.mesh, mp_policy=self.mp_policy, reshard_after_forward=self.reshard_after_forward)
        self.module = self.model = model
        self.optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad])

    def no_sync(self, enabled: bool):
        # FSDP2 keeps accumulating unsharded gradients locally while sync is off; the last micro-batch
        # reduce-scatters the sum. Re-enabled on every call so the flag never leaks into the next step.
        self.model.set_requires_gradient_sync(not enabled)
        return super().no_sync(enabled)

    def ema_targets(self) -> list[tuple[str, torch.Tensor]]:
        return [(n, p.detach().to_local()) for n, p in self.module.named_parameters()]

    def _as_dtensors(self, local: dict[str, torch.Tensor]) -> dict[str, DTensor]:
        """Wrap this rank's EMA shards with the layout of the parameters they track (no copy)."""
        out = {}
        for name, p in self.module.named_parameters():
            out[name] = DTensor.from_local(local[name], p.device_mesh, p.placements, run_check=False,
                                           shape=p.shape, stride=p.stride())
        return out

    def save(self, directory: Path, extra: dict[str, Any], ema: dict[str, torch.Tensor]) -> None:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_sd, "optimizer": optim_sd, "ema": self._as_dtensors(ema)}, checkpoint_id=directory)
        if self.is_main:
            torch.save(extra, directory / EXTRA_FILE)
        self.barrier()

    def load(self, directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        if not (directory / EXTRA_FILE).is_file() or not (directory / ".metadata").is_file():
            raise FileNotFoundError(f"{directory} is not an FSDP2 checkpoint (no DCP .metadata/{EXTRA_FILE}); "
                                    f"it was written by another strategy: resume with that strategy")
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        ema = self._empty_ema()
        state = {"model": model_sd, "optimizer": optim_sd, "ema": self._as_dtensors(ema)}
        dcp.load(state, checkpoint_id=directory)  # fills the local shards in place, resharding as needed
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        extra = torch.load(directory / EXTRA_FILE, map_location="cpu", weights_only=True)
        return extra, ema

    def _empty_ema(self) -> dict[str, torch.Tensor]:
        return {n: torch.empty_like(t, dtype=torch.float32) for n, t in self.ema_targets()}

    def save_ema(self, directory: Path, ema: dict[str, torch.Tensor]) -> None:
        # A DCP checkpoint holding only "ema": every rank writes its shards, consolidate() reads it like a full one.
        dcp.save({"ema": self._as_dtensors(ema)}, checkpoint_id=directory)
        self.barrier()

    def load_ema(self, directory: Path) -> dict[str, torch.Tensor]:
        if not (directory / ".metadata").is_file():
            raise FileNotFoundError(f"{directory} holds no FSDP2 EMA (no DCP .metadata): it was written by another "
                                    f"strategy; resume with that strategy")
        ema = self._empty_ema()
        dcp.load({"ema": self._as_dtensors(ema)}, checkpoint_id=directory)  # reshards, casts to the fp32 targets
        return ema

    @classmethod
    def consolidate(cls, directory: Path, param_shapes: dict[str, torch.Size],
                    which: str = "ema") -> dict[str, torch.Tensor]:
        # The DCP metadata records every saved tensor's full shape: allocate exactly the ``which`` part on
        # the CPU and let DCP fill it from all ranks' shards, without a process group and without
        # materialising the optimizer state or a temporary full copy.
        saved = dcp.FileSystemReader(directory).read_metadata().state_dict_metadata
        prefix = f"{which}."
        full = {key[len(prefix):]: torch.empty(md.size, dtype=torch.float32) for key, md in saved.items()
                if key.startswith(prefix) and isinstance(md, TensorStorageMetadata)}
        if not full:
            raise FileNotFoundError(f"{directory} holds no {which!r} tensors: not an FSDP2 checkpoint")
        with warnings.catch_warnings():  # DCP warns that it loads in one process, which is the point here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            dcp.load({which: full}, checkpoint_id=directory, no_dist=True)
        return full
