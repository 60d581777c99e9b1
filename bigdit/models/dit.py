"""DiT: Scalable Diffusion Models with Transformers (Peebles & Xie, 2023), exactly as published.

Same modules, parameter names, shapes and initialisation as facebookresearch/DiT ``models.py``, so the
official checkpoints (e.g. ``DiT-XL-2-256x256.pt``) load with ``strict=True``. Attention runs through
``scaled_dot_product_attention``. Single-device code: strategies shard and wrap it from outside.

Text-to-image (our extension, not in the DiT paper): pass ``context_dim`` (CLIP width) and
``num_classes=0``, e.g. ``build_model("DiT-XL/2", context_dim=768, context_tokens=77, num_classes=0)``.
The label embedder goes; adaLN is conditioned on the timestep alone; a caption embedder (PixArt-alpha's
``y_embedder``: Linear -> GELU(tanh) -> Linear) projects the CLIP tokens once, and every block gets a
cross-attention to them between self-attention and MLP, ``x = x + cross_attn(norm_cross(x), context)``,
without adaLN modulation, as in PixArt-alpha. ``norm_cross`` is an *affine* LayerNorm: PixArt-alpha feeds
the raw residual stream, whose scale grows with depth, while the other norms here are affine-free only
because adaLN supplies their scale and shift; this branch has no adaLN, so its norm learns its own (as
Hunyuan-DiT's ``norm3``). The cross-attention output projections start at zero, so a new text model
computes exactly its time-only counterpart. ``forward``'s ``y`` is then the CLIP token embeddings
(N, context_tokens, context_dim) and ``force_drop_ids`` is ignored: caption dropout for classifier-free
guidance happens in the training loop, which swaps in the cached empty-prompt embedding.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from bigdit.models.layers import (
    Attention,
    CrossAttention,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    caption_embedder_macs,
    check_context,
    check_input,
    check_text_form,
    cross_attention_macs,
    init_text_conditioning,
    modulate,
    patch_grid,
    sincos_2d,
    unpatchify,
)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (shift, scale and gate for attention and MLP).

    With ``cross_attention`` (text form) an unmodulated cross-attention sub-block to ``context``
    (N, S, D) sits between self-attention and MLP; without it the block is the official one.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, cross_attention: bool = False,
                 qk_norm: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm)
        # Plain attributes when None, so the class form's parameters and state dict stay the official ones.
        self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6) if cross_attention else None
        self.cross_attn = CrossAttention(hidden_size, num_heads, qk_norm=qk_norm) if cross_attention else None
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_cross(x), context)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map from tokens to patch pixels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Class- or text-conditional diffusion transformer over a latent (or pixel) grid.

    ``forward(x, t, y)`` maps noisy inputs (N, C, H, W), integer timesteps (N,) and labels (N,) to
    (N, 2C, H, W) with ``learn_sigma`` (epsilon then variance interpolation) or (N, C, H, W) without.
    With ``context_dim`` set (and ``num_classes`` 0 or None), ``y`` is CLIP token embeddings
    (N, context_tokens, context_dim) instead: see the module docstring.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int | None = 1000,
        learn_sigma: bool = True,
        context_dim: int | None = None,
        context_tokens: int = 77,
        qk_norm: bool = False,
    ):
        super().__init__()
        grid = patch_grid(input_size, patch_size)
        check_text_form(context_dim, num_classes, "DiT")
        self.input_size = input_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.patch_size = patch_size
        self.num_classes = num_classes or 0
        self.hidden_size = hidden_size
        self.context_dim = context_dim
        self.context_tokens = context_tokens if context_dim is not None else 0

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        if context_dim is None:
            self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        else:
            self.caption_embedder = Mlp(context_dim, hidden_size, out_dim=hidden_size)
        # A frozen parameter, not a buffer: the official checkpoints store it under this key.
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, hidden_size), requires_grad=False)
        text = context_dim is not None
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, text, qk_norm)
                                     for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: xavier linears, sin-cos positions, N(0, 0.02) embeddings, adaLN-Zero.

        The text form follows PixArt-alpha: N(0, 0.02) caption embedder, zero cross-attention outputs.
        """

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        grid = int(self.pos_embed.shape[1] ** 0.5)
        self.pos_embed.data.copy_(torch.from_numpy(sincos_2d(self.hidden_size, grid)).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.context_dim is None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        else:
            init_text_conditioning([self.caption_embedder], [block.cross_attn for block in self.blocks])
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity and the network outputs zeros.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def repeated_blocks(self) -> list[nn.Module]:
        """The blocks a strategy shards, checkpoints or compiles one by one."""
        return list(self.blocks)

    def forward_flops(self) -> int:
        """Forward FLOPs of one sample (class- or text-conditional), by the conventions of :mod:`bigdit.flops`."""
        d, p = self.hidden_size, self.patch_size
        tokens = (self.input_size // p) ** 2
        mlp = self.blocks[0].mlp.fc1.out_features if len(self.blocks) else 4 * d
        freq = self.t_embedder.frequency_embedding_size
        per_block = tokens * (4 * d * d + 2 * d * mlp) + 2 * tokens * tokens * d + 6 * d * d
        captions = 0
        if self.context_dim is not None:
            per_block += cross_attention_macs(tokens, self.context_tokens, d)
            captions = caption_embedder_macs(self.context_tokens, self.context_dim, d)
        macs = (
            tokens * p * p * self.in_channels * d  # patch embedding
            + freq * d + d * d  # timestep MLP
            + captions
            + len(self.blocks) * per_block
            + 2 * d * d + tokens * d * p * p * self.out_channels  # final adaLN + linear
        )
        return 2 * macs

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict epsilon (and the variance interpolation with ``learn_sigma``) for ``x`` at timesteps ``t``.

        ``y``: labels (N,), or CLIP tokens (N, context_tokens, context_dim) in the text form, where
        ``force_drop_ids`` is ignored (the training loop substitutes the empty-prompt embedding).
        """
        check_input(x, self.in_channels, self.input_size, "DiT")
        n = x.shape[0]
        x = self.x_embedder(x) + self.pos_embed
        context = None
        if self.context_dim is None:
            c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)
        else:
            c = self.t_embedder(t)
            context = self.caption_embedder(check_context(y, n, self.context_tokens, self.context_dim, "DiT"))
        for block in self.blocks:
            x = block(x, c, context)
        return unpatchify(self.final_layer(x, c), self.patch_size, self.out_channels)


def _size(depth: int, hidden_size: int, num_heads: int, patch_size: int):
    return partial(DiT, depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=patch_size)


_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}

#: Named sizes from the paper (Table 1), each with patch 2, 4 and 8.
DiT_models = {f"DiT-{s}/{p}": _size(*dims, patch_size=p) for s, dims in _SIZES.items() for p in (2, 4, 8)}
