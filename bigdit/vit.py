"""timm ViT encoders loaded from a checkpoint file, a local timm folder or a hub name, at a chosen input size.

The one loader behind FD-DINOv2 (:mod:`bigdit.evaluation.dinov2`) and REPA's patch features
(:mod:`bigdit.repa_features`). A checkpoint trained at one grid (DINOv2: 37x37 patches at 518x518) is used at
another by resizing its position embedding once at load time, the way DINOv2 resizes it at every forward
(bicubic, ``scale_factor = (grid + 0.1) / 37``, no antialias), so the features are the original model's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

#: the ImageNet normalisation DINOv2 (and timm's ViTs) expect on [0, 1] images
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: weight files a local timm folder (``timm.models.push_to_hf_hub``/``save_for_hf`` layout) may hold, in order
FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` or torch checkpoint file (unwrapping ``model``/``state_dict`` entries)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return sd


def resize_pos_embed(pos_embed: torch.Tensor, grid: int, offset: float = 0.1) -> torch.Tensor:
    """DINOv2's ``interpolate_pos_encoding`` for a square ``grid``: (1, P + M*M, D) -> (1, P + grid*grid, D),
    the P in {0, 1} prefix (class token) positions kept as they are."""
    m = math.isqrt(pos_embed.shape[1])
    prefix = pos_embed.shape[1] - m * m
    if prefix not in (0, 1):
        raise ValueError(f"position embedding of {pos_embed.shape[1]} tokens is not a square grid (+ class token)")
    if m == grid:
        return pos_embed
    cls, patch = pos_embed[:, :prefix].float(), pos_embed[:, prefix:].float()
    scale = (grid + offset) / m
    patch = F.interpolate(patch.reshape(1, m, m, -1).permute(0, 3, 1, 2), scale_factor=(scale, scale),
                          mode="bicubic", antialias=False)
    if patch.shape[-2:] != (grid, grid):
        raise ValueError(f"resizing the position embedding gave {tuple(patch.shape[-2:])}, not {grid}x{grid}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)
    return torch.cat([cls, patch], dim=1).to(pos_embed.dtype)


def _folder_weights(folder: Path, key: str) -> tuple[dict[str, torch.Tensor], str, dict]:
    """State dict, architecture and model args of a local timm folder (``config.json`` + weights)."""
    config = folder / "config.json"
    files = [folder / name for name in FOLDER_WEIGHTS if (folder / name).is_file()]
    if not config.is_file() or not files:
        raise FileNotFoundError(f"{key}={folder}: a folder must hold timm's config.json and one of "
                                f"{', '.join(FOLDER_WEIGHTS)} (as timm's save_for_hf writes)")
    meta = json.loads(config.read_text())
    if "architecture" not in meta:
        raise ValueError(f"{key}={folder}: config.json names no 'architecture'")
    return read_state_dict(files[0]), meta["architecture"], dict(meta.get("model_args") or {})


def load_vit(weights: str | Path, model: str | None, img_size: int, key: str = "weights", hint: str = "",
             **arch) -> torch.nn.Module:
    """A timm ViT at ``img_size`` in eval mode without gradients, its weights from ``weights``:

    - a checkpoint file (``.pth``/``.pt``/``.bin``/``.safetensors``) of the architecture ``model``;
    - a local timm folder (``config.json`` naming the architecture and its ``model_args``, plus weights);
    - else a timm pretrained name (e.g. ``vit_base_patch14_dinov2.lvd142m``, downloaded where there is internet).

    ``arch``: timm architecture overrides (tests). ``key`` names the setting in error messages, ``hint`` says
    where to get the weights.
    """
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    path = Path(str(weights)).expanduser()
    name = str(weights)
    if path.is_dir():
        sd, model, folder_args = _folder_weights(path, key)
        arch = {**folder_args, **arch}
    elif path.is_file():
        if model is None:
            raise ValueError(f"{key}={weights} is a checkpoint file: name its timm architecture too")
        sd = read_state_dict(path)
    elif path.suffix in (".pth", ".pt", ".safetensors", ".bin") or ("/" in name and not name.startswith("hf-hub:")):
        raise FileNotFoundError(f"{key}={weights}: no such file or folder{hint}")
    else:
        try:
            sd = timm.create_model(name, pretrained=True, **arch).state_dict()
        except Exception as e:
            raise FileNotFoundError(f"{key}={weights}: neither a file, a folder nor a timm model timm could load "
                                    f"({type(e).__name__}: {e}){hint}") from e
        model = name.removeprefix("hf-hub:").removeprefix("timm/").split(".")[0]
    arch.pop("img_size", None)
    arch.pop("num_classes", None)
    vit = timm.create_model(model, pretrained=False, img_size=img_size, num_classes=0, **arch)
    if "pos_embed" in sd:
        sd = dict(sd, pos_embed=resize_pos_embed(sd["pos_embed"], img_size // vit.patch_embed.patch_size[0]))
    try:
        vit.load_state_dict(checkpoint_filter_fn(sd, vit), strict=True)
    except RuntimeError as e:
        raise ValueError(f"{key}={weights} does not fit timm's {model}: {str(e).splitlines()[0]}") from e
    return vit.eval().requires_grad_(False)
