"""U-ViT: All are Worth Words: A ViT Backbone for Diffusion Models (Bao et al., CVPR 2023).

Same modules, parameter names and shapes as baofff/U-ViT ``libs/uvit.py`` (class/unconditional) and
``libs/uvit_t2i.py`` (text-to-image), so the official checkpoints load with ``strict=True``. Attention runs
through ``scaled_dot_product_attention``. Single-device code: strategies shard and wrap it from outside.

Everything is a token: the timestep (sinusoidal features, optionally through an MLP), the class label (or
the 77 projected CLIP tokens) and the image patches, with a learned 1-D position embedding. A plain ViT of
``depth // 2`` in-blocks, one mid-block and ``depth // 2`` out-blocks, where out-block i concatenates the
output of in-block ``depth//2 - 1 - i`` (long skips) and maps it back with a linear layer. The network
predicts epsilon only (``learn_sigma`` is False); an optional 3x3 conv follows the unpatchify.

``depth`` follows the official configs: depth 12 means 6 + 1 + 6 = 13 transformer blocks (the paper's
"depth 13" for U-ViT-S).

Text-to-image: pass ``context_dim`` (CLIP width, 768) and ``num_classes=0``, e.g.
``build_model("U-ViT-S/2", context_dim=768, context_tokens=77, num_classes=0)``; ``forward``'s ``y`` is then
the CLIP token embeddings (N, context_tokens, context_dim) and ``force_drop_ids`` is ignored (caption
dropout happens outside the model, as upstream: the training loop swaps in the cached empty-prompt embedding).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from bigdit.models.layers import (
    Attention,
    Mlp,
    PatchEmbed,
    check_context,
    check_input,
    check_text_form,
    patch_grid,
    timestep_embedding,
    unpatchify,
)


class UViTBlock(nn.Module):
    """Pre-norm transformer block; with ``skip`` it first fuses a long-skip input: linear([x | skip])."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False, skip: bool = False,
                 qk_norm: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(dim)
        # U-ViT uses timm's Mlp with the exact (erf) GELU, unlike DiT's tanh approximation.
        self.mlp = Mlp(dim, int(dim * mlp_ratio), approximate="none")
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UViT(nn.Module):
    """U-ViT noise-prediction network over a latent (or pixel) grid.

    ``forward(x, t, y, force_drop_ids)`` maps (N, C, H, W) inputs and integer timesteps (N,) to epsilon
    (N, C, H, W). ``y``: class labels (N,) when ``num_classes`` > 0 (the table has one extra null row, index
    ``num_classes``, when ``class_dropout_prob`` > 0, so 1000 classes give the official 1001-row table);
    ignored when unconditional (``num_classes`` 0 or None); CLIP tokens (N, context_tokens, context_dim)
    when ``context_dim`` is set.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 512,
        depth: int = 12,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        mlp_time_embed: bool = False,
        num_classes: int | None = 1000,
        class_dropout_prob: float = 0.1,
        conv: bool = True,
        skip: bool = True,
        context_dim: int | None = None,
        context_tokens: int = 77,
        learn_sigma: bool = False,
        qk_norm: bool = False,
    ):
        super().__init__()
        if learn_sigma:
            raise ValueError("U-ViT predicts epsilon only; learn_sigma=True is not supported")
        grid = patch_grid(input_size, patch_size)
        num_classes = num_classes or 0
        check_text_form(context_dim, num_classes, "U-ViT")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.learn_sigma = False
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob
        self.hidden_size = hidden_size
        self.context_dim = context_dim
        self.context_tokens = context_tokens if context_dim is not None else 0

        self.patch_embed = PatchEmbed(patch_size, in_channels, hidden_size)
        self.time_embed = (
            nn.Sequential(nn.Linear(hidden_size, 4 * hidden_size), nn.SiLU(), nn.Linear(4 * hidden_size, hidden_size))
            if mlp_time_embed
            else nn.Identity()
        )
        if context_dim is not None:
            self.context_embed = nn.Linear(context_dim, hidden_size)
            self.extras = 1 + context_tokens  # [time | context tokens | patches]
        elif num_classes:
            self.label_emb = nn.Embedding(num_classes + int(class_dropout_prob > 0), hidden_size)
            self.extras = 2  # [label | time | patches]
        else:
            self.extras = 1  # [time | patches]
        # Learned (and trained) positions over all tokens, extras included.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + grid * grid, hidden_size))
        block = partial(UViTBlock, hidden_size, num_heads, mlp_ratio, qkv_bias, qk_norm=qk_norm)
        self.in_blocks = nn.ModuleList([block() for _ in range(depth // 2)])
        self.mid_block = block()
        self.out_blocks = nn.ModuleList([block(skip=skip) for _ in range(depth // 2)])
        self.norm = nn.LayerNorm(hidden_size)
        self.decoder_pred = nn.Linear(hidden_size, patch_size**2 * in_channels)
        self.final_layer = nn.Conv2d(in_channels, in_channels, 3, padding=1) if conv else nn.Identity()
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Official initialisation: truncated N(0, 0.02) positions and linears, zero biases, unit LayerNorms.

        Convolutions and the label table keep PyTorch's defaults, as upstream.
        """
        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-2.0, b=2.0)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def repeated_blocks(self) -> list[nn.Module]:
        """The blocks a strategy shards, checkpoints or compiles one by one."""
        return [*self.in_blocks, self.mid_block, *self.out_blocks]

    def forward_flops(self) -> int:
        """Forward FLOPs of one sample, by the conventions of :mod:`bigdit.flops`.

        The time/label/context tokens attend with the patches, so they count in every block.
        """
        d, p, c = self.hidden_size, self.patch_size, self.in_channels
        patches = (self.input_size // p) ** 2
        tokens = self.extras + patches
        blocks = self.repeated_blocks()
        mlp = blocks[0].mlp.fc1.out_features
        per_block = tokens * (4 * d * d + 2 * d * mlp) + 2 * tokens * tokens * d
        skips = sum(1 for b in blocks if b.skip_linear is not None)
        macs = (
            patches * p * p * c * d  # patch embedding
            + (8 * d * d if isinstance(self.time_embed, nn.Sequential) else 0)  # optional time MLP (D -> 4D -> D)
            + self.context_tokens * (self.context_dim or 0) * d  # CLIP token projection
            + len(blocks) * per_block
            + skips * tokens * 2 * d * d  # long-skip fusion (concat -> linear)
            + tokens * d * p * p * c  # decoder_pred runs on every token before the extras are dropped
            + (self.input_size**2 * c * c * 9 if isinstance(self.final_layer, nn.Conv2d) else 0)
        )
        return 2 * macs

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        force_drop_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict epsilon for ``x`` at timesteps ``t`` given labels or CLIP tokens ``y``."""
        check_input(x, self.in_channels, self.input_size, "U-ViT")
        tokens = self.patch_embed(x)
        time_token = self.time_embed(timestep_embedding(t, self.hidden_size).to(tokens.dtype)).unsqueeze(1)
        if self.context_dim is not None:
            y = check_context(y, x.shape[0], self.context_tokens, self.context_dim, "U-ViT")
            tokens = torch.cat([time_token, self.context_embed(y), tokens], dim=1)
        elif self.num_classes:
            if force_drop_ids is not None:
                y = torch.where(force_drop_ids == 1, torch.full_like(y, self.num_classes), y)
            elif self.training and self.class_dropout_prob > 0:
                drop = torch.rand(y.shape[0], device=y.device) < self.class_dropout_prob
                y = torch.where(drop, torch.full_like(y, self.num_classes), y)
            tokens = torch.cat([self.label_emb(y).unsqueeze(1), time_token, tokens], dim=1)
        else:
            tokens = torch.cat([time_token, tokens], dim=1)
        h = tokens + self.pos_embed

        skips = []
        for blk in self.in_blocks:
            h = blk(h)
            skips.append(h)
        h = self.mid_block(h)
        for blk in self.out_blocks:
            h = blk(h, skips.pop())  # deepest in-block feeds the first out-block
        h = self.decoder_pred(self.norm(h))[:, self.extras :]
        return self.final_layer(unpatchify(h, self.patch_size, self.out_channels))


def _size(hidden_size: int, depth: int, num_heads: int, patch_size: int, **defaults):
    return partial(UViT, hidden_size=hidden_size, depth=depth, num_heads=num_heads, patch_size=patch_size, **defaults)


#: Named sizes (paper Table 1 / official configs; depth counts in+out blocks, the mid block comes on top).
#: The huge configs drop the final conv (``conv=False``); every other official config keeps it.
UViT_models = {
    "U-ViT-S/2": _size(512, 12, 8, 2),
    "U-ViT-S/2-Deep": _size(512, 16, 8, 2),
    "U-ViT-M/4": _size(768, 16, 12, 4),
    "U-ViT-L/2": _size(1024, 20, 16, 2),
    "U-ViT-L/4": _size(1024, 20, 16, 4),
    "U-ViT-H/2": _size(1152, 28, 16, 2, conv=False),
    "U-ViT-H/4": _size(1152, 28, 16, 4, conv=False),
}
