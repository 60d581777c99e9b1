"""ADM: the U-Net of "Diffusion Models Beat GANs on Image Synthesis" (Dhariwal & Nichol, 2021), exactly as published.

Same modules, parameter names, shapes and initialisation as openai/guided-diffusion ``guided_diffusion/unet.py``
(``UNetModel`` and the noisy classifier ``EncoderUNetModel``), so the official checkpoints
(``256x256_diffusion.pt``, ``64x64_classifier.pt``, ...) load with ``strict=True``. Attention runs through
``scaled_dot_product_attention`` (both head layouts: the legacy "split heads, then q/k/v" and
``use_new_attention_order``'s "split q/k/v, then heads"); GroupNorm runs in float32 and returns the input's
dtype, as the official ``GroupNorm32`` (under bf16 autocast too). Single-device code: strategies shard and
wrap it from outside.

The constructors take guided-diffusion's keywords under their own names (``attention_resolutions`` as
downsample rates, the way ``create_model`` passes them: "32,16,8" at 256px is ``(8, 16, 32)``), plus
bigdit's common ones: ``input_size`` (= ``image_size``), ``learn_sigma`` (``out_channels`` = 2 x or 1 x
``in_channels``) and ``class_dropout_prob``. ADM has no null class; ``class_dropout_prob > 0`` adds one row
to ``label_emb`` for classifier-free guidance (our extension: such a model no longer has the official
layout; the default 0 keeps it). ``use_fp16`` and ``use_checkpoint`` are accepted and ignored: they are run
options here (``run.precision=bf16``, ``run.activation_checkpointing=true``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bigdit.models.layers import check_input, drop_labels, timestep_embedding


class GroupNorm32(nn.GroupNorm):
    """GroupNorm over 32 groups computed in float32 and returned in the input's dtype (guided-diffusion's)."""

    def __init__(self, channels: int):
        if channels % 32:
            raise ValueError(f"ADM normalises in 32 groups but a layer has {channels} channels: choose model_channels "
                             f"and channel_mult so that every width (and skip concatenation) is a multiple of 32")
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Weights too: FSDP2 may hold them in bf16. Autocast keeps group_norm in float32 (its fp32 op list).
        out = F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps)
        return out.type(x.dtype)


class TokenConv1d(nn.Conv1d):
    """A kernel-1 ``Conv1d`` (the official parameter layout, weight (out, in, 1)) applied to tokens (N, T, in).

    A 1x1 convolution over channels is a linear map per token; running it on token-major tensors gives
    ``scaled_dot_product_attention`` contiguous heads without transposing copies.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight[:, :, 0], self.bias)


