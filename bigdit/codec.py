"""The shard codecs: what is on disk <-> model-space inputs, one code path for tools and training.

Encoding (tools/encode_latents.py) stores the VAE's posterior moments (mean, logvar) in float16 rather
than one sampled latent, so training draws a fresh ``z = mean + std * eps`` every epoch as the VAE
intends. Decoding for training samples ``z``, picks the flipped image's moments at random when both are
stored, and maps to model space with ``(z - shift_factor) * scaling_factor`` (diffusers' convention).

Pixel shards (``vae=none``, for pixel-space models such as ADM) store the centre-cropped image itself as uint8
(a quarter of float16 moments' bytes); :class:`PixelCodec` maps it to ``x / 127.5 - 1`` in [-1, 1] and flips it
at random, so no flipped copy is stored.
"""

from __future__ import annotations

import torch

#: diffusers clamps the posterior logvar to this range; the pixel "codec" (vae=none) stores the minimum.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class LatentCodec:
    """Moments -> model-space latents (sampling, flip choice, scaling); a dataset's codec is built from its
    manifest (``bigdit.data.schema.Manifest.codec``)."""

    def __init__(self, scaling_factor: float = 1.0, shift_factor: float = 0.0, use_flip: bool = True):
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = float(shift_factor)
        self.use_flip = use_flip

    def sample(self, moments: torch.Tensor, moments_flip: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Model-space latents (N, C, H, W) float32 from moments (N, 2C, H, W).

        With ``moments_flip`` (and flips enabled), each sample takes the flipped moments with
        probability 1/2. All randomness comes from ``generator``, which callers seed deterministically.
        """
        if moments_flip is not None and self.use_flip:
            pick = torch.rand(moments.shape[0], generator=generator) < 0.5
            moments = torch.where(pick[:, None, None, None], moments_flip, moments)
        c = moments.shape[1] // 2
        # Contiguous float copies and in-place ops: elementwise kernels on channel-sliced views are
        # several times slower on CPU, and this runs in the training process for every micro-batch.
        mean, logvar = moments[:, :c].float(), moments[:, c:].float()
        std = logvar.clamp_(LOGVAR_MIN, LOGVAR_MAX).mul_(0.5).exp_()
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        return torch.addcmul(mean, std, eps).sub_(self.shift_factor).mul_(self.scaling_factor)

    def decode(self, arrays: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """Model-space inputs of a batch of shard arrays (``moments``, optional ``moments_flip``): what loaders call."""
        return self.sample(arrays["moments"], arrays.get("moments_flip"), generator=generator)

    def to_vae(self, z: torch.Tensor) -> torch.Tensor:
        """Model space -> the VAE decoder's input space (inverse of the scaling)."""
        return z / self.scaling_factor + self.shift_factor


class PixelCodec:
    """uint8 pixel shards -> model space: ``x / 127.5 - 1`` in [-1, 1], each image flipped horizontally with
    probability 1/2 when ``use_flip`` (ADM's ``random_flip``), the choice drawn from ``generator``."""

    def __init__(self, use_flip: bool = True):
        self.use_flip = use_flip

    def decode(self, arrays: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (N, C, H, W) float32 in [-1, 1] from the ``pixels`` (N, C, H, W) uint8 of a batch."""
        x = arrays["pixels"].float().div_(127.5).sub_(1.0)
        if self.use_flip:
            pick = torch.rand(x.shape[0], generator=generator) < 0.5
            x = torch.where(pick[:, None, None, None], x.flip(3), x)
        return x


def quantize_pixels(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (as the encoder reads them, ``u / 127.5 - 1`` of uint8 ``u``) back to uint8 ``u``
    exactly: the inverse of :class:`PixelCodec`'s mapping, what pixel shards store."""
    return ((images.float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)


def pixel_moments(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] as moments with (near) zero variance, so they decode to themselves (``vae=none`` on
    ``sklearn:digits``, whose 17 grey levels 0..16 are no 8-bit image)."""
    return torch.cat([images, torch.full_like(images, LOGVAR_MIN)], dim=1).half()


@torch.no_grad()
def vae_moments(vae, images: torch.Tensor) -> torch.Tensor:
    """Posterior moments (mean, logvar) of images in [-1, 1] under a diffusers ``AutoencoderKL``, float16."""
    p = vae.parameters().__next__()
    dist = vae.encode(images.to(p.device, p.dtype)).latent_dist
    return torch.cat([dist.mean, dist.logvar], dim=1).float().cpu().half()


def vae_scaling(vae) -> tuple[float, float]:
    """``(scaling_factor, shift_factor)`` from a diffusers VAE config (shift 0 when it has none)."""
    cfg = vae.config
    shift = getattr(cfg, "shift_factor", None)
    return float(cfg.scaling_factor), float(shift or 0.0)
