"""DeepSpeed ZeRO stages 1, 2 and 3 (optional optimizer/parameter offload, bf16) behind the same interface.

Launched without DeepSpeed's launcher: ranks come from the environment (torchrun, srun, submitit) and
the process group that :func:`bigdit.engine.init_distributed` opened is reused. Under ZeRO-3 each rank
keeps the EMA of its own parameter partitions (``param.ds_tensor``), so the EMA is never gathered to be
updated; ZeRO-1/2 replicate parameters, so the EMA is replicated like them.

Owns its checkpoint format, writing and offline consolidation alike: DeepSpeed's own checkpoint under
``deepspeed/`` (model and ZeRO optimizer partitions; ``deepspeed_universal/`` is added when resuming on
another number of ranks), the EMA as ``ema.pt`` from rank 0 under ZeRO-1/2 or one ``ema_rank{r:05d}.pt``
partition file per rank under ZeRO-3 (each recording the world size and stage it was saved with), and
``extra.pt`` from rank 0.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bigdit.batching import BatchPlan
from bigdit.engine.base import OptimizerFactory, Strategy

EXTRA_FILE = "extra.pt"
EMA_FILE = "ema.pt"  # ZeRO-1/2: the replicated EMA, from rank 0
TAG = "deepspeed"
UNIVERSAL_TAG = "deepspeed_universal"


def _zero3_ema_file(rank: int) -> str:
    return f"ema_rank{rank:05d}.pt"


def _zero3_full_ema(directory: Path, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Reassemble ZeRO-3 EMA partitions into full fp32 tensors: each parameter is flattened, padded to a
    multiple of the world size and split evenly, rank r holding the r-th slice (DeepSpeed's ``ds_tensor``
    layout)."""
    files = sorted(Path(directory).glob("ema_rank*.pt"))
    parts = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    world = parts[0]["world_size"] if parts else 0
    if not parts or len(parts) != world:
        raise FileNotFoundError(f"{directory} holds {len(parts)} ZeRO-3 EMA partition files for {world} ranks")
    out = {}
    for name, shape in shapes.items():
        flat = torch.cat([p["ema"][name].reshape(-1).float().cpu() for p in parts])
        out[name] = flat[: shape.numel()].view(shape).clone()
    return out


def _disable_cpu_shm_comm_build() -> None:
    """Skip DeepSpeed's shared-memory comm op on CPU.

    DeepSpeed compiles it at every fresh ``init_distributed`` on CPU: minutes on a small machine, and an
    interrupted build leaves a lock that hangs later runs. gloo does the collectives without it.
    """
    import importlib

    # importlib, not `import deepspeed.comm.torch as m`: deepspeed.comm re-exports the real torch as an
    # attribute named `torch`, which that import statement would resolve to instead of the submodule.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


