"""FD-DINOv2 (EDM2's second metric): the Fréchet distance of DINOv2 ViT-L/14 features.

EDM2 (``calculate_metrics.py``, after layer6ai-labs/dgm-eval) runs torch hub's ``dinov2_vitl14`` on uint8
images resized to 224x224 (``F.interpolate(..., mode='bicubic', antialias=True)`` on the 0..255 floats),
scaled to [0, 1] and normalised with the ImageNet mean/std; the feature is the model's output, the CLS token
after the final LayerNorm (1024-d). Statistics are float64 sums as for FID.

The network here is timm's port of that model (``vit_large_patch14_dinov2``) at ``img_size=224``, loaded
from DINOv2's own checkpoint (``dinov2_vitl14_pretrain.pth``, the file torch hub downloads) or timm's. The
checkpoint's 37x37 position embedding is resized to 16x16 once at load time the way DINOv2 does it at every
forward (bicubic, ``scale_factor = (16 + 0.1) / 37``, no antialias), so the features are DINOv2's.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bigdit.evaluation.stats import ieee_fp32

DEFAULT_MODEL = "vit_large_patch14_dinov2"
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
IMAGE_SIZE = 224
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
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


class DINOv2(torch.nn.Module):
    """A timm DINOv2 ViT at 224x224 with EDM2's preprocessing; ``features(images)`` -> (N, D) float32."""

    def __init__(self, vit: torch.nn.Module, batch_size: int = 100):
        super().__init__()
        self.vit = vit.eval().requires_grad_(False)
        self.batch_size = int(batch_size)
        self.dim = int(vit.num_features)
        self.register_buffer("mean", torch.tensor(MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).reshape(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @torch.no_grad()
    def features(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 images (N, H, W, 3) -> CLS features after the final norm (N, D), float32 on this device."""
        x = torch.as_tensor(images)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected uint8 images (N, H, W, 3), got {x.dtype} {tuple(x.shape)}")
        out = []
        for batch in x.split(self.batch_size):
            b = batch.to(self.device).permute(0, 3, 1, 2).float()
            b = F.interpolate(b, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic", antialias=True)
            b = (b / 255 - self.mean) / self.std
            with ieee_fp32():
                out.append(self.vit(b).float())
        return torch.cat(out) if out else torch.zeros(0, self.dim, device=self.device)


def load_dinov2(weights: str | Path, model: str = DEFAULT_MODEL, device: str | torch.device = "cpu",
                batch_size: int = 100, **arch) -> DINOv2:
    """DINOv2 from ``weights``: a local checkpoint (DINOv2's ``dinov2_vitl14_pretrain.pth`` or a timm
    ``.safetensors``/``.pth`` of ``model``), or, when no such file exists, a timm pretrained name (e.g.
    ``vit_large_patch14_dinov2.lvd142m``, downloaded). ``arch``: timm architecture overrides (tests)."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    path = Path(str(weights)).expanduser()
    name = str(weights)
    if path.is_file():
        sd = _read_state_dict(path)
    elif path.suffix in (".pth", ".pt", ".safetensors", ".bin") or ("/" in name and not name.startswith("hf-hub:")):
        raise FileNotFoundError(f"dinov2_weights={weights}: no such file (DINOv2 ViT-L/14: {DINOV2_URL})")
    else:
        try:
            sd = timm.create_model(str(weights), pretrained=True, **arch).state_dict()
        except Exception as e:
            raise FileNotFoundError(f"dinov2_weights={weights}: neither a file nor a timm model timm could load "
                                    f"({type(e).__name__}: {e}); download {DINOV2_URL} and pass its path") from e
        model = name.removeprefix("hf-hub:").removeprefix("timm/").split(".")[0]
    vit = timm.create_model(model, pretrained=False, img_size=IMAGE_SIZE, num_classes=0, **arch)
    if "pos_embed" in sd:
        sd = dict(sd, pos_embed=resize_pos_embed(sd["pos_embed"], IMAGE_SIZE // vit.patch_embed.patch_size[0]))
    try:
        vit.load_state_dict(checkpoint_filter_fn(sd, vit), strict=True)
    except RuntimeError as e:
        raise ValueError(f"dinov2_weights={weights} does not fit timm's {model}: {str(e).splitlines()[0]}") from e
    return DINOv2(vit, batch_size).to(device)
