"""FD-DINOv2 (EDM2's second metric): the Fréchet distance of DINOv2 ViT-L/14 features.

EDM2 (``calculate_metrics.py``, after layer6ai-labs/dgm-eval) runs torch hub's ``dinov2_vitl14`` on uint8
images resized to 224x224 (``F.interpolate(..., mode='bicubic', antialias=True)`` on the 0..255 floats),
scaled to [0, 1] and normalised with the ImageNet mean/std; the feature is the model's output, the CLS token
after the final LayerNorm (1024-d). Statistics are float64 sums as for FID.

The network here is timm's port of that model (``vit_large_patch14_dinov2``) at ``img_size=224``, loaded
from DINOv2's own checkpoint (``dinov2_vitl14_pretrain.pth``, the file torch hub downloads) or timm's. The
checkpoint's 37x37 position embedding is resized to 16x16 once at load time the way DINOv2 does it at every
forward (bicubic, ``scale_factor = (16 + 0.1) / 37``, no antialias), so the features are DINOv2's
(:func:`bigdit.vit.load_vit`, which REPA's encoder pass shares).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bigdit.evaluation.stats import ieee_fp32
from bigdit.vit import IMAGENET_MEAN as MEAN
from bigdit.vit import IMAGENET_STD as STD
from bigdit.vit import load_vit

DEFAULT_MODEL = "vit_large_patch14_dinov2"
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
IMAGE_SIZE = 224


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
    vit = load_vit(weights, model, IMAGE_SIZE, key="dinov2_weights", hint=f"; DINOv2 ViT-L/14: {DINOV2_URL}", **arch)
    return DINOv2(vit, batch_size).to(device)
