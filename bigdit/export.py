"""Consolidate a training checkpoint of any strategy into full weights, offline and in one process.

Formats: ``state.pt`` (DDP), torch distributed checkpoints (FSDP2: ``.metadata`` + shards) and DeepSpeed
directories (``ema.pt`` under ZeRO-1/2, one ``ema_rank*.pt`` partition file per rank under ZeRO-3).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig

from bigdit.models import build_model


def _param_shapes(model_cfg: DictConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = build_model(**model_cfg)
    return {n: p.shape for n, p in model.named_parameters()}


def consolidate_zero3_partitions(ckpt_dir: Path, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Reassemble ZeRO-3 EMA partitions: each parameter is flattened, padded to a multiple of the world
    size and split evenly, rank r holding the r-th slice (DeepSpeed's ``ds_tensor`` layout)."""
    files = sorted(Path(ckpt_dir).glob("ema_rank*.pt"))
    parts = [torch.load(f, map_location="cpu", weights_only=False) for f in files]
    world = parts[0]["world_size"] if parts else 0
    if not parts or len(parts) != world:
        raise FileNotFoundError(f"{ckpt_dir} holds {len(parts)} ZeRO-3 EMA partition files for {world} ranks")
    out = {}
    for name, shape in shapes.items():
        flat = torch.cat([p["ema"][name].reshape(-1).float().cpu() for p in parts])
        out[name] = flat[: shape.numel()].view(shape).clone()
    return out


def _dcp_state(ckpt_dir: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "full.pt"
        dcp_to_torch_save(ckpt_dir, path)
        return torch.load(path, map_location="cpu", weights_only=False)


def consolidated_weights(ckpt_dir: str | Path, model_cfg: DictConfig, which: str = "ema") -> dict[str, torch.Tensor]:
    """Full (unsharded) fp32 ``ema`` or ``model`` weights from the checkpoint directory ``ckpt_dir``."""
    ckpt_dir = Path(ckpt_dir)
    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
    if (ckpt_dir / "state.pt").is_file():
        return dict(torch.load(ckpt_dir / "state.pt", map_location="cpu", weights_only=False)[which])
    if (ckpt_dir / ".metadata").is_file():
        return {k: v.float() for k, v in _dcp_state(ckpt_dir)[which].items()}
    if (ckpt_dir / "deepspeed").is_dir():
        if which == "model":
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            return dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag="deepspeed"))
        if (ckpt_dir / "ema.pt").is_file():
            return dict(torch.load(ckpt_dir / "ema.pt", map_location="cpu", weights_only=False)["ema"])
        return consolidate_zero3_partitions(ckpt_dir, _param_shapes(model_cfg))
    raise FileNotFoundError(f"{ckpt_dir} is not a bigdit checkpoint (no state.pt, DCP .metadata or deepspeed/)")
