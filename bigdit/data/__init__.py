"""Training data: the loader interface of the training loop, random-access sources, the batch plan.

The loop asks a loader for this rank's micro-batches of a step and checkpoints its ``state_dict``.
Loaders are built by hydra from the ``data`` config with ``plan``, ``rank`` and ``seed`` added.

For random-access sources (:class:`IndexedLoader`), a step's global batch is a fixed slice of one infinite stream (a fresh seeded permutation per epoch),
so which samples a step sees depends only on ``(seed, step)``: not on the number of ranks, the
micro-batch size, or whether the run was interrupted. The loader's whole state is the step counter.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from bigdit.batching import BatchPlan, stream_seed


def resolve_pin_memory(pin_memory: bool | None) -> bool:
    """``data.pin_memory``: null = on when training on a GPU. Batches in page-locked host memory let the loop's
    ``.to(device, non_blocking=True)`` copy asynchronously, overlapping the previous step's kernels."""
    return torch.cuda.is_available() if pin_memory is None else bool(pin_memory)


def pin_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """``batch`` with its tensors in page-locked memory (what a DataLoader with ``pin_memory`` does in its workers'
    pinning thread; used when batches are made in the training process)."""
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class KeysLog:
    """``data.record_keys=true``: the keys of the samples each rank consumed, per micro-batch, appended to
    ``<data.keys_dir>/rank-RRRRR.jsonl`` (one ``{"step", "micro", "keys"}`` line, flushed at once), so that a
    run's data order can be checked after the fact: a resumed run against an uninterrupted one, one node
    against two. A resumed run appends to the same file; for a step logged twice, the later line is the one
    that counted (the earlier one was read by an allocation that died before its next checkpoint)."""

    def __init__(self, directory: str | Path, rank: int):
        path = Path(directory) / f"rank-{rank:05d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the loader

    def write(self, step: int, micro: int, keys: Sequence[str]) -> None:
        """Record that this rank's micro-batch ``micro`` of ``step`` held ``keys``."""
        self._file.write(json.dumps({"step": step, "micro": micro, "keys": list(keys)}) + "\n")


def keys_log(record_keys: bool, keys_dir: str | None, rank: int) -> KeysLog | None:
    """The loaders' :class:`KeysLog` when ``data.record_keys`` is on, else None (nothing is written)."""
    if not record_keys:
        return None
    if not keys_dir:
        raise ValueError("data.record_keys=true needs data.keys_dir (the data configs set it to ${run.dir}/keys)")
    return KeysLog(keys_dir, rank)


class Loader(Protocol):
    """What the training loop consumes."""

    #: shape of one sample's ``x`` (C, H, W) as the model sees it
    sample_shape: tuple[int, int, int]
    #: number of class labels (0 for unconditional data)
    num_classes: int
    #: width of the cached CLIP token embeddings (``clip_tokens`` in each batch), None without text
    text_dim: int | None
    #: the cached empty-prompt CLIP tokens (T, D), what a dropped caption becomes; None without text
    empty_context: torch.Tensor | None
    #: the shards' record of the REPA features each batch carries as ``repa_feats`` (encoder, layer, tokens, dim;
    #: :class:`bigdit.data.schema.Manifest`), None when the batches carry none
    repa: dict[str, Any] | None
    #: samples this rank skipped as bad so far (``data.skip_bad_samples=true``); 0 for loaders that cannot meet any
    bad_samples: int

    def micro_batches(self, step: int) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's ``plan.accum_steps`` micro-batches of optimizer step ``step``: ``x`` and ``y``
        (and ``clip_tokens`` when ``text_dim`` is set, ``repa_feats`` when ``repa`` is)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


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


class IndexedLoader:
    """Loader over a random-access :class:`Source`: the global batch of step ``s`` is stream positions
    ``[s * global_batch, (s + 1) * global_batch)``, so the loader is stateless (its state is the step)."""

    #: in-memory sources have no text, no REPA features and no bad samples
    text_dim = None
    empty_context = None
    repa = None
    bad_samples = 0

    def __init__(self, source: Source, plan: BatchPlan, rank: int, seed: int):
        self.source = source
        self.plan = plan
        self.rank = rank
        self.sampler = EpochSampler(len(source), seed)
        self.sample_shape = source.sample_shape
        self.num_classes = source.num_classes

    def micro_batches(self, step: int) -> Iterator[dict[str, torch.Tensor]]:
        idx = self.sampler.indices(step * self.plan.global_batch, self.plan.global_batch)
        for micro in range(self.plan.accum_steps):
            yield self.source.get(idx[self.plan.span(self.rank, micro)])

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
