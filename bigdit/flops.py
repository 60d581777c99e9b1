"""Model FLOPs from explicit formulas, for honest throughput/MFU numbers.

Conventions (those of the DiT paper and of MFU reports): a multiply-add is 2 FLOPs; only matrix
multiplications, convolutions and attention score/value products are counted (norms, activations,
softmax and embedding lookups are not); a training step costs 3x the forward FLOPs (backward = 2x), and
activation-checkpoint recomputation is not counted (it is not model work). Each formula is checked
against ``torch.utils.flop_counter.FlopCounterMode`` in the tests.
"""

from __future__ import annotations

from torch import nn

from bigdit.models.dit import DiT
from bigdit.models.uvit import UViT


def dit_forward_flops(model: DiT) -> int:
    """Forward FLOPs of one sample through a DiT."""
    d, p = model.hidden_size, model.patch_size
    tokens = (model.input_size // p) ** 2
    mlp = model.blocks[0].mlp.fc1.out_features if len(model.blocks) else 4 * d
    freq = model.t_embedder.frequency_embedding_size
    per_block = tokens * (4 * d * d + 2 * d * mlp) + 2 * tokens * tokens * d + 6 * d * d
    macs = (
        tokens * p * p * model.in_channels * d  # patch embedding
        + freq * d + d * d  # timestep MLP
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


def forward_flops(model: nn.Module) -> int | None:
    """Forward FLOPs of one sample, or None for a backbone without a formula yet (U-DiT)."""
    if isinstance(model, DiT):
        return dit_forward_flops(model)
    if isinstance(model, UViT):
        return uvit_forward_flops(model)
    return None


def train_flops_per_sample(model: nn.Module) -> int | None:
    """FLOPs of one training sample: forward + backward (2x forward); None where unknown."""
    fwd = forward_flops(model)
    return None if fwd is None else 3 * fwd
