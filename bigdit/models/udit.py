"""U-DiT: Downsample Tokens in U-Shaped Diffusion Transformers (Tian et al., 2024).

Same modules, parameter names and shapes as YuchuanTian/U-DiT ``udit_models.py`` in its *training* form
(re-parameterisable FFN), so the official checkpoints load with ``strict=True``. Single-device code:
strategies shard and wrap it from outside.

The network works on the latent grid itself (no patchify: a 3x3 convolution embeds every latent pixel as
a token) and is a three-level U-Net of transformer blocks: encoder 1 (C channels, full resolution),
encoder 2 (2C, 1/2), latent (4C, 1/4), decoder 2 (2C, 1/2), decoder 1 (2C, full). Each level has its own
timestep/label embedders at its width. Inside a block, self-attention is *token-downsampled*: a depthwise
conv (plus shortcut) mixes neighbours, then the grid is split into the four 2x-strided sub-grids, each
sub-grid attends within itself, and the results are interleaved back, so the tensor keeps its size while
attention costs a quarter. Attention is cosine similarity with a learned per-head temperature and a 2-D
rotary position embedding.

Re-parameterisation: the training-form FFN has two stacked 1x1 convs in and out and three parallel
depthwise convs (5x5, 3x3, 1x1) plus identity. All of those are linear, so they merge into a single 1x1 /
5x5-depthwise / 1x1 FFN (the official ``rep=0`` layout). :meth:`UDiT.deploy` returns a *new* merged
model and never touches the training weights; ``eval()``/``train()`` change nothing (the official code
merges in place on every ``eval()``, which corrupts the weights on the second call).

Text-to-image (our extension, not in the U-DiT paper): pass ``context_dim`` (CLIP width) and
``num_classes=0``, e.g. ``build_model("U-DiT-B", context_dim=768, context_tokens=77, num_classes=0)``. As in
DiT's text form (see :mod:`bigdit.models.dit`): no label embedders, adaLN from the timestep alone, and in
each of a block's two sub-blocks an unmodulated cross-attention ``x = x + cross_attn(norm_cross(x), ctx)``
(affine LayerNorm over channels, every pixel a query token) between the downsampled self-attention and the
FFN, its output projection zero-initialised. The levels differ in width, so each level has its own caption
embedder (Linear -> GELU(tanh) -> Linear at that width), like its own timestep embedder. ``y`` is the CLIP
token embeddings (N, context_tokens, context_dim); ``force_drop_ids`` is ignored (the training loop swaps
dropped captions for the empty-prompt embedding). :meth:`UDiT.deploy` only merges FFNs, so it keeps the
cross-attention as is.
"""

from __future__ import annotations

import copy
import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from bigdit.models.layers import (
    CrossAttention,
    LabelEmbedder,
    Mlp,
    TimestepEmbedder,
    apply_qk_norm,
    caption_embedder_macs,
    check_context,
    check_input,
    check_text_form,
    cross_attention_macs,
    init_text_conditioning,
    qk_norms,
)

#: The official clamp on the attention temperature's log (log 100, rounded as the official code has it).
LOGIT_SCALE_MAX = 4.6052


