"""Random latents of a given shape: for benchmarks and smoke tests of the step, never for training."""

from __future__ import annotations

import numpy as np
import torch


class Synthetic:
    """``size`` fixed N(0, 1) samples of ``shape`` (C, H, W) with random labels in ``[0, num_classes)``."""

    def __init__(self, shape: tuple[int, int, int] = (4, 32, 32), num_classes: int = 1000, size: int = 1024,
                 seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.sample_shape = tuple(shape)
        self.num_classes = num_classes
        self.x = torch.randn((size, *self.sample_shape), generator=g)
        self.y = torch.randint(0, max(1, num_classes), (size,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def get(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        idx = torch.from_numpy(indices)
        return {"x": self.x[idx], "y": self.y[idx]}
