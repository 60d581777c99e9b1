"""How a step's global batch is split, and the seeds of its random draws: batching and seeding, shared by the
data loaders, the training loop and sampling (not data: the engine and sampling use them without any loader).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BatchPlan:
    """How a global batch splits into ranks and micro-batches (gradient accumulation)."""

    global_batch: int
    world_size: int
    micro_batch: int

    @property
    def per_rank(self) -> int:
        return self.global_batch // self.world_size

    @property
    def accum_steps(self) -> int:
        return self.per_rank // self.micro_batch

    def span(self, rank: int, micro: int) -> slice:
        """Positions of ``rank``'s micro-batch ``micro`` within the global batch."""
        start = rank * self.per_rank + micro * self.micro_batch
        return slice(start, start + self.micro_batch)

    @classmethod
    def from_config(cls, global_batch: int, micro_batch: int | None, world_size: int) -> BatchPlan:
        """Validate ``run.global_batch``/``run.micro_batch`` against the number of ranks."""
        if global_batch % world_size:
            raise ValueError(f"run.global_batch={global_batch} is not divisible by {world_size} ranks")
        per_rank = global_batch // world_size
        micro = per_rank if micro_batch is None else int(micro_batch)
        if micro <= 0 or per_rank % micro:
            raise ValueError(
                f"run.micro_batch={micro_batch} must divide the per-rank batch {per_rank} "
                f"(run.global_batch={global_batch} / {world_size} ranks)"
            )
        return cls(global_batch, world_size, micro)


def stream_seed(*words: int) -> int:
    """A 63-bit seed mixed from integers (e.g. run seed, step), stable across processes and versions."""
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(1, np.uint64)[0] >> 1)
