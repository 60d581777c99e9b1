"""Building blocks shared by the backbones, named so that official checkpoints load unchanged.

Parameter names follow the official code (timm's ``Attention``/``Mlp``/``PatchEmbed`` as used by
facebookresearch/DiT): ``qkv``/``proj``, ``fc1``/``fc2``, ``proj`` for the patch convolution. The
cross-attention of our text-conditioned DiT/U-DiT takes PixArt-alpha's names (``q_linear``/``kv_linear``/``proj``).
Single-device PyTorch only: strategies wrap these modules from outside.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of token features ``x`` (N, T, D) by per-sample ``shift``/``scale`` (N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal timestep features [cos | sin] of shape (N, dim), as in DiT/ADM (float32)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """1-D sin-cos embedding [sin | cos] of positions ``pos`` (any shape, flattened), float64 (M, D)."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}")
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding (grid_size**2, embed_dim) in row-major token order.

    The first half of the channels encodes the column index and the second half the row index: the
    official MAE/DiT code builds ``np.meshgrid(grid_w, grid_h)`` and embeds its first plane first.
    Matching that order is what makes official checkpoints (which store the table) agree with a
    recomputed one.
    """
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
    return np.concatenate([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], axis=1)


def check_input(x: torch.Tensor, channels: int, size: int, model: str) -> None:
    """Raise ``ValueError`` unless ``x`` is a batch of ``channels`` x ``size`` x ``size`` inputs (N, C, H, W).

    Every backbone checks before any work: a wrong latent shape would otherwise surface as a cryptic
    reshape or position-embedding broadcast error deep inside the network.
    """
    if x.shape[-2:] != (size, size) or x.shape[1] != channels:
        raise ValueError(f"{model} expects input (N, {channels}, {size}, {size}), got {tuple(x.shape)}")


def patch_grid(input_size: int, patch_size: int) -> int:
    """Patches per side of an ``input_size`` grid; ``ValueError`` unless ``patch_size`` divides it."""
    if input_size % patch_size:
        raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
    return input_size // patch_size


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens with one strided convolution (N, C, H, W) -> (N, T, D).

    The models check the input shape (:func:`check_input`) and the patch grid (:func:`patch_grid`).
    """

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def unpatchify(x: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """(N, T, p*p*C) tokens of a square grid -> (N, C, H, W) images (channels last within a patch, as DiT/U-ViT)."""
    c, p = channels, patch_size
    h = w = int(x.shape[1] ** 0.5)
    x = x.reshape(x.shape[0], h, w, p, p, c)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)


class Attention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention`` (flash/memory-efficient kernels)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    """Two-layer transformer MLP; DiT uses the tanh approximation of GELU.

    ``out_dim`` (default ``dim``) lets it change width, as PixArt-alpha's caption projection
    ``Mlp(context_dim, hidden_size, out_dim=hidden_size)`` does.
    """

    def __init__(self, dim: int, hidden: int, approximate: str = "tanh", out_dim: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate=approximate)
        self.fc2 = nn.Linear(hidden, dim if out_dim is None else out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CrossAttention(nn.Module):
    """Multi-head cross-attention: queries from tokens ``x`` (N, T, D), keys/values from ``context`` (N, S, D).

    PixArt-alpha's ``MultiHeadCrossAttention`` (same ``q_linear``/``kv_linear``/``proj`` layout, no mask:
    every caption has the same number of tokens) through ``scaled_dot_product_attention``. The context
    must already be projected to ``dim``. Models zero-initialise ``proj`` so that a new text model starts
    as its time-only counterpart.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv_linear = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        heads = self.num_heads
        q = self.q_linear(x).view(n, t, heads, d // heads).transpose(1, 2)
        k, v = self.kv_linear(context).view(n, context.shape[1], 2, heads, d // heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))


def init_text_conditioning(caption_embedders: list[Mlp], cross_attentions: list[CrossAttention]) -> None:
    """PixArt-alpha's initialisation of the text path, applied after a model's generic init.

    N(0, 0.02) caption-projection weights, and zero cross-attention output projections: at init no
    block's output depends on the context, so a new text model computes its time-only counterpart.
    """
    for embedder in caption_embedders:
        nn.init.normal_(embedder.fc1.weight, std=0.02)
        nn.init.normal_(embedder.fc2.weight, std=0.02)
    for attn in cross_attentions:
        nn.init.zeros_(attn.proj.weight)
        nn.init.zeros_(attn.proj.bias)


def cross_attention_macs(queries: int, context: int, width: int) -> int:
    """Multiply-adds of a :class:`CrossAttention` of ``queries`` tokens to ``context`` tokens at ``width``."""
    projections = 2 * queries * width * width + 2 * context * width * width  # q and output; k and v
    return projections + 2 * queries * context * width  # scores and values


def caption_embedder_macs(tokens: int, context_dim: int, width: int) -> int:
    """Multiply-adds of a caption embedder ``Mlp(context_dim, width, out_dim=width)`` over ``tokens`` tokens."""
    return tokens * (context_dim * width + width * width)


def check_text_form(context_dim: int | None, num_classes: int | None, model: str) -> None:
    """A text-conditioned backbone (``context_dim`` set) takes CLIP tokens as ``y`` and no class labels."""
    if context_dim is not None and num_classes:
        raise ValueError(f"the text-conditioned {model} (context_dim={context_dim}) has no class labels; pass "
                         f"num_classes=0")


def check_context(y: torch.Tensor | None, batch: int, tokens: int, dim: int, model: str) -> torch.Tensor:
    """Return ``y`` if it is a batch of CLIP token embeddings (batch, tokens, dim), else raise ``ValueError``."""
    if y is None or tuple(y.shape) != (batch, tokens, dim):
        got = None if y is None else tuple(y.shape)
        raise ValueError(f"text-conditioned {model} expects y (N, {tokens}, {dim}) with N={batch}, got {got}")
    return y


class TimestepEmbedder(nn.Module):
    """Scalar diffusion timesteps -> vectors: frequency features then a two-layer SiLU MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype)
        return self.mlp(freq)


def drop_labels(labels: torch.Tensor, null_label: int, dropout_prob: float,
                force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Replace dropped labels by ``null_label``: those marked 1 in ``force_drop_ids``, else a random share."""
    if force_drop_ids is None:
        drop = torch.rand(labels.shape[0], device=labels.device) < dropout_prob
    else:
        drop = force_drop_ids == 1
    return torch.where(drop, torch.full_like(labels, null_label), labels)


class LabelEmbedder(nn.Module):
    """Class labels -> vectors, with label dropout for classifier-free guidance.

    The table has one extra row (index ``num_classes``) for the null label when dropout is enabled.
    ``force_drop_ids`` (N,) selects which labels to drop instead of random draws; training loops pass it
    so that dropout is reproducible and independent of how the batch is split across ranks.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replace dropped labels by the null label ``num_classes``."""
        return drop_labels(labels, self.num_classes, self.dropout_prob, force_drop_ids)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)
