"""WebDataset shards (``shard-NNNNNN.tar``) and the shard-stream loader used by both shard formats.

The stream: a sharded dataset is read as ``world_size x streams`` independent shard streams, one per
(rank, worker). Each epoch the shard list is permuted with ``(seed, epoch)`` and dealt round-robin to
ranks, then to the workers of a rank; a worker reads its shards in order, shuffles samples inside each
shard with ``(seed, epoch, shard)``, and cuts them into micro-batches. A rank's micro-batch ``j`` comes
from worker ``j % streams``, which is how ``torch.utils.data.DataLoader`` interleaves workers, so the
sequence is a pure function of ``(seed, world_size, streams, micro_batch)`` and never of worker timing.

Every (rank, worker) stream yields the same number of micro-batches per epoch (the minimum over all
streams, computed from the manifest's shard counts), so all ranks see the same number of steps and DDP
never waits on a rank that ran out of data. The position in the stream is ``step * accum_steps``
micro-batches, identical on all ranks; resuming at any step rebuilds the streams at that position
(whole shards are skipped by their counts), so a resumed run sees exactly the samples of an
uninterrupted one.
"""

from __future__ import annotations

import io
import os
import tarfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigdit.codec import LatentCodec
from bigdit.data import BatchPlan, stream_seed
from bigdit.data.schema import EXT_FIELD, WDS_EXT, Manifest, SchemaError, check_key, npy_array, npy_bytes

SUFFIX = ".tar"


class ShardError(RuntimeError):
    """A corrupt or truncated shard, or a bad sample in it (the message names the shard and key)."""


def shard_name(index: int) -> str:
    """Canonical name (without suffix) of shard ``index``."""
    return f"shard-{index:06d}"


# ----------------------------------------------------------------------------------------------- writing


