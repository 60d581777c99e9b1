"""Training data: sources of samples and the deterministic global-batch sampler.

A step's global batch is a fixed slice of one infinite stream (a fresh seeded permutation per epoch),
so which samples a step sees depends only on ``(seed, step)``: not on the number of ranks, the
micro-batch size, or whether the run was interrupted. The loader's whole state is the step counter.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch


class Source(Protocol):
    """A random-access set of training samples."""

    #: shape of one sample's ``x`` (C, H, W)
    sample_shape: tuple[int, int, int]
    #: number of class labels (0 for unconditional data)
    num_classes: int

    def __len__(self) -> int: ...

    def get(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        """Samples at ``indices`` as a batch: ``x`` (N, C, H, W) float32 and ``y`` (N,) int64."""
        ...


def stream_seed(*words: int) -> int:
    """A 63-bit seed mixed from integers (e.g. run seed, step), stable across processes and versions."""
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(1, np.uint64)[0] >> 1)


class EpochSampler:
    """Positions ``[start, start + count)`` of the stream of per-epoch permutations of ``range(n)``."""

    def __init__(self, n: int, seed: int):
        if n <= 0:
            raise ValueError("the dataset is empty")
        self.n = n
        self.seed = seed
        self._epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._perm = np.random.default_rng(stream_seed(self.seed, epoch)).permutation(self.n)
            self._epoch = epoch
        return self._perm

    def indices(self, start: int, count: int) -> np.ndarray:
        """Dataset indices for stream positions ``start .. start + count - 1``."""
        out = np.empty(count, dtype=np.int64)
        pos = start
        while pos < start + count:
            epoch, offset = divmod(pos, self.n)
            take = min(self.n - offset, start + count - pos)
            out[pos - start : pos - start + take] = self._permutation(epoch)[offset : offset + take]
            pos += take
        return out
