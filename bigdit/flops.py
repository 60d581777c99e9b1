"""Model FLOPs from explicit formulas, for honest throughput/MFU numbers.

Each backbone counts itself: ``DiT``, ``UDiT``, ``UViT`` and ADM's ``UNetModel``/``EncoderUNetModel`` have a
``forward_flops()`` method (forward FLOPs of one sample) next to the modules it counts, so a new model brings
its own formula and nothing here reaches into model internals. This module holds the shared conventions and
the training multiplier.

Conventions (those of the DiT paper and of MFU reports): a multiply-add is 2 FLOPs; only matrix
multiplications, convolutions and attention score/value products are counted (norms, activations, softmax and
embedding lookups are not); a training step costs 3x the forward FLOPs (backward = 2x), and
activation-checkpoint recomputation is not counted (it is not model work). Each formula is checked against
``torch.utils.flop_counter.FlopCounterMode`` in the tests and reproduces the papers' figures (DiT-XL/2 118.6,
U-ViT-H/2 133, U-DiT-B/L 22.2/85.0, ADM 1,120 GMACs at 256px; ADM's resampling by interpolation and pooling
counts as free). U-DiT trains in its re-parameterisable form, which costs more than the merged form the paper
quotes (U-DiT-B: 26.5 vs 22.2 GMACs); MFU counts what is actually computed. The text-conditioned DiT/U-DiT
(our extension) add their cross-attention (q/k/v/output projections, scores and values against the context
tokens) and caption embedders.
"""

from __future__ import annotations

from torch import nn


def train_flops_per_sample(model: nn.Module) -> int | None:
    """FLOPs of one training sample: forward + backward (2x forward); None for a model without ``forward_flops``."""
    forward_flops = getattr(model, "forward_flops", None)
    return None if forward_flops is None else 3 * forward_flops()