class Writer:
    """Writes one WebDataset shard to ``<name>.tar.tmp`` and renames it to ``<name>.tar`` on :meth:`close`,
    so a crash never leaves a truncated shard under the final name."""

    def __init__(self, root: str | Path, name: str):
        self.path = Path(root) / f"{name}{SUFFIX}"
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self._tar = tarfile.open(self.tmp, "w")
        self.count = 0
        self.bytes = 0

    def write(self, sample: dict[str, Any]) -> None:
        """Append one sample (see :mod:`bigdit.data.schema`)."""
        key = check_key(sample["key"])
        for name, ext in WDS_EXT.items():
            if sample.get(name) is None:
                continue
            value = sample[name]
            if isinstance(value, np.ndarray):
                data = npy_bytes(value)
            elif name == "json":
                import json

                data = json.dumps(value).encode()
            else:
                data = str(value).encode()
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            self._tar.addfile(info, io.BytesIO(data))
            self.bytes += len(data)
        self.count += 1

    def close(self) -> Path:
        """Finish the shard and move it under its final name."""
        self._tar.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the partial shard."""
        self._tar.close()
        self.tmp.unlink(missing_ok=True)


def exists(root: str | Path, name: str) -> bool:
    """Whether shard ``name`` was completed (the final name only appears once a shard is whole)."""
    return (Path(root) / f"{name}{SUFFIX}").is_file()


def shard_bytes(root: str | Path, name: str) -> int:
    """Size of a finished shard on disk."""
    return (Path(root) / f"{name}{SUFFIX}").stat().st_size


# ----------------------------------------------------------------------------------------------- reading


def _decode_member(field: str, data: bytes) -> Any:
    if field in ("moments", "moments_flip", "clip_tokens", "clip_pooled"):
        return npy_array(data)
    if field == "cls":
        return int(data)
    if field == "json":
        import json

        return json.loads(data)
    return data.decode()


def read_shard(root: str | Path, name: str) -> Iterator[dict[str, Any]]:
    """Decoded samples of shard ``name``, in stored order.

    Raises :class:`ShardError` naming the shard and the last key for truncated or undecodable data.
    """
    path = Path(root) / f"{name}{SUFFIX}"
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ShardError(f"{path}: cannot read shard ({e})") from e
    sample: dict[str, Any] = {}
    key = None
    try:
        # Parsing from memory: one read per shard, and tarfile's stream mode keeps no member index.
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                base = info.name.rsplit("/", 1)[-1]
                k, _, ext = base.partition(".")
                if k != key:
                    if sample:
                        yield sample
                    key, sample = k, {"key": k}
                data = tar.extractfile(info).read()
                if len(data) != info.size:
                    raise ShardError(f"{path}: truncated shard at sample {key!r} ({base})")
                field = EXT_FIELD.get(ext)
                if field is not None:
                    try:
                        sample[field] = _decode_member(field, data)
                    except (ValueError, SchemaError) as e:
                        raise ShardError(f"{path}: sample {key!r}: cannot decode {base}: {e}") from e
    except tarfile.TarError as e:
        raise ShardError(f"{path}: corrupt or truncated shard after sample {key!r} ({e})") from e
    if sample:
        yield sample


# ------------------------------------------------------------------------------------------- the loader


def _check_sample(sample: dict[str, Any], shapes: dict[str, tuple[int, ...]], need_cls: bool) -> str | None:
    """Cheap per-sample check of what training consumes (tools/shards.py verify does the full check)."""
    for name, shape in shapes.items():
        a = sample.get(name)
        if a is None:
            return f"missing field {name!r}"
        if a.shape != shape or a.dtype != np.float16:
            return f"{name} is {a.dtype}{tuple(a.shape)}, expected float16{shape}"
    if need_cls and "cls" not in sample:
        return "missing field 'cls'"
    return None


class _Streams(torch.utils.data.IterableDataset):
    """The worker streams of one rank for one epoch, starting at micro-batch ``start`` of the epoch.

    DataLoader worker ``i`` plays logical stream ``(i + start) % streams``: the DataLoader takes its first
    batch from worker 0, and the rank's micro-batch ``start`` belongs to stream ``start % streams``.
    """

    def __init__(self, loader: ShardLoader, epoch: int, start: int):
        self.loader = loader
        self.epoch = epoch
        self.start = start

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        ld = self.loader
        if info is None and ld.streams > 1:
            # In-process: interleave the logical streams the way the DataLoader interleaves workers.
            its = [ld._stream_batches(self.epoch, (i + self.start) % ld.streams, self.start)
                   for i in range(ld.streams)]
            while its:
                for it in list(its):
                    try:
                        yield next(it)
                    except StopIteration:
                        its.remove(it)
            return
        yield from ld._stream_batches(self.epoch, (worker + self.start) % ld.streams, self.start)


class ShardLoader:
    """Training loader over a shard directory (see the module docstring for the stream it reads).

    ``num_workers`` DataLoader processes read and decode shards (0: in the training process, with the
    same sample order as one worker); ``prefetch_factor`` micro-batches are queued per worker. Latents
    are sampled in the training process by :class:`bigdit.codec.LatentCodec` with a generator seeded by
    ``(seed, rank, micro-batch position)``, so they do not depend on worker timing either.
    """

    format = "wds"

    def __init__(self, root: str, plan: BatchPlan, rank: int, seed: int, num_workers: int = 2,
                 prefetch_factor: int = 2, shuffle: bool = True, flip: bool = True,
                 skip_bad_samples: bool = False, pin_memory: bool = False):
        self.root = str(root)
        self.manifest = Manifest.load(self.root)
        if self.manifest.format != self.format:
            raise SchemaError(f"{self.root} holds {self.manifest.format} shards: use data={self.manifest.format}")
        self.plan, self.rank, self.seed = plan, rank, int(seed)
        self.num_workers = int(num_workers)
        self.streams = max(1, self.num_workers)
        self.prefetch_factor = int(prefetch_factor)
        self.shuffle, self.skip_bad_samples, self.pin_memory = shuffle, skip_bad_samples, pin_memory
        self.codec = LatentCodec.from_manifest(self.manifest, use_flip=flip)
        self.sample_shape = tuple(self.manifest.latent_shape)
        self.num_classes = self.manifest.num_classes
        self.text_dim = None if self.manifest.text is None else int(self.manifest.text["dim"])
        self._shapes = {k: v for k, v in self.manifest.shapes().items() if k != "moments_flip" or flip}
        self._counts = np.array([s["count"] for s in self.manifest.shards], dtype=np.int64)
        n_streams = plan.world_size * self.streams
        if len(self._counts) < n_streams:
            raise ValueError(f"{self.root} has {len(self._counts)} shards but {plan.world_size} rank(s) x "
                             f"{self.streams} worker(s) need at least {n_streams}: lower data.num_workers "
                             f"or re-encode with a smaller shard_size")
        self._epoch_batches: dict[int, int] = {}
        self._it: Iterator[dict[str, Any]] | None = None
        self._pos = -1  # micro-batch position the live iterator yields next
        #: samples skipped as bad (data.skip_bad_samples=true), summed over this process's workers
        self.bad_samples = 0

    # -- the stream layout

    def _shards_of(self, epoch: int, rank: int, stream: int) -> np.ndarray:
        n = len(self._counts)
        order = (np.random.default_rng(stream_seed(self.seed, epoch)).permutation(n) if self.shuffle
                 else np.arange(n))
        return order[rank :: self.plan.world_size][stream :: self.streams]

    def batches_per_stream(self, epoch: int) -> int:
        """Micro-batches every (rank, worker) stream yields in ``epoch`` (the minimum over all of them)."""
        if epoch not in self._epoch_batches:
            least = min(int(self._counts[self._shards_of(epoch, r, s)].sum())
                        for r in range(self.plan.world_size) for s in range(self.streams))
            self._epoch_batches[epoch] = least // self.plan.micro_batch
            if self._epoch_batches[epoch] == 0:
                raise ValueError(f"{self.root}: a worker stream holds {least} samples, fewer than one micro-batch "
                                 f"of {self.plan.micro_batch}: use fewer workers or ranks, or more data")
        return self._epoch_batches[epoch]

    def _locate(self, pos: int) -> tuple[int, int]:
        """(epoch, micro-batch within the epoch) of this rank's micro-batch ``pos``."""
        epoch = 0
        while pos >= (per := self.streams * self.batches_per_stream(epoch)):
            pos -= per
            epoch += 1
        return epoch, pos

    def _stream_batches(self, epoch: int, stream: int, start: int) -> Iterator[dict[str, Any]]:
        """Stream ``stream``'s micro-batches of ``epoch``, from the first one at or after epoch batch ``start``."""
        m = self.plan.micro_batch
        total = self.batches_per_stream(epoch)
        done = max(0, (start - stream + self.streams - 1) // self.streams)  # its batches before ``start``
        if done >= total:
            return
        skip = done * m
        shards = self._shards_of(epoch, self.rank, stream)
        buf: list[dict[str, Any]] = []
        bad = 0
        emitted = done
        need_cls = bool(self.manifest.classes)
        lap = 0
        while emitted < total:
            kept = 0
            for shard in shards:
                count = int(self._counts[shard])
                if lap == 0 and skip >= count:  # whole shards before the resume point are not read
                    skip -= count
                    continue
                for sample in self._shard_samples(epoch, int(shard)):
                    if isinstance(sample, ShardError):
                        bad += 1
                        continue
                    problem = _check_sample(sample, self._shapes, need_cls)
                    if problem is not None:
                        name = self.manifest.shards[shard]["name"]
                        if not self.skip_bad_samples:
                            raise ShardError(f"{self.root}/{name}: sample {sample.get('key')!r}: {problem} "
                                             f"(data.skip_bad_samples=true skips such samples)")
                        bad += 1
                        continue
                    if skip:
                        skip -= 1
                        continue
                    buf.append(sample)
                    kept += 1
                    if len(buf) == m:
                        yield self._collate(buf, bad)
                        buf, bad = [], 0
                        emitted += 1
                        if emitted == total:
                            return
            # Only reached when skipped bad samples left the stream short: repeat its shards from the
            # start so every rank still yields the same number of batches (no DDP hang).
            lap += 1
            if lap > 1 and kept == 0:
                raise ShardError(f"{self.root}: no readable samples in the shards of worker stream {stream}")

    def _shard_samples(self, epoch: int, shard: int) -> Iterator[dict[str, Any] | ShardError]:
        """Samples of one shard in this epoch's order; with skip_bad_samples, errors come back as values."""
        name = self.manifest.shards[shard]["name"]
        samples = []
        try:
            for s in self._read(name):
                samples.append(s)
        except ShardError as e:
            if not self.skip_bad_samples:
                raise ShardError(f"{e} (data.skip_bad_samples=true skips bad samples and shards)") from e
            missing = int(self._counts[shard]) - len(samples)
            samples.extend([e] * max(missing, 1))
        if self.shuffle:
            order = np.random.default_rng(stream_seed(self.seed, epoch, shard)).permutation(len(samples))
            samples = [samples[i] for i in order]
        yield from samples

    def _read(self, name: str) -> Iterator[dict[str, Any]]:
        return read_shard(self.root, name)

    def _collate(self, samples: list[dict[str, Any]], bad: int) -> dict[str, Any]:
        out: dict[str, Any] = {"key": [s["key"] for s in samples], "bad": bad,
                               "moments": torch.from_numpy(np.stack([s["moments"] for s in samples]))}
        out["y"] = torch.tensor([s.get("cls", -1) for s in samples], dtype=torch.int64)
        if "moments_flip" in self._shapes:
            out["moments_flip"] = torch.from_numpy(np.stack([s["moments_flip"] for s in samples]))
        if "clip_tokens" in self._shapes:
            out["clip_tokens"] = torch.from_numpy(np.stack([s["clip_tokens"] for s in samples]))
            out["clip_pooled"] = torch.from_numpy(np.stack([s["clip_pooled"] for s in samples]))
        return out

    # -- iteration

    def _raw_batches(self, pos: int) -> Iterator[dict[str, Any]]:
        """This rank's raw (undecoded-latent) micro-batches from position ``pos`` on, across epochs."""
        epoch, start = self._locate(pos)
        while True:
            ds = _Streams(self, epoch, start)
            if self.num_workers == 0:
                yield from iter(ds)
            else:
                dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                                                 prefetch_factor=self.prefetch_factor, pin_memory=self.pin_memory,
                                                 persistent_workers=False, in_order=True)
                yield from dl
            epoch, start = epoch + 1, 0

    def raw_micro_batches(self, step: int) -> Iterator[dict[str, Any]]:
        """This rank's micro-batches of ``step`` before latent sampling (keys, moments, labels)."""
        pos = step * self.plan.accum_steps
        if self._it is None or self._pos != pos:
            self._it = self._raw_batches(pos)
        for _ in range(self.plan.accum_steps):
            batch = next(self._it)
            self._pos = pos + 1
            self.bad_samples += batch["bad"]
            if batch["bad"]:
                warnings.warn(f"{self.root}: skipped {batch['bad']} bad sample(s) ({self.bad_samples} so far)",
                              stacklevel=2)
            yield batch
            pos += 1

    def micro_batches(self, step: int) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's ``plan.accum_steps`` micro-batches of ``step``: ``x`` (model-space latents), ``y``,
        plus ``clip_tokens``/``clip_pooled`` (float32) when the shards carry text embeddings."""
        for i, raw in enumerate(self.raw_micro_batches(step)):
            pos = step * self.plan.accum_steps + i
            g = torch.Generator().manual_seed(stream_seed(self.seed, self.rank, pos, 7))
            out = {"x": self.codec.sample(raw["moments"], raw.get("moments_flip"), generator=g), "y": raw["y"]}
            if "clip_tokens" in raw:
                out["clip_tokens"] = raw["clip_tokens"].float()
                out["clip_pooled"] = raw["clip_pooled"].float()
            yield out

    def state_dict(self) -> dict[str, Any]:
        """Global progress: the micro-batch position (the same on every rank) and the stream layout."""
        return {"format": self.format, "position": max(self._pos, 0), "world_size": self.plan.world_size,
                "streams": self.streams, "micro_batch": self.plan.micro_batch, "seed": self.seed,
                "bad_samples": self.bad_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Check the layout; the position itself follows from the step the loop resumes at."""
        if not state:
            return
        layout = {k: state.get(k) for k in ("world_size", "streams", "micro_batch", "seed")}
        now = {"world_size": self.plan.world_size, "streams": self.streams, "micro_batch": self.plan.micro_batch,
               "seed": self.seed}
        if layout != now:
            warnings.warn(f"resuming {self.root} with stream layout {now} instead of {layout}: the data order "
                          f"changes, so the rest of the epoch is not the one an uninterrupted run would see",
                          stacklevel=2)
        self.bad_samples = int(state.get("bad_samples", 0))


class WdsLoader(ShardLoader):
    """``data=wds``: the shard-stream loader over WebDataset tars."""

    format = "wds"