def layer_norm_2d(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over the channels of an (N, C, H, W) map, without affine parameters."""
    return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], eps=eps).permute(0, 3, 1, 2)


def modulate_2d(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of a feature map ``x`` (N, C, H, W) by per-sample ``shift``/``scale`` (N, C)."""
    return x * (1 + scale[:, :, None, None]) + shift[:, :, None, None]


def rope_2d_angles(head_dim: int, rows: int, cols: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (rows*cols, head_dim/2) of U-DiT's 2-D rotary embedding, tokens in row-major order.

    Channel pairs (2j, 2j+1) rotate by ``col * f[j//2]`` for even j and ``row * f[j//2]`` for odd j with
    ``f[i] = 10000^(-4i/head_dim)``: the official code interleaves the x and y frequencies pairwise.
    """
    if head_dim % 4:
        raise ValueError(f"2-D rotary embedding needs a head dimension divisible by 4, got {head_dim}")
    freqs = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 4, device=device)[: head_dim // 4].float() / head_dim)
    pos = torch.arange(rows * cols, device=device)
    x_ang = torch.outer((pos % cols).float(), freqs)
    y_ang = torch.outer((pos // cols).float(), freqs)
    ang = torch.stack([x_ang, y_ang], dim=-1).flatten(1)  # (T, head_dim/2): x0, y0, x1, y1, ...
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs of ``x`` (..., T, D) by the angles in ``cos``/``sin`` (T, D/2).

    Computed in float32 (like the official complex-number version) and cast back.
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).type_as(x)


class TokenDownsampler(nn.Module):
    """Depthwise 5x5 convolution with a shortcut, applied before the grid is split into sub-grids.

    Named ``layer`` inside a ``downsampler`` as in the official checkpoints. Upstream makes kernel and
    shortcut configurable; this is the one form the U-DiT sizes here build.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.layer = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x) + x


class DownsampledAttention(nn.Module):
    """Token-downsampled cosine self-attention on a feature map (N, C, H, W) -> (N, C, H, W).

    The map is split into ``down_factor**2`` strided sub-grids (token (r, c) goes to sub-grid
    (r % f, c % f) at position (r // f, c // f)); each attends only within itself, then outputs go back
    to their pixels. Logits are cos(q, k) * exp(min(logit_scale, log 100)) per head; we fold the
    temperature into q and call ``scaled_dot_product_attention`` with ``scale=1``.

    ``qk_norm``: per-head RMS norms of q and k before RoPE, as in the other backbones. The cosine already bounds
    these logits, so here the norms act as a learned per-channel weighting of the similarity; they are applied
    anyway so that ``model.qk_norm`` means the same in every attention of every backbone.
    """

    def __init__(self, dim: int, num_heads: int, down_factor: int = 2, qk_norm: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.down_factor = down_factor
        self.to_qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm, self.k_norm = qk_norms(dim // num_heads, qk_norm)
        self.to_out = nn.Conv2d(dim, dim, 1)
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        self.downsampler = TokenDownsampler(dim)

    def macs(self, side: int) -> int:
        """Multiply-adds on a ``side`` x ``side`` map: downsampler, qkv, attention in each sub-grid, output 1x1."""
        tokens, width, f = side * side, self.to_qkv.in_features, self.down_factor
        kernel = self.downsampler.layer.kernel_size[0] ** 2
        return tokens * width * (kernel + 3 * width + width) + 2 * tokens * tokens * width // (f * f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, d, big_h, big_w = x.shape
        f, heads = self.down_factor, self.num_heads
        h, w = big_h // f, big_w // f
        x = self.downsampler(x)
        # (n, d, h, f, w, f) -> (n, f, f, h, w, d): one batch entry per sub-grid, tokens row-major inside it.
        tokens = x.view(n, d, h, f, w, f).permute(0, 3, 5, 2, 4, 1).reshape(n * f * f, h * w, d)
        q, k, v = self.to_qkv(tokens).view(n * f * f, h * w, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        q, k = apply_qk_norm(self, q, k)
        cos, sin = rope_2d_angles(d // heads, h, w, device=x.device)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        temperature = self.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp().to(q.dtype)  # (heads, 1, 1)
        q = F.normalize(q, dim=-1) * temperature
        k = F.normalize(k, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0)  # (n*f*f, heads, h*w, hd)
        # Channels are (head, head_dim); every sub-grid's token goes back to pixel (r*f + dr, c*f + dc).
        out = out.view(n, f, f, heads, h, w, d // heads).permute(0, 3, 6, 4, 1, 5, 2).reshape(n, d, big_h, big_w)
        return self.to_out(out)


class RepFFN(nn.Module):
    """Training form of the re-parameterisable FFN (official ``FeedForward(rep=1)``).

    1x1 conv pair in (dim -> hidden/2 -> hidden), exact GELU, identity + depthwise 5x5 + 3x3 + 1x1 in
    parallel, 1x1 conv pair out (hidden -> hidden/2 -> dim). The extra branches only change the
    optimisation: :meth:`merged` folds them into a :class:`DeployFFN` computing the same function.
    """

    def __init__(self, dim: int, mlp_ratio: float = 2.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.hidden = hidden
        self.project_in = nn.Sequential(nn.Conv2d(dim, hidden // 2, 1), nn.Conv2d(hidden // 2, hidden, 1))
        self.dwconv = nn.ModuleList(
            [nn.Conv2d(hidden, hidden, k, padding=k // 2, groups=hidden) for k in (5, 3, 1)]
        )
        self.project_out = nn.Sequential(nn.Conv2d(hidden, hidden // 2, 1), nn.Conv2d(hidden // 2, dim, 1))

    def macs(self, tokens: int) -> int:
        """Multiply-adds over ``tokens`` pixels: 1x1 pairs in and out, depthwise 5x5 + 3x3 + 1x1 in parallel."""
        h, dim = self.hidden, self.project_in[0].in_channels
        return tokens * (dim * h // 2 + h // 2 * h + h * (25 + 9 + 1) + h * h // 2 + h // 2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.project_in(x))
        out = x
        for conv in self.dwconv:
            out = out + conv(x)
        return self.project_out(out)

    @torch.no_grad()
    def merged(self) -> DeployFFN:
        """A new :class:`DeployFFN` with the folded weights; this module's parameters are not modified."""

        # Folded in float32 (then cast to the model's dtype) so that bf16/fp16 weights lose nothing extra.
        def fold_pair(pair: nn.Sequential) -> tuple[torch.Tensor, torch.Tensor]:
            # conv2(conv1(x)) = W2 (W1 x + b1) + b2 for 1x1 convs.
            w1, w2 = pair[0].weight.flatten(1).float(), pair[1].weight.flatten(1).float()
            return (w2 @ w1)[:, :, None, None], w2 @ pair[0].bias.float() + pair[1].bias.float()

        ref = self.project_in[0].weight
        with torch.device(ref.device):
            out = DeployFFN(ref.shape[1], hidden=self.hidden).to(ref.dtype)
        w, b = fold_pair(self.project_in)
        out.project_in.weight.copy_(w)
        out.project_in.bias.copy_(b)
        # Centre the 3x3 and 1x1 kernels (and the identity, a 1x1 kernel of ones) inside the 5x5 one.
        k5, k3, k1 = (conv.weight.float() for conv in self.dwconv)
        dw = k5.clone()  # a new tensor: the training weights are never written
        dw[:, :, 1:4, 1:4] += k3
        dw[:, :, 2:3, 2:3] += k1 + 1.0
        out.dwconv.weight.copy_(dw)
        out.dwconv.bias.copy_(sum(conv.bias.float() for conv in self.dwconv))
        w, b = fold_pair(self.project_out)
        out.project_out.weight.copy_(w)
        out.project_out.bias.copy_(b)
        return out


class DeployFFN(nn.Module):
    """Merged FFN: 1x1 conv, exact GELU, depthwise 5x5, 1x1 conv (the official ``rep=0`` layout)."""

    def __init__(self, dim: int, mlp_ratio: float = 2.0, hidden: int | None = None):
        super().__init__()
        hidden = int(dim * mlp_ratio) if hidden is None else hidden
        self.hidden = hidden
        self.project_in = nn.Conv2d(dim, hidden, 1)
        self.dwconv = nn.Conv2d(hidden, hidden, 5, padding=2, groups=hidden)
        self.project_out = nn.Conv2d(hidden, dim, 1)

    def macs(self, tokens: int) -> int:
        """Multiply-adds over ``tokens`` pixels: 1x1 in, depthwise 5x5, 1x1 out."""
        h, dim = self.hidden, self.project_in.in_channels
        return tokens * (dim * h + 25 * h + h * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project_out(self.dwconv(F.gelu(self.project_in(x))))


class UDiTBlock(nn.Module):
    """Two adaLN-Zero sub-blocks (downsampled attention + FFN each), named ``*1`` and ``*2`` as upstream.

    With ``cross_attention`` (text form) each sub-block also attends to ``context`` (N, S, dim) between its
    self-attention and FFN, unmodulated (``norm_cross*``/``cross_attn*``); without it the block is upstream's.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 2.0,
        down_factor: int = 2,
        rep: bool = True,
        cross_attention: bool = False,
        qk_norm: bool = False,
    ):
        super().__init__()
        ffn = RepFFN if rep else DeployFFN
        self.attn1 = DownsampledAttention(dim, num_heads, down_factor, qk_norm)
        self.mlp1 = ffn(dim, mlp_ratio)
        self.adaLN_modulation1 = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.attn2 = DownsampledAttention(dim, num_heads, down_factor, qk_norm)
        self.mlp2 = ffn(dim, mlp_ratio)
        self.adaLN_modulation2 = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        # Plain attributes when None, so the class form's parameters and state dict stay the official ones.
        self.norm_cross1 = nn.LayerNorm(dim, eps=1e-6) if cross_attention else None
        self.cross_attn1 = CrossAttention(dim, num_heads, qk_norm=qk_norm) if cross_attention else None
        self.norm_cross2 = nn.LayerNorm(dim, eps=1e-6) if cross_attention else None
        self.cross_attn2 = CrossAttention(dim, num_heads, qk_norm=qk_norm) if cross_attention else None

    def macs(self, side: int, context: int) -> int:
        """Multiply-adds on a ``side`` x ``side`` map; ``context``: caption tokens the text form attends to.

        The FFNs count themselves, so the training (:class:`RepFFN`) and merged (:class:`DeployFFN`) forms
        each cost what they compute.
        """
        tokens, width = side * side, self.attn1.to_qkv.in_features
        macs = 0
        subs = ((self.attn1, self.cross_attn1, self.mlp1), (self.attn2, self.cross_attn2, self.mlp2))
        for attn, cross, ffn in subs:
            macs += 6 * width * width + attn.macs(side) + ffn.macs(tokens)  # adaLN modulation is per sample
            if cross is not None:
                macs += cross_attention_macs(tokens, context, width)
        return macs

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        subs = (
            (self.attn1, self.norm_cross1, self.cross_attn1, self.mlp1, self.adaLN_modulation1),
            (self.attn2, self.norm_cross2, self.cross_attn2, self.mlp2, self.adaLN_modulation2),
        )
        for attn, norm_cross, cross_attn, mlp, ada in subs:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = ada(c).chunk(6, dim=1)
            x = x + gate_msa[:, :, None, None] * attn(modulate_2d(layer_norm_2d(x), shift_msa, scale_msa))
            if cross_attn is not None:
                # Every pixel is a query token: (N, C, H, W) -> (N, H*W, C) and back.
                tokens = x.flatten(2).transpose(1, 2)
                x = x + cross_attn(norm_cross(tokens), context).transpose(1, 2).reshape(x.shape)
            x = x + gate_mlp[:, :, None, None] * mlp(modulate_2d(layer_norm_2d(x), shift_mlp, scale_mlp))
        return x


class Downsample(nn.Module):
    """Halve the resolution, double the channels: 3x3 conv to C/2 then pixel-unshuffle (x4 channels)."""

    def __init__(self, dim: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(dim, dim // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """Double the resolution, halve the channels: 3x3 conv to 2C then pixel-shuffle (/4 channels)."""

    def __init__(self, dim: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(dim, dim * 2, 3, padding=1, bias=False), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class PatchEmbed3x3(nn.Module):
    """Every latent pixel becomes a token through a 3x3 convolution (official ``OverlapPatchEmbed``)."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class FinalLayer(nn.Module):
    """adaLN-modulated channel LayerNorm and a 3x3 conv to the output channels."""

    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.out_proj = nn.Conv2d(dim, out_channels, 3, padding=1)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.out_proj(modulate_2d(layer_norm_2d(x), shift, scale))


class UDiT(nn.Module):
    """Class- or text-conditional U-shaped diffusion transformer over a latent grid.

    ``forward(x, t, y, force_drop_ids)`` maps (N, C, H, W) inputs, integer timesteps (N,) and labels (N,)
    to (N, 2C, H, W) with ``learn_sigma`` (epsilon then variance interpolation, as DiT) or (N, C, H, W).
    ``depth`` lists the blocks of the five levels (encoder 1, encoder 2, latent, decoder 2, decoder 1);
    each block holds two attention+FFN sub-blocks. ``rep=False`` builds the merged (deploy) layout
    directly, e.g. to load a checkpoint saved from :meth:`deploy`. With ``context_dim`` set (and
    ``num_classes`` 0 or None), ``y`` is CLIP token embeddings (N, context_tokens, context_dim): see the
    module docstring.
    """

    def __init__(
        self,
        input_size: int = 32,
        in_channels: int = 4,
        hidden_size: int = 96,
        depth: tuple[int, ...] | list[int] = (2, 5, 8, 5, 2),
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        down_factor: int = 2,
        class_dropout_prob: float = 0.1,
        num_classes: int | None = 1000,
        learn_sigma: bool = True,
        rep: bool = True,
        context_dim: int | None = None,
        context_tokens: int = 77,
        qk_norm: bool = False,
    ):
        super().__init__()
        depth = list(depth)
        if len(depth) != 5:
            raise ValueError(f"depth lists the blocks of 5 levels, got {depth}")
        # Two 2x downsamples, then each level's grid must split into down_factor x down_factor sub-grids.
        if input_size % (4 * down_factor):
            raise ValueError(
                f"input_size {input_size} is not divisible by {4 * down_factor} (2 downsamples x {down_factor})"
            )
        check_text_form(context_dim, num_classes, "U-DiT")
        self.input_size = input_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.num_classes = num_classes or 0
        self.class_dropout_prob = class_dropout_prob
        self.hidden_size = hidden_size
        self.rep = rep
        self.context_dim = context_dim
        self.context_tokens = context_tokens if context_dim is not None else 0
        c = hidden_size
        block = partial(
            UDiTBlock, num_heads=num_heads, mlp_ratio=mlp_ratio, down_factor=down_factor, rep=rep,
            cross_attention=context_dim is not None, qk_norm=qk_norm,
        )

        self.x_embedder = PatchEmbed3x3(in_channels, c)
        # One timestep/label embedder per width; registration order follows the official state dict.
        # The text form likewise gets one caption embedder per width rather than one shared embedder plus
        # per-level linears: each level's projection is then PixArt's at that width, with no base width to
        # pick and no extra linear stacked on it, and it mirrors the per-level timestep embedders. It only
        # ever sees context_tokens tokens, so the extra projections cost next to nothing.
        for level, width in ((1, c), (2, 2 * c), (3, 4 * c)):
            self.add_module(f"t_embedder_{level}", TimestepEmbedder(width))
            if context_dim is None:
                self.add_module(f"y_embedder_{level}", LabelEmbedder(num_classes, width, class_dropout_prob))
            else:
                self.add_module(f"caption_embedder_{level}", Mlp(context_dim, width, out_dim=width))
        self.encoder_level_1 = nn.ModuleList([block(c) for _ in range(depth[0])])
        self.down1_2 = Downsample(c)
        self.encoder_level_2 = nn.ModuleList([block(2 * c) for _ in range(depth[1])])
        self.down2_3 = Downsample(2 * c)
        self.latent = nn.ModuleList([block(4 * c) for _ in range(depth[2])])
        self.up3_2 = Upsample(4 * c)
        self.reduce_chan_level2 = nn.Conv2d(4 * c, 2 * c, 1)  # [upsampled 2C | skip 2C] -> 2C
        self.decoder_level_2 = nn.ModuleList([block(2 * c) for _ in range(depth[3])])
        self.up2_1 = Upsample(2 * c)
        self.reduce_chan_level1 = nn.Conv2d(2 * c, 2 * c, 1)  # [upsampled C | skip C]; level 1 decodes at 2C
        self.decoder_level_1 = nn.ModuleList([block(2 * c) for _ in range(depth[4])])
        self.output = nn.Conv2d(2 * c, 2 * c, 3, padding=1)
        self.final_layer = FinalLayer(2 * c, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Official initialisation: xavier linears and convs, N(0, 0.02) embeddings, adaLN-Zero.

        The text form follows PixArt-alpha: N(0, 0.02) caption embedders, zero cross-attention outputs.
        """

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for level in (1, 2, 3):
            if self.context_dim is None:
                nn.init.normal_(getattr(self, f"y_embedder_{level}").embedding_table.weight, std=0.02)
            t_emb = getattr(self, f"t_embedder_{level}")
            nn.init.normal_(t_emb.mlp[0].weight, std=0.02)
            nn.init.normal_(t_emb.mlp[2].weight, std=0.02)
        for blk in self.repeated_blocks():
            for ada in (blk.adaLN_modulation1, blk.adaLN_modulation2):
                nn.init.zeros_(ada[-1].weight)
                nn.init.zeros_(ada[-1].bias)
        for p in (*self.final_layer.adaLN_modulation[-1].parameters(), *self.final_layer.out_proj.parameters()):
            nn.init.zeros_(p)
        if self.context_dim is not None:
            init_text_conditioning(
                [getattr(self, f"caption_embedder_{level}") for level in (1, 2, 3)],
                [attn for blk in self.repeated_blocks() for attn in (blk.cross_attn1, blk.cross_attn2)],
            )

    def repeated_blocks(self) -> list[nn.Module]:
        """The blocks a strategy shards, checkpoints or compiles one by one (all levels, in order)."""
        return [
            *self.encoder_level_1, *self.encoder_level_2, *self.latent, *self.decoder_level_2, *self.decoder_level_1
        ]

    def deploy(self) -> UDiT:
        """A new model with every FFN re-parameterised (fewer parameters, same outputs to float rounding).

        ``self`` is left untouched, so this can be called at any time (e.g. on EMA weights before sampling)
        and any number of times. The result has the official ``rep=0`` layout and ``rep=False``.
        """
        out = copy.deepcopy(self)
        for blk in out.repeated_blocks():
            for name in ("mlp1", "mlp2"):
                ffn = getattr(blk, name)
                if isinstance(ffn, RepFFN):
                    setattr(blk, name, ffn.merged())
        out.rep = False
        return out

    def forward_flops(self) -> int:
        """Forward FLOPs of one sample (training or deploy form, class- or text-conditional).

        By the conventions of :mod:`bigdit.flops`.
        """
        c, size, freq = self.hidden_size, self.input_size, self.t_embedder_1.frequency_embedding_size
        levels = [  # (blocks, grid side)
            (self.encoder_level_1, size), (self.encoder_level_2, size // 2), (self.latent, size // 4),
            (self.decoder_level_2, size // 2), (self.decoder_level_1, size),
        ]
        macs = size * size * self.in_channels * c * 9  # 3x3 patch embedding
        macs += sum(freq * w + w * w for w in (c, 2 * c, 4 * c))  # three timestep MLPs
        if self.context_dim is not None:
            macs += sum(caption_embedder_macs(self.context_tokens, self.context_dim, w) for w in (c, 2 * c, 4 * c))
        macs += sum(b.macs(side, self.context_tokens) for blocks, side in levels for b in blocks)
        macs += size * size * c * (c // 2) * 9 + (size // 2) ** 2 * 2 * c * c * 9  # downsample convs
        macs += (size // 4) ** 2 * 4 * c * 8 * c * 9 + (size // 2) ** 2 * 2 * c * 4 * c * 9  # upsample convs
        macs += (size // 2) ** 2 * 4 * c * 2 * c + size * size * 2 * c * 2 * c  # channel reductions after skips
        macs += size * size * 2 * c * 2 * c * 9  # output 3x3 conv
        macs += 2 * c * 4 * c + size * size * 2 * c * self.out_channels * 9  # final adaLN + 3x3 projection
        return 2 * macs

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict epsilon (and the variance interpolation with ``learn_sigma``) for ``x`` at timesteps ``t``.

        ``y``: labels (N,), or CLIP tokens (N, context_tokens, context_dim) in the text form, where
        ``force_drop_ids`` is ignored (the training loop substitutes the empty-prompt embedding).
        """
        check_input(x, self.in_channels, self.input_size, "U-DiT")
        if self.context_dim is None:
            # Drop labels once for all three levels (upstream draws a separate mask per level, so a sample
            # could be conditional at one width and unconditional at another).
            if force_drop_ids is not None or (self.training and self.class_dropout_prob > 0):
                y = self.y_embedder_1.token_drop(y, force_drop_ids)
            c1 = self.t_embedder_1(t) + self.y_embedder_1(y, False)
            c2 = self.t_embedder_2(t) + self.y_embedder_2(y, False)
            c3 = self.t_embedder_3(t) + self.y_embedder_3(y, False)
            ctx1 = ctx2 = ctx3 = None
        else:
            y = check_context(y, x.shape[0], self.context_tokens, self.context_dim, "U-DiT")
            c1, c2, c3 = self.t_embedder_1(t), self.t_embedder_2(t), self.t_embedder_3(t)
            ctx1, ctx2, ctx3 = self.caption_embedder_1(y), self.caption_embedder_2(y), self.caption_embedder_3(y)

        enc1 = self.x_embedder(x)
        for blk in self.encoder_level_1:
            enc1 = blk(enc1, c1, ctx1)
        enc2 = self.down1_2(enc1)
        for blk in self.encoder_level_2:
            enc2 = blk(enc2, c2, ctx2)
        h = self.down2_3(enc2)
        for blk in self.latent:
            h = blk(h, c3, ctx3)
        h = self.reduce_chan_level2(torch.cat([self.up3_2(h), enc2], dim=1))
        for blk in self.decoder_level_2:
            h = blk(h, c2, ctx2)
        h = self.reduce_chan_level1(torch.cat([self.up2_1(h), enc1], dim=1))
        # The full-resolution decoder runs at 2C and reuses the level-2 conditioning, as upstream.
        for blk in self.decoder_level_1:
            h = blk(h, c2, ctx2)
        return self.final_layer(self.output(h), c2)


def _size(hidden_size: int, num_heads: int):
    return partial(UDiT, hidden_size=hidden_size, num_heads=num_heads, depth=(2, 5, 8, 5, 2), mlp_ratio=2.0)


#: Named sizes from the paper / official configs (all: depth [2, 5, 8, 5, 2], FFN ratio 2, 2x token downsampling).
UDiT_models = {"U-DiT-S": _size(96, 4), "U-DiT-B": _size(192, 8), "U-DiT-L": _size(384, 16)}
