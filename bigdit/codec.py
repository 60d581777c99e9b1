"""The latent codec: VAE posterior moments on disk <-> model-space latents, one code path for tools and training.

Encoding (tools/encode_latents.py) stores the VAE's posterior moments (mean, logvar) in float16 rather
than one sampled latent, so training draws a fresh ``z = mean + std * eps`` every epoch as the VAE
intends. Decoding for training samples ``z``, picks the flipped image's moments at random when both are
stored, and maps to model space with ``(z - shift_factor) * scaling_factor`` (diffusers' convention).
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

    def to_vae(self, z: torch.Tensor) -> torch.Tensor:
        """Model space -> the VAE decoder's input space (inverse of the scaling)."""
        return z / self.scaling_factor + self.shift_factor


def pixel_moments(images: torch.Tensor) -> torch.Tensor:
    """``vae=none``: images in [-1, 1] as moments with (near) zero variance, so they decode to themselves."""
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
