"""Model FLOPs from explicit formulas, for honest throughput/MFU numbers.

Conventions (those of the DiT paper and of MFU reports): a multiply-add is 2 FLOPs; only matrix
multiplications, convolutions and attention score/value products are counted (norms, activations,
softmax and embedding lookups are not); a training step costs 3x the forward FLOPs (backward = 2x), and
activation-checkpoint recomputation is not counted (it is not model work). Each formula is checked
against ``torch.utils.flop_counter.FlopCounterMode`` in the tests and reproduces the papers' figures
(DiT-XL/2 118.6, U-ViT-H/2 133, U-DiT-B/L 22.2/85.0 GMACs at 256px). U-DiT trains in its
re-parameterisable form, which costs more than the merged form the paper quotes (U-DiT-B: 26.5 vs 22.2
GMACs); MFU counts what is actually computed. The text-conditioned DiT/U-DiT (our extension) add their
cross-attention (q/k/v/output projections, scores and values against the context tokens) and caption
embedders.
"""

from __future__ import annotations

from torch import nn

from bigdit.models.dit import DiT
from bigdit.models.udit import RepFFN, UDiT
from bigdit.models.uvit import UViT


def _cross_attention_macs(queries: int, context: int, width: int) -> int:
    """Multiply-adds of ``queries`` tokens cross-attending to ``context`` tokens at ``width``."""
    projections = 2 * queries * width * width + 2 * context * width * width  # q and output; k and v
    return projections + 2 * queries * context * width  # scores and values


def _caption_embedder_macs(model: DiT | UDiT, width: int) -> int:
    """Multiply-adds of a caption embedder (context_dim -> width -> width per token); 0 for the class form."""
    return model.context_tokens * ((model.context_dim or 0) * width + width * width)


def dit_forward_flops(model: DiT) -> int:
    """Forward FLOPs of one sample through a DiT (class- or text-conditional)."""
    d, p = model.hidden_size, model.patch_size
    tokens = (model.input_size // p) ** 2
    mlp = model.blocks[0].mlp.fc1.out_features if len(model.blocks) else 4 * d
    freq = model.t_embedder.frequency_embedding_size
    per_block = tokens * (4 * d * d + 2 * d * mlp) + 2 * tokens * tokens * d + 6 * d * d
    if model.context_dim is not None:
        per_block += _cross_attention_macs(tokens, model.context_tokens, d)
    macs = (
        tokens * p * p * model.in_channels * d  # patch embedding
        + freq * d + d * d  # timestep MLP
        + _caption_embedder_macs(model, d)
        + len(model.blocks) * per_block
        + 2 * d * d + tokens * d * p * p * model.out_channels  # final adaLN + linear
    )
    return 2 * macs


def uvit_forward_flops(model: UViT) -> int:
    """Forward FLOPs of one sample through a U-ViT (time/label/context tokens attend with the patches)."""
    d, p, c = model.hidden_size, model.patch_size, model.in_channels
    patches = (model.input_size // p) ** 2
    tokens = model.extras + patches
    blocks = model.repeated_blocks()
    mlp = blocks[0].mlp.fc1.out_features
    per_block = tokens * (4 * d * d + 2 * d * mlp) + 2 * tokens * tokens * d
    skips = sum(1 for b in blocks if b.skip_linear is not None)
    macs = (
        patches * p * p * c * d  # patch embedding
        + (8 * d * d if isinstance(model.time_embed, nn.Sequential) else 0)  # optional time MLP (D -> 4D -> D)
        + model.context_tokens * (model.context_dim or 0) * d  # CLIP token projection
        + len(blocks) * per_block
        + skips * tokens * 2 * d * d  # long-skip fusion (concat -> linear)
        + tokens * d * p * p * c  # decoder_pred runs on every token before the extras are dropped
        + (model.input_size**2 * c * c * 9 if isinstance(model.final_layer, nn.Conv2d) else 0)
    )
    return 2 * macs


def _udit_block_macs(block, width: int, side: int, context: int) -> int:
    """Multiply-adds of one U-DiT block (two attention + FFN sub-blocks) on a ``side`` x ``side`` grid.

    ``context``: caption tokens each sub-block cross-attends to in the text form.
    """
    tokens = side * side
    macs = 0
    subs = ((block.attn1, block.cross_attn1, block.mlp1), (block.attn2, block.cross_attn2, block.mlp2))
    for attn, cross, ffn in subs:
        f = attn.down_factor
        kernel = attn.downsampler.layer.kernel_size[0] ** 2
        macs += 6 * width * width  # adaLN modulation (per sample)
        macs += tokens * width * (kernel + 3 * width + width)  # depthwise downsampler, qkv, 1x1 out projection
        macs += 2 * tokens * tokens * width // (f * f)  # attention inside each of the f*f sub-grids
        if cross is not None:
            macs += _cross_attention_macs(tokens, context, width)
        h = ffn.hidden
        if isinstance(ffn, RepFFN):  # 1x1 pairs in and out, depthwise 5x5 + 3x3 + 1x1 in parallel
            macs += tokens * (width * h // 2 + h // 2 * h + h * (25 + 9 + 1) + h * h // 2 + h // 2 * width)
        else:  # merged: 1x1 in, depthwise 5x5, 1x1 out
            macs += tokens * (width * h + 25 * h + h * width)
    return macs


def udit_forward_flops(model: UDiT) -> int:
    """Forward FLOPs of one sample through a U-DiT (training or deploy form, class- or text-conditional)."""
    c, size, freq = model.x_embedder.proj.out_channels, model.input_size, model.t_embedder_1.frequency_embedding_size
    levels = [  # (blocks, width, grid side)
        (model.encoder_level_1, c, size), (model.encoder_level_2, 2 * c, size // 2), (model.latent, 4 * c, size // 4),
        (model.decoder_level_2, 2 * c, size // 2), (model.decoder_level_1, 2 * c, size),
    ]
    macs = size * size * model.in_channels * c * 9  # 3x3 patch embedding
    macs += sum(freq * w + w * w for w in (c, 2 * c, 4 * c))  # three timestep MLPs
    macs += sum(_caption_embedder_macs(model, w) for w in (c, 2 * c, 4 * c))
    macs += sum(_udit_block_macs(b, w, s, model.context_tokens) for blocks, w, s in levels for b in blocks)
    macs += size * size * c * (c // 2) * 9 + (size // 2) ** 2 * 2 * c * c * 9  # downsample convs
    macs += (size // 4) ** 2 * 4 * c * 8 * c * 9 + (size // 2) ** 2 * 2 * c * 4 * c * 9  # upsample convs
    macs += (size // 2) ** 2 * 4 * c * 2 * c + size * size * 2 * c * 2 * c  # channel reductions after skips
    macs += size * size * 2 * c * 2 * c * 9  # output 3x3 conv
    macs += 2 * c * 4 * c + size * size * 2 * c * model.out_channels * 9  # final adaLN + 3x3 projection
    return 2 * macs


def forward_flops(model: nn.Module) -> int | None:
    """Forward FLOPs of one sample through a DiT, U-DiT or U-ViT (None for an unknown backbone)."""
    if isinstance(model, DiT):
        return dit_forward_flops(model)
    if isinstance(model, UDiT):
        return udit_forward_flops(model)
    if isinstance(model, UViT):
        return uvit_forward_flops(model)
    return None


def train_flops_per_sample(model: nn.Module) -> int | None:
    """FLOPs of one training sample: forward + backward (2x forward); None where unknown."""
    fwd = forward_flops(model)
    return None if fwd is None else 3 * fwd
