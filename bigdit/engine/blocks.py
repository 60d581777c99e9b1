"""Per-block options every strategy honours: activation checkpointing and ``torch.compile``.

Both are applied to the blocks a model declares (``model.repeated_blocks()``) in place, without wrapper
modules, so parameter names and checkpoints stay identical to the bare model's.
"""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint


def _checkpointed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        # Non-reentrant checkpointing works with FSDP2/ZeRO-3 parameter gathering and keyword arguments.
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def apply_block_options(model: nn.Module, activation_checkpointing: bool = False, compile: bool = False) -> nn.Module:
    """Recompute each block's activations in backward and/or compile each block, in place."""
    blocks = model.repeated_blocks()
    for block in blocks:
        if activation_checkpointing:
            block.forward = _checkpointed(block.forward)
        if compile:
            block.compile()
    return model
