"""REPA's targets: patch features of a pretrained ViT (DINOv2-B/14 in REPA), computed once, offline, by
``tools/encode_latents.py repa_encoder=...`` and stored beside each image's latents (``repa_feats``).

Preprocessing is REPA's for DINOv2 (``preprocess_raw_image`` in its train.py): pixels to [0, 1], ImageNet
normalisation, then a bicubic resize without antialias to ``224 * resolution // 256`` (16x16 patches of 14
for 256x256 images: the token grid of DiT-XL/2 on 32x32 latents). The features are the patch tokens (class
and register tokens dropped) of block ``layer`` after the final norm; for the last block these are DINOv2's
``x_norm_patchtokens``, what REPA aligns to. REPA resizes the position embedding with timm's
``resample_abs_pos_embed``; here DINOv2's own interpolation is used (:mod:`bigdit.vit`), as for FD-DINOv2.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from bigdit.vit import IMAGENET_MEAN, IMAGENET_STD, load_vit


def default_input_size(resolution: int) -> int:
    """REPA's encoder input side for images of side ``resolution``: 224 per 256 pixels."""
    return 224 * int(resolution) // 256


class PatchFeatures(torch.nn.Module):
    """A timm ViT with REPA's preprocessing: ``forward(pixels in [-1, 1] (N, 3, H, W))`` -> (N, tokens, dim)."""

    def __init__(self, vit: torch.nn.Module, input_size: int, layer: int):
        super().__init__()
        depth = len(vit.blocks)
        index = layer + depth if layer < 0 else layer
        if not 0 <= index < depth:
            raise ValueError(f"repa_layer={layer}: the encoder has blocks 0..{depth - 1} (-1 = the last)")
        patch = vit.patch_embed.patch_size[0]
        if input_size % patch:
            raise ValueError(f"repa_input_size={input_size} is not a multiple of the encoder's patch size {patch}")
        self.vit, self.input_size, self.layer = vit, int(input_size), index
        self.tokens, self.dim = (input_size // patch) ** 2, int(vit.num_features)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.ndim != 4 or pixels.shape[1] not in (1, 3):
            raise ValueError(f"REPA's encoder takes RGB or grayscale images (N, 3 or 1, H, W), got "
                             f"{tuple(pixels.shape)}")
        pixels = pixels.expand(-1, 3, -1, -1)  # grayscale (digits) as the RGB image it is
        x = ((pixels.to(self.mean.device).float() + 1) / 2 - self.mean) / self.std
        x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic")
        return self.vit.get_intermediate_layers(x, n=[self.layer], norm=True)[0].float()

    def record(self, encoder: str, model: str | None) -> dict[str, Any]:
        """What the manifest records about these features (``Manifest.repa``); ``model`` defaults to the
        architecture timm built."""
        model = model or getattr(self.vit, "pretrained_cfg", {}).get("architecture")
        return {"encoder": encoder, "model": model, "input_size": self.input_size, "layer": self.layer,
                "tokens": self.tokens, "dim": self.dim}


def load_patch_encoder(encoder: str, input_size: int, layer: int = -1, model: str | None = None,
                       device: str | torch.device = "cpu", **arch) -> PatchFeatures:
    """REPA's encoder from ``encoder`` (a timm name such as ``vit_base_patch14_dinov2.lvd142m``, a local timm
    folder, or a checkpoint file of the timm architecture ``model``) at ``input_size``; ``arch``: timm
    architecture overrides (tests)."""
    vit = load_vit(encoder, model, input_size, key="repa_encoder",
                   hint="; e.g. repa_encoder=vit_base_patch14_dinov2.lvd142m (DINOv2-B/14, REPA's)", **arch)
    return PatchFeatures(vit, input_size, layer).to(device)