def conv_macs(conv: nn.Conv2d, side_out: int) -> int:
    """Multiply-adds of ``conv`` producing a ``side_out`` x ``side_out`` map (one sample)."""
    kh, kw = conv.kernel_size
    return side_out * side_out * conv.out_channels * (conv.in_channels // conv.groups) * kh * kw


def attention_macs(tokens: int, width: int, queries: int | None = None) -> int:
    """Multiply-adds of attention scores and values: ``queries`` (default all) tokens against ``tokens`` keys."""
    return 2 * (tokens if queries is None else queries) * tokens * width


def split_heads(qkv: torch.Tensor, heads: int, legacy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (N, heads, T, head_dim) from token-major projections (N, T, 3C).

    ``legacy`` (QKVAttentionLegacy) reads the channels as [head][q|k|v][head_dim]; the new order
    (QKVAttention, ``use_new_attention_order``) as [q|k|v][head][head_dim]. Official checkpoints hold one
    or the other, so the order is part of the layout.
    """
    n, t, width = qkv.shape
    dim = width // (3 * heads)
    if legacy:
        return qkv.view(n, t, heads, 3, dim).permute(3, 0, 2, 1, 4).unbind(0)
    return qkv.view(n, t, 3, heads, dim).permute(2, 0, 3, 1, 4).unbind(0)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(N, heads, T, head_dim) -> (N, T, heads * head_dim), head-major channels as both official orders."""
    n, heads, t, dim = x.shape
    return x.transpose(1, 2).reshape(n, t, heads * dim)


def attention_heads(channels: int, num_heads: int, num_head_channels: int) -> int:
    """Heads of an attention layer: ``channels // num_head_channels``, or ``num_heads`` when that is -1."""
    if num_head_channels == -1:
        heads = num_heads
    elif channels % num_head_channels:
        raise ValueError(f"attention over {channels} channels is not divisible into heads of {num_head_channels}")
    else:
        heads = channels // num_head_channels
    if channels % heads:
        raise ValueError(f"attention over {channels} channels is not divisible into {heads} heads")
    return heads


class TimeEmbed(nn.Sequential):
    """Timesteps (N,) -> embeddings (N, 4 x model_channels): sinusoidal features, then Linear-SiLU-Linear."""

    def __init__(self, model_channels: int):
        super().__init__(nn.Linear(model_channels, 4 * model_channels), nn.SiLU(),
                         nn.Linear(4 * model_channels, 4 * model_channels))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return super().forward(timestep_embedding(t, self[0].in_features).to(self[0].weight.dtype))

    def macs(self) -> int:
        """Multiply-adds of one sample."""
        return sum(layer.in_features * layer.out_features for layer in self if isinstance(layer, nn.Linear))


class TimestepBlock(nn.Module):
    """A module whose ``forward(x, emb)`` also takes the timestep (and label) embedding."""


class TimestepEmbedSequential(nn.Sequential):
    """A sequence that passes the embedding to the children that are :class:`TimestepBlock`."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x

    def macs(self, side: int) -> tuple[int, int]:
        """Multiply-adds of one sample entering at ``side`` x ``side``, and the side it leaves at."""
        total = 0
        for layer in self:
            if isinstance(layer, nn.Conv2d):  # the stem convolution (stride 1, same padding)
                total += conv_macs(layer, side)
            else:
                macs, side = layer.macs(side)
                total += macs
        return total, side


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 convolution when ``use_conv`` (``conv_resample``)."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return x if self.conv is None else self.conv(x)

    def macs(self, side: int) -> tuple[int, int]:
        """Multiply-adds of one sample at ``side`` (interpolation is free), and the output side."""
        return (0 if self.conv is None else conv_macs(self.conv, 2 * side)), 2 * side


class Downsample(nn.Module):
    """2x downsampling: a stride-2 3x3 convolution when ``use_conv`` (``conv_resample``), else 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)

    def macs(self, side: int) -> tuple[int, int]:
        """Multiply-adds of one sample at ``side`` (pooling is free), and the output side."""
        return (conv_macs(self.op, side // 2) if isinstance(self.op, nn.Conv2d) else 0), side // 2


class ResBlock(TimestepBlock):
    """Residual block conditioned on the embedding, optionally changing channels and resolution.

    ``use_scale_shift_norm``: the embedding gives a scale and shift applied after the second GroupNorm
    (FiLM, ADM's "adaptive group normalisation"); otherwise it is added before it. ``up``/``down``: the
    block resamples both paths (``resblock_updown``), between the first norm+SiLU and its convolution.
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 use_scale_shift_norm: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        self.out_channels = out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(p=dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        nn.init.zeros_(self.out_layers[3].weight)  # the residual branch starts at zero
        nn.init.zeros_(self.out_layers[3].bias)
        # guided-diffusion's use_conv (a 3x3 skip) is never set by its constructors: the skip is 1x1.
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        norm, act, conv = self.in_layers
        h = act(norm(x))
        if self.updown:
            h, x = self.h_upd(h), self.x_upd(x)
        h = conv(h)
        emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        out_norm, out_act, out_drop, out_conv = self.out_layers
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = out_norm(h) * (1 + scale) + shift
        else:
            h = out_norm(h + emb_out)
        return self.skip_connection(x) + out_conv(out_drop(out_act(h)))

    def macs(self, side: int) -> tuple[int, int]:
        """Multiply-adds of one sample entering at ``side``, and the side it leaves at."""
        side_out = self.x_upd.macs(side)[1] if self.updown else side
        macs = conv_macs(self.in_layers[2], side_out) + conv_macs(self.out_layers[3], side_out)
        macs += self.emb_layers[1].in_features * self.emb_layers[1].out_features
        if isinstance(self.skip_connection, nn.Conv2d):
            macs += conv_macs(self.skip_connection, side_out)
        return macs, side_out


class AttentionBlock(nn.Module):
    """Self-attention over all positions of a feature map, residual, with a zero-initialised output projection."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 use_new_attention_order: bool = False):
        super().__init__()
        self.num_heads = attention_heads(channels, num_heads, num_head_channels)
        self.legacy_order = not use_new_attention_order
        self.norm = GroupNorm32(channels)
        self.qkv = TokenConv1d(channels, 3 * channels)
        self.proj_out = TokenConv1d(channels, channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        attn = F.scaled_dot_product_attention(*split_heads(self.qkv(tokens), self.num_heads, self.legacy_order))
        return x + self.proj_out(merge_heads(attn)).transpose(1, 2).reshape(n, c, h, w)

    def macs(self, side: int) -> tuple[int, int]:
        """Multiply-adds of one sample at ``side`` (the side is unchanged)."""
        tokens, c = side * side, self.norm.num_channels
        return tokens * 4 * c * c + attention_macs(tokens, c), side


class AttentionPool2d(nn.Module):
    """The classifier head (CLIP's attention pooling): the mean token attends to itself and every position.

    Only the pooled token's query is computed: the official code attends from every position and then keeps
    the first, which gives the same output.
    """

    def __init__(self, spatial_side: int, embed_dim: int, num_head_channels: int, output_dim: int | None = None):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(embed_dim, spatial_side ** 2 + 1) / embed_dim ** 0.5)
        self.qkv_proj = TokenConv1d(embed_dim, 3 * embed_dim)
        self.c_proj = TokenConv1d(embed_dim, output_dim or embed_dim)
        self.num_heads = attention_heads(embed_dim, 1, num_head_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(2).transpose(1, 2)  # (N, T, C)
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
        tokens = tokens + self.positional_embedding.t()[None].to(tokens.dtype)
        q, k, v = split_heads(self.qkv_proj(tokens), self.num_heads, legacy=False)
        pooled = F.scaled_dot_product_attention(q[:, :, :1], k, v)
        return self.c_proj(merge_heads(pooled))[:, 0]

    def macs(self, side: int) -> tuple[int, int]:
        """Multiply-adds of one sample at ``side``; the output is a vector (side 0)."""
        tokens, c = side * side + 1, self.qkv_proj.in_channels
        return tokens * 3 * c * c + attention_macs(tokens, c, queries=1) + c * self.c_proj.out_channels, 0


def _encoder(in_channels: int, model_channels: int, num_res_blocks: int, attention_resolutions: Sequence[int],
             dropout: float, channel_mult: Sequence[float], conv_resample: bool, num_heads: int,
             num_head_channels: int, use_scale_shift_norm: bool, resblock_updown: bool,
             use_new_attention_order: bool) -> tuple[nn.ModuleList, TimestepEmbedSequential, list[int], int, int]:
    """The down path and middle block both ADM networks share, in the official module order.

    Returns ``input_blocks``, ``middle_block``, the channels of each input block's output (the U-Net's
    skips), the final width and downsample rate.
    """
    emb = 4 * model_channels
    res = dict(emb_channels=emb, dropout=dropout, use_scale_shift_norm=use_scale_shift_norm)
    attn = dict(num_heads=num_heads, num_head_channels=num_head_channels,
                use_new_attention_order=use_new_attention_order)
    ch = int(channel_mult[0] * model_channels)
    input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
    chans, ds = [ch], 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            layers: list[nn.Module] = [ResBlock(ch, out_channels=int(mult * model_channels), **res)]
            ch = int(mult * model_channels)
            if ds in attention_resolutions:
                layers.append(AttentionBlock(ch, **attn))
            input_blocks.append(TimestepEmbedSequential(*layers))
            chans.append(ch)
        if level != len(channel_mult) - 1:
            down = ResBlock(ch, down=True, **res) if resblock_updown else Downsample(ch, conv_resample)
            input_blocks.append(TimestepEmbedSequential(down))
            chans.append(ch)
            ds *= 2
    middle_block = TimestepEmbedSequential(ResBlock(ch, **res), AttentionBlock(ch, **attn), ResBlock(ch, **res))
    return input_blocks, middle_block, chans, ch, ds


def _check_common(dims: int, image_size: int | None, input_size: int | None, channel_mult: Sequence[float],
                  attention_resolutions: Sequence[int], model: str) -> tuple[int, tuple, tuple]:
    """Validate what both networks share; return the image side, ``channel_mult`` and ``attention_resolutions``."""
    if dims != 2:
        raise ValueError(f"{model}: dims={dims} is not supported; bigdit's ADM is the 2-D image U-Net (dims=2)")
    if image_size is not None and input_size is not None and image_size != input_size:
        raise ValueError(f"{model}: image_size={image_size} and input_size={input_size} name the same side; give one")
    side = image_size if image_size is not None else input_size
    if side is None:
        raise ValueError(f"{model}: give the image side as image_size (or input_size)")
    if isinstance(channel_mult, str) or isinstance(attention_resolutions, str):
        # create_model's strings ("1,1,2,2,4,4", "32,16,8" in pixels) are not the constructor's numbers
        raise ValueError(f"{model}: channel_mult and attention_resolutions are sequences of numbers, e.g. "
                         f"channel_mult=[1,1,2,2,4,4] attention_resolutions=[8,16,32] (downsample rates: "
                         f"create_model's '32,16,8' at 256px); got {channel_mult!r}, {attention_resolutions!r}")
    channel_mult, rates = tuple(channel_mult), tuple(attention_resolutions)
    deepest = 2 ** (len(channel_mult) - 1)
    if side % deepest:
        raise ValueError(f"{model}: image side {side} must be divisible by {deepest} for {len(channel_mult)} levels "
                         f"(channel_mult={channel_mult})")
    reached = {2 ** level for level in range(len(channel_mult))}
    if not set(rates) <= reached:
        raise ValueError(f"{model}: attention_resolutions {rates} are downsample rates, but {len(channel_mult)} levels "
                         f"reach only {sorted(reached)}: drop {sorted(set(rates) - reached)} or add levels")
    return side, channel_mult, rates


class UNetModel(nn.Module):
    """ADM's U-Net: ``forward(x, t, y=None)`` maps noisy images (N, C, H, W), timesteps (N,) and labels (N,)
    to (N, out_channels, H, W): epsilon, then the variance interpolation when ``learn_sigma``.

    Keywords are guided-diffusion's ``UNetModel`` arguments (see the module docstring); ``use_fp16`` maps to
    ``run.precision=bf16`` (weights stay fp32, autocast computes in bf16) and ``use_checkpoint`` to
    ``run.activation_checkpointing=true`` (per repeated block); both are accepted here and ignored.
    """

    def __init__(
        self,
        image_size: int | None = None,
        in_channels: int = 3,
        model_channels: int = 128,
        out_channels: int | None = None,
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | None = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        *,
        input_size: int | None = None,
        learn_sigma: bool | None = None,
        class_dropout_prob: float = 0.0,
    ):
        super().__init__()
        side, channel_mult, attention_resolutions = _check_common(
            dims, image_size, input_size, channel_mult, attention_resolutions, "ADM")
        self.image_size = self.input_size = side
        if out_channels is None:
            out_channels = in_channels * (1 if learn_sigma is False else 2)
        elif learn_sigma is not None and out_channels != in_channels * (1 + int(learn_sigma)):
            raise ValueError(f"ADM: out_channels={out_channels} contradicts learn_sigma={learn_sigma} with "
                             f"in_channels={in_channels}; give one of them")
        num_classes = num_classes or None  # bigdit's configs say 0 for unconditional, guided-diffusion None
        if class_dropout_prob > 0 and num_classes is None:
            raise ValueError(f"ADM: class_dropout_prob={class_dropout_prob} needs class labels; set it to 0 for an "
                             f"unconditional model or give num_classes")
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.in_channels, self.model_channels, self.out_channels = in_channels, model_channels, out_channels
        self.learn_sigma = out_channels == 2 * in_channels
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob

        emb = 4 * model_channels
        self.time_embed = TimeEmbed(model_channels)
        if num_classes is not None:
            # One extra row (index num_classes) for the null label of classifier-free guidance.
            self.label_emb = nn.Embedding(num_classes + int(class_dropout_prob > 0), emb)
        self.input_blocks, self.middle_block, chans, ch, ds = _encoder(
            in_channels, model_channels, num_res_blocks, attention_resolutions, dropout, channel_mult, conv_resample,
            num_heads, num_head_channels, use_scale_shift_norm, resblock_updown, use_new_attention_order)
        res = dict(emb_channels=emb, dropout=dropout, use_scale_shift_norm=use_scale_shift_norm)
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers: list[nn.Module] = [ResBlock(ch + chans.pop(), out_channels=int(model_channels * mult), **res)]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads_upsample, num_head_channels, use_new_attention_order))
                if level and i == num_res_blocks:
                    layers.append(ResBlock(ch, up=True, **res) if resblock_updown else Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        stem_ch = int(channel_mult[0] * model_channels)
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(stem_ch, out_channels, 3, padding=1))
        nn.init.zeros_(self.out[2].weight)  # the untrained network predicts zeros
        nn.init.zeros_(self.out[2].bias)

    def repeated_blocks(self) -> list[nn.Module]:
        """The residual and attention blocks, which a strategy shards, checkpoints or compiles one by one."""
        return _repeated_blocks([*self.input_blocks, self.middle_block, *self.output_blocks])

    def forward_flops(self) -> int:
        """Forward FLOPs of one sample, by the conventions of :mod:`bigdit.flops` (resampling is free)."""
        macs, side = _path_macs([*self.input_blocks, self.middle_block, *self.output_blocks], self.image_size)
        return 2 * (self.time_embed.macs() + macs + conv_macs(self.out[2], side))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Predict epsilon (and the variance interpolation with ``learn_sigma``) for ``x`` at timesteps ``t``.

        ``y``: labels (N,) for a class-conditional model; an unconditional one ignores it (the training loop
        passes the data's labels whatever the model). ``force_drop_ids`` (N,) marks the labels to replace by
        the null label; it is ignored without one (``class_dropout_prob`` 0, where the loop draws no drops).
        Timesteps are used as given (guided-diffusion's ``rescale_timesteps`` is off in every published model).
        """
        check_input(x, self.in_channels, self.image_size, "ADM")
        emb = self.time_embed(t)
        if self.num_classes is not None:
            if y is None or y.shape != (x.shape[0],):
                raise ValueError(f"class-conditional ADM expects labels y of shape ({x.shape[0]},), got "
                                 f"{None if y is None else tuple(y.shape)}")
            if self.class_dropout_prob > 0 and (self.training or force_drop_ids is not None):
                y = drop_labels(y, self.num_classes, self.class_dropout_prob, force_drop_ids)
            emb = emb + self.label_emb(y)
        skips, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


class EncoderUNetModel(nn.Module):
    """ADM's noisy classifier: the U-Net's down path and middle block, then a pooling head.

    ``forward(x, t)`` maps noisy images (N, C, H, W) and timesteps (N,) to logits (N, out_channels).
    ``pool="attention"`` (the published classifiers: CLIP-style attention pooling) or ``"adaptive"``
    (global average, then a zero-initialised 1x1 convolution). ``num_classes`` is bigdit's name for
    ``out_channels``; ``use_fp16``/``use_checkpoint`` map to run options as in :class:`UNetModel`.
    """

    def __init__(
        self,
        image_size: int | None = None,
        in_channels: int = 3,
        model_channels: int = 128,
        out_channels: int | None = None,
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        pool: str = "adaptive",
        *,
        input_size: int | None = None,
        num_classes: int | None = None,
    ):
        super().__init__()
        side, channel_mult, attention_resolutions = _check_common(
            dims, image_size, input_size, channel_mult, attention_resolutions, "ADM classifier")
        self.image_size = self.input_size = side
        if out_channels is not None and num_classes is not None and out_channels != num_classes:
            raise ValueError(f"ADM classifier: out_channels={out_channels} and num_classes={num_classes} name the "
                             f"same number of logits; give one")
        out_channels = out_channels if out_channels is not None else num_classes
        if not out_channels:
            raise ValueError("ADM classifier: give the number of classes as out_channels (or num_classes)")
        if pool not in ("attention", "adaptive"):
            raise ValueError(f"ADM classifier: pool={pool!r} is not supported; use 'attention' (the published "
                             f"classifiers) or 'adaptive'")
        if pool == "attention" and num_head_channels == -1:
            raise ValueError("ADM classifier: pool='attention' needs num_head_channels (64 in the published ones)")
        self.in_channels, self.model_channels, self.out_channels = in_channels, model_channels, out_channels
        self.num_classes = out_channels
        self.pool = pool

        self.time_embed = TimeEmbed(model_channels)
        self.input_blocks, self.middle_block, _, ch, ds = _encoder(
            in_channels, model_channels, num_res_blocks, attention_resolutions, dropout, channel_mult, conv_resample,
            num_heads, num_head_channels, use_scale_shift_norm, resblock_updown, use_new_attention_order)
        if pool == "attention":
            head: nn.Module = AttentionPool2d(self.image_size // ds, ch, num_head_channels, out_channels)
            self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), head)
        else:
            conv = nn.Conv2d(ch, out_channels, 1)
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
            self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.AdaptiveAvgPool2d((1, 1)), conv, nn.Flatten())

    def repeated_blocks(self) -> list[nn.Module]:
        """The residual and attention blocks, which a strategy shards, checkpoints or compiles one by one."""
        return _repeated_blocks([*self.input_blocks, self.middle_block])

    def forward_flops(self) -> int:
        """Forward FLOPs of one sample, by the conventions of :mod:`bigdit.flops`."""
        macs, side = _path_macs([*self.input_blocks, self.middle_block], self.image_size)
        macs += self.time_embed.macs()
        if self.pool == "attention":
            macs += self.out[2].macs(side)[0]
        else:
            macs += conv_macs(self.out[3], 1)  # after pooling to 1x1
        return 2 * macs

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Class logits (N, out_channels) of noisy images ``x`` at timesteps ``t`` (used as given)."""
        check_input(x, self.in_channels, self.image_size, "ADM classifier")
        emb = self.time_embed(t)
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
        return self.out(self.middle_block(h, emb))


def _repeated_blocks(sequences: list[TimestepEmbedSequential]) -> list[nn.Module]:
    return [layer for seq in sequences for layer in seq if isinstance(layer, (ResBlock, AttentionBlock))]


def _path_macs(blocks: list[TimestepEmbedSequential], side: int) -> tuple[int, int]:
    """Multiply-adds of one sample through ``blocks`` entering at ``side``, and the side it leaves at."""
    total = 0
    for block in blocks:
        macs, side = block.macs(side)
        total += macs
    return total, side


def _registered(cls: type[nn.Module], preset: dict, aliases: dict[str, str]) -> Callable[..., nn.Module]:
    """A registry entry: ``cls`` with ``preset``'s keywords; those the caller passes override them.

    ``aliases`` maps bigdit's names to guided-diffusion's (``input_size`` -> ``image_size``): a keyword given
    under either name replaces the preset's value under the other.
    """

    def build(**kwargs):
        shadowed = {official for ours, official in aliases.items() if ours in kwargs}
        shadowed |= {ours for ours, official in aliases.items() if official in kwargs}
        return cls(**{**{k: v for k, v in preset.items() if k not in shadowed}, **kwargs})

    build.__doc__ = f"{cls.__name__} with {preset}; keywords override them."
    return build


# The published ImageNet models (guided-diffusion README flags, as create_model resolves them):
# attention at 32, 16 and 8 pixels, given as downsample rates.
_UNET = dict(in_channels=3, num_res_blocks=2, dropout=0.0, num_classes=1000, num_heads=4, num_head_channels=64,
             use_scale_shift_norm=True, resblock_updown=True, model_channels=256)
_MULT = {64: (1, 2, 3, 4), 128: (1, 1, 2, 3, 4), 256: (1, 1, 2, 2, 4, 4), 512: (0.5, 1, 1, 2, 2, 4, 4)}


def _attention_rates(side: int) -> tuple[int, ...]:
    return tuple(side // res for res in (32, 16, 8))


def _unet(side: int, **kwargs) -> dict:
    return {**_UNET, "image_size": side, "channel_mult": _MULT[side], "attention_resolutions": _attention_rates(side),
            **kwargs}


_UNETS = {
    "ADM-64": _unet(64, model_channels=192, num_res_blocks=3, dropout=0.1, use_new_attention_order=True),
    "ADM-128": _unet(128, num_head_channels=-1),
    "ADM-256": _unet(256),
    "ADM-256-uncond": _unet(256, num_classes=None),
    "ADM-512": _unet(512),
}

# The noisy classifiers (guided-diffusion's create_classifier; depth 4 at 64px, as the README's flags).
_CLASSIFIERS = {
    f"ADM-classifier-{side}": dict(image_size=side, in_channels=3, model_channels=128, out_channels=1000,
                                   num_res_blocks=4 if side == 64 else 2, attention_resolutions=_attention_rates(side),
                                   channel_mult=_MULT[side], num_head_channels=64, use_scale_shift_norm=True,
                                   resblock_updown=True, pool="attention")
    for side in (64, 128, 256, 512)
}

#: The published ADM U-Nets and noisy classifiers by name, e.g. ``ADM_models["ADM-256"]()``.
ADM_models = {
    **{name: _registered(UNetModel, preset, {"input_size": "image_size"}) for name, preset in _UNETS.items()},
    **{name: _registered(EncoderUNetModel, preset, {"input_size": "image_size", "num_classes": "out_channels"})
       for name, preset in _CLASSIFIERS.items()},
}