class DeepSpeedStrategy(Strategy):
    """``deepspeed.initialize`` with a ZeRO config built from bigdit's run and strategy keys."""

    name = "deepspeed"
    needs_process_group = True

    def __init__(self, info, device, precision: str = "fp32", zero_stage: int = 2, offload_optimizer: bool = False,
                 offload_params: bool = False, overlap_comm: bool = False, extra_config: dict | None = None):
        super().__init__(info, device, precision)
        if zero_stage not in (1, 2, 3):
            raise ValueError(f"strategy.zero_stage must be 1, 2 or 3, got {zero_stage}")
        if offload_params and zero_stage != 3:
            raise ValueError("strategy.offload_params needs strategy.zero_stage=3 (only ZeRO-3 partitions parameters)")
        self.zero_stage = zero_stage
        self.shards_optimizer = True
        self.shards_grads = zero_stage >= 2
        self.offload_optimizer = offload_optimizer
        self.offload_params = offload_params
        self.overlap_comm = overlap_comm
        self.extra_config = dict(extra_config or {})
        self.engine = None

    def ds_config(self, plan: BatchPlan, grad_clip: float | None) -> dict[str, Any]:
        """The DeepSpeed JSON config for this run."""
        zero: dict[str, Any] = {"stage": self.zero_stage, "overlap_comm": self.overlap_comm,
                                "contiguous_gradients": True}
        if self.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": self.device.type == "cuda"}
        if self.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": self.device.type == "cuda"}
        config = {
            "train_batch_size": plan.global_batch,
            "train_micro_batch_size_per_gpu": plan.micro_batch,
            "gradient_accumulation_steps": plan.accum_steps,
            "gradient_clipping": float(grad_clip or 0.0),
            "zero_optimization": zero,
            "bf16": {"enabled": self.precision == "bf16"},
            # bigdit's AdamW is a client optimizer; DeepSpeed only vouches for its own by default.
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        config.update(self.extra_config)
        return config

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory, plan: BatchPlan | None = None,
              grad_clip: float | None = None) -> None:
        if plan is None:
            raise ValueError("DeepSpeedStrategy.setup needs the BatchPlan (its config fixes the batch layout)")
        if self.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            _disable_cpu_shm_comm_build()
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo",
                                   auto_mpi_discovery=False)
        model = model.to(self.device)
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad])
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config(plan, grad_clip))
        self.model = self.engine
        self.module = self.engine.module

    def no_sync(self, enabled: bool):
        return contextlib.nullcontext()  # DeepSpeed defers reduction to the accumulation boundary itself

    def backward(self, loss: torch.Tensor) -> None:
        # The loop already divides by the accumulation steps.
        self.engine.backward(loss, scale_wrt_gas=False)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # only advances DeepSpeed's micro-step counter

    def optimizer_step(self, max_norm: float | None, skip_nonfinite: bool = True) -> tuple[torch.Tensor, bool]:
        # Clipping is configured in ds_config (gradient_clipping) and applied inside step(). ZeRO skips an update
        # whose global gradient norm is inf/NaN itself (its overflow check, the same on every rank), whatever
        # skip_nonfinite says; was_step_applied() reports it as a Python bool it already holds.
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if torch.is_tensor(norm):  # ZeRO keeps it on the device: no float() here, the loop reads it at log steps
            norm = norm.detach().reshape(()).float()
        else:
            norm = torch.tensor(float("nan") if norm is None else norm, device=self.device)
        return norm, self.engine.was_step_applied()

    def ema_targets(self) -> list[tuple[str, torch.Tensor]]:
        if self.zero_stage == 3:
            return [(n, p.ds_tensor.detach()) for n, p in self.module.named_parameters()]
        return super().ema_targets()

    def _ema_file(self) -> str:
        return _zero3_ema_file(self.info.rank) if self.zero_stage == 3 else EMA_FILE

    #: ZeRO-1 and ZeRO-2 write the same files, so only the recorded stage tells them apart
    resume_keys = ("name", "zero_stage")

    def checkpoint_meta(self) -> dict[str, Any]:
        return {**super().checkpoint_meta(), "zero_stage": self.zero_stage}

    def save(self, directory: Path, extra: dict[str, Any], ema: dict[str, torch.Tensor]) -> None:
        self.engine.save_checkpoint(str(directory), tag=TAG)
        self.save_ema(directory, ema)
        if self.is_main:
            torch.save(extra, directory / EXTRA_FILE)
        self.barrier()

    def save_ema(self, directory: Path, ema: dict[str, torch.Tensor]) -> None:
        if self.zero_stage == 3 or self.is_main:
            torch.save({"world_size": self.info.world_size, "zero_stage": self.zero_stage, "ema": ema},
                       directory / self._ema_file())
        self.barrier()

    def _saved_world(self, directory: Path) -> int:
        """The world size ``directory``'s EMA was saved with (rank 0's EMA file exists whatever it was)."""
        first = directory / (_zero3_ema_file(0) if self.zero_stage == 3 else EMA_FILE)
        if not first.is_file():
            raise FileNotFoundError(f"{first} is missing: the checkpoint was written with another ZeRO stage; "
                                    f"resume with the original strategy.zero_stage")
        return torch.load(first, map_location="cpu", weights_only=True)["world_size"]

    def load_ema(self, directory: Path) -> dict[str, torch.Tensor]:
        if self._saved_world(directory) != self.info.world_size and self.zero_stage == 3:
            return self._repartition_ema(directory)
        ema = torch.load(directory / self._ema_file(), map_location=self.device, weights_only=True)["ema"]
        return {n: t.float() for n, t in ema.items()}

    def load(self, directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        if not (directory / TAG).is_dir() or not (directory / EXTRA_FILE).is_file():
            raise FileNotFoundError(f"{directory} is not a DeepSpeed checkpoint (no {TAG}/ or {EXTRA_FILE}); "
                                    f"it was written by another strategy: resume with that strategy")
        tag = TAG
        if self._saved_world(directory) != self.info.world_size:
            tag = self._to_universal(directory)
        ema = self.load_ema(directory)
        load_path, _ = self.engine.load_checkpoint(str(directory), tag=tag)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load {directory / tag}")
        return torch.load(directory / EXTRA_FILE, map_location="cpu", weights_only=True), ema

    def _to_universal(self, directory: Path) -> str:
        """Convert the checkpoint to DeepSpeed's universal format (once, atomically, by rank 0) and switch
        the engine to loading it: the way ZeRO state moves to another number of ranks."""
        if self.is_main and not (directory / UNIVERSAL_TAG).is_dir():
            import shutil
            import sys

            from deepspeed.checkpoint import ds_to_universal

            tmp = directory / f".tmp-{UNIVERSAL_TAG}"
            shutil.rmtree(tmp, ignore_errors=True)
            argv, sys.argv = sys.argv, ["ds_to_universal", "--input_folder", str(directory / TAG), "--output_folder",
                                        str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1",
                                        "--inject_missing_state"]
            try:
                ds_to_universal.main(ds_to_universal.parse_arguments())
            finally:
                sys.argv = argv
            os.replace(tmp, directory / UNIVERSAL_TAG)
        self.barrier()
        self.engine._config.load_universal_checkpoint = True
        return UNIVERSAL_TAG

    def _repartition_ema(self, directory: Path) -> dict[str, torch.Tensor]:
        """This rank's ZeRO-3 EMA partitions for the current world size, from the saved ones."""
        full = _zero3_full_ema(directory, {n: p.ds_shape for n, p in self.module.named_parameters()})
        out = {}
        for name, p in self.module.named_parameters():
            part = p.ds_tensor.numel()
            flat = torch.zeros(part * self.info.world_size, dtype=torch.float32)
            flat[: full[name].numel()] = full[name].reshape(-1)
            out[name] = flat[self.info.rank * part : (self.info.rank + 1) * part].to(self.device)
        return out

    @classmethod
    def consolidate(cls, directory: Path, param_shapes: dict[str, torch.Size],
                    which: str = "ema") -> dict[str, torch.Tensor]:
        directory = Path(directory)
        has_ema = (directory / EMA_FILE).is_file() or (directory / _zero3_ema_file(0)).is_file()
        if not (directory / TAG).is_dir() and not (which == "ema" and has_ema):  # save_ema directories hold EMA only
            raise FileNotFoundError(f"{directory} is not a DeepSpeed checkpoint (no {TAG}/)")
        if which == "model":
            # DeepSpeed's own offline merge of the fp32 master weights from the ZeRO partitions (any stage).
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            return dict(get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=TAG))
        if (directory / EMA_FILE).is_file():  # ZeRO-1/2: replicated, rank 0's copy is the whole EMA
            return dict(torch.load(directory / EMA_FILE, map_location="cpu", weights_only=True)["ema"])
        return _zero3_full_ema(directory, param_shapes)
