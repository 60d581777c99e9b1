"""WebDataset shards (``shard-NNNNNN.tar``) and the deterministic shard-stream loader that reads them.

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

import contextlib
import io
import json
import tarfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigdit.batching import BatchPlan, stream_seed
from bigdit.codec import LatentCodec
from bigdit.data import keys_log, pin_batch, resolve_pin_memory
from bigdit.data.npy import npy_array, npy_bytes
from bigdit.data.schema import ARRAY_FIELDS, Manifest, SchemaError, ShardError, check_count, check_key, sample_problems
from bigdit.data.shard_dataset import ShardDataset, fetch
from bigdit.fsio import atomic_path

SUFFIX = ".tar"
#: field -> tar member extension (the part of a member name after the key's dot).
WDS_EXT = {"moments": "moments.npy", "moments_flip": "moments_flip.npy", "pixels": "pixels.npy",
           "clip_tokens": "clip_tokens.npy", "clip_pooled": "clip_pooled.npy", "repa_feats": "repa_feats.npy", "cls": "cls",
           "txt": "txt", "json": "json"}
EXT_FIELD = {v: k for k, v in WDS_EXT.items()}


# ----------------------------------------------------------------------------------------------- writing


class Writer:
    """One WebDataset shard, written in a ``with`` block: ``with Writer(root, name) as w: w.write(sample)``.

    The tar is written under a temporary name and renamed to ``<name>.tar`` when the block ends cleanly, or
    dropped when it raises (:func:`bigdit.fsio.atomic_path`), so a crash never leaves a truncated shard
    under the final name.
    """

    def __init__(self, root: str | Path, name: str):
        self.path = Path(root) / f"{name}{SUFFIX}"
        self.count = 0

    def __enter__(self) -> Writer:
        # Exited in reverse on __exit__: the tar is closed (its end-of-archive marker written, or after an
        # error not) before atomic_path renames or removes the file. The with only unwinds a failed open.
        with contextlib.ExitStack() as stack:
            tmp = stack.enter_context(atomic_path(self.path, exclusive=True))  # this rank owns the shard
            self._tar = stack.enter_context(tarfile.open(tmp, "w"))
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.__exit__(*exc)

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
                data = json.dumps(value).encode()
            else:
                data = str(value).encode()
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1


def fetch_shard(remote: str, root: str | Path, name: str) -> None:
    """Cache shard ``name`` of a remote dataset under ``root``."""
    fetch(remote, root, f"{name}{SUFFIX}")


def exists(root: str | Path, name: str) -> bool:
    """Whether shard ``name`` was completed (the final name only appears once a shard is whole)."""
    return (Path(root) / f"{name}{SUFFIX}").is_file()


def shard_bytes(root: str | Path, name: str) -> int:
    """Size of a finished shard on disk."""
    return (Path(root) / f"{name}{SUFFIX}").stat().st_size


# ----------------------------------------------------------------------------------------------- reading


def _decode_member(field: str, data: memoryview) -> Any:
    if field in ARRAY_FIELDS:
        return npy_array(data)
    if field == "cls":
        return int(bytes(data))
    if field == "json":
        return json.loads(bytes(data))
    return bytes(data).decode()


def _tar_files(raw: bytes, path: Path) -> Iterator[tuple[str, memoryview]]:
    """(name, data) of the regular files of an in-memory tar, checking header checksums and the end marker.

    A hand-rolled reader: ``tarfile`` costs more than decoding the samples, and it reads a tar cut at a
    member boundary as a clean end, where the missing end-of-archive marker says it is truncated.
    """
    view = memoryview(raw)
    off, n = 0, len(raw)
    long_name = None
    while off + 512 <= n:
        header = raw[off : off + 512]
        if header == _ZERO_BLOCK:
            return
        try:
            size = int(header[124:136].strip(b"\0 ") or b"0", 8)
            checksum = int(header[148:156].strip(b"\0 "), 8)
        except ValueError:
            raise ShardError(f"{path}: corrupt tar header at byte {off}") from None
        if checksum != sum(header) - sum(header[148:156]) + 8 * 32:
            raise ShardError(f"{path}: corrupt tar header at byte {off} (checksum)")
        start = off + 512
        if start + size > n:
            raise ShardError(f"{path}: truncated at byte {n}, inside a {size}-byte member")
        kind = header[156:157]
        if kind in (b"L", b"x"):  # GNU long name / pax header: the next member's path
            body = raw[start : start + size]
            if kind == b"L":
                long_name = body.rstrip(b"\0").decode()
            else:
                for rec in body.decode().splitlines():
                    if " path=" in rec:
                        long_name = rec.split(" path=", 1)[1]
        elif kind in (b"0", b"\0", b"7"):
            name = long_name
            if name is None:
                name = header[:100].split(b"\0", 1)[0].decode()
                prefix = header[345:500].split(b"\0", 1)[0]
                if prefix:
                    name = f"{prefix.decode()}/{name}"
            long_name = None
            yield name, view[start : start + size]
        off = start + (size + 511) // 512 * 512
    raise ShardError(f"{path}: truncated (no end-of-archive marker after byte {off})")


_ZERO_BLOCK = bytes(512)


def read_shard(root: str | Path, name: str, expected: int | None = None) -> Iterator[dict[str, Any]]:
    """Decoded samples of shard ``name``, in stored order.

    Raises :class:`ShardError` naming the shard and the last key for truncated or undecodable data, and
    when the shard holds other than ``expected`` samples.
    """
    path = Path(root) / f"{name}{SUFFIX}"
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ShardError(f"{path}: cannot read shard ({e})") from e
    sample: dict[str, Any] = {}
    key = None
    n = 0
    try:
        for member, data in _tar_files(raw, path):
            base = member.rsplit("/", 1)[-1]
            k, _, ext = base.partition(".")
            if k != key:
                if sample:
                    yield sample
                key, sample = k, {"key": k}
                n += 1
            field = EXT_FIELD.get(ext)
            if field is not None:
                try:
                    sample[field] = _decode_member(field, data)
                except (ValueError, UnicodeDecodeError, SchemaError) as e:
                    raise ShardError(f"{path}: sample {key!r}: cannot decode {base}: {e}") from e
    except ShardError as e:
        raise ShardError(f"{e} (after sample {key!r})") from e
    if sample:
        yield sample
    check_count(path, n, expected, key)


# ------------------------------------------------------------------------------------------- the loader


class ShardStreams:
    """The stream layout of one rank and the reading of its (rank, worker) streams.

    Holds no iterator state, so it pickles into DataLoader workers and no reference cycle keeps a
    loader's worker processes alive (their shutdown then happens promptly, not in the garbage collector).
    """

    def __init__(self, root: str, manifest: Manifest, world_size: int, rank: int, streams: int, micro_batch: int,
                 seed: int, shuffle: bool, skip_bad_samples: bool, shapes: dict[str, tuple], codec: LatentCodec,
                 remote: str | None = None):
        self.root, self.world_size, self.rank, self.streams = root, world_size, rank, streams
        self.codec, self.remote = codec, remote
        self.micro_batch, self.seed, self.shuffle, self.skip_bad_samples = micro_batch, seed, shuffle, skip_bad_samples
        self.shapes = shapes
        self.names = [s["name"] for s in manifest.shards]
        self.counts = np.array([s["count"] for s in manifest.shards], dtype=np.int64)
        #: fields training consumes besides the arrays (what the per-sample check asks for)
        self.required = ("cls",) if manifest.classes else ()
        self._epoch_batches: dict[int, int] = {}

    def shards_of(self, epoch: int, rank: int, stream: int) -> np.ndarray:
        """Shard indices read by ``(rank, stream)`` in ``epoch``, in reading order."""
        n = len(self.counts)
        order = np.random.default_rng(stream_seed(self.seed, epoch)).permutation(n) if self.shuffle else np.arange(n)
        return order[rank :: self.world_size][stream :: self.streams]

    def batches_per_stream(self, epoch: int) -> int:
        """Micro-batches every (rank, worker) stream yields in ``epoch`` (the minimum over all of them)."""
        if epoch not in self._epoch_batches:
            least = min(int(self.counts[self.shards_of(epoch, r, s)].sum())
                        for r in range(self.world_size) for s in range(self.streams))
            if least < self.micro_batch:
                raise ValueError(f"{self.root}: a worker stream holds {least} samples, fewer than one micro-batch "
                                 f"of {self.micro_batch}: use fewer workers or ranks, or more data")
            self._epoch_batches[epoch] = least // self.micro_batch
        return self._epoch_batches[epoch]

    def epoch_start(self, epoch: int) -> int:
        """A rank's micro-batch position where ``epoch`` begins."""
        return sum(self.streams * self.batches_per_stream(e) for e in range(epoch))

    def locate(self, pos: int) -> tuple[int, int]:
        """(epoch, micro-batch within the epoch) of a rank's micro-batch ``pos``."""
        epoch = 0
        while pos >= (per := self.streams * self.batches_per_stream(epoch)):
            pos -= per
            epoch += 1
        return epoch, pos

    def batches(self, epoch: int, stream: int, start: int) -> Iterator[dict[str, Any]]:
        """Stream ``stream``'s micro-batches of ``epoch`` that come at or after the rank's epoch batch ``start``."""
        m = self.micro_batch
        total = self.batches_per_stream(epoch)
        done = max(0, (start - stream + self.streams - 1) // self.streams)  # its batches before ``start``
        skip = done * m
        shards = self.shards_of(epoch, self.rank, stream)
        first = self.epoch_start(epoch) + stream  # position of this stream's batch 0 of the epoch
        buf: list[dict[str, Any]] = []
        bad = 0
        emitted = done
        lap = 0
        while emitted < total:
            kept = 0
            for shard in shards:
                if lap == 0 and skip >= self.counts[shard]:  # whole shards before the resume point are not read
                    skip -= int(self.counts[shard])
                    continue
                for sample in self._shard_samples(epoch, int(shard)):
                    if not isinstance(sample, ShardError):
                        problems = sample_problems(sample, self.shapes, self.required, finite=False)
                        if not problems:
                            if skip:
                                skip -= 1
                                continue
                            buf.append(sample)
                            kept += 1
                            if len(buf) == m:
                                yield self._collate(buf, bad, first + emitted * self.streams)
                                buf, bad = [], 0
                                emitted += 1
                                if emitted == total:
                                    return
                            continue
                        if not self.skip_bad_samples:
                            raise ShardError(f"{self.root}/{self.names[shard]}: sample {sample.get('key')!r}: "
                                             f"{'; '.join(problems)} (data.skip_bad_samples=true skips such samples)")
                    bad += 1
            # Only reached when skipped bad samples left the stream short: repeat its shards from the
            # start so every rank still yields the same number of batches (no DDP hang).
            lap += 1
            if lap > 1 and kept == 0:
                raise ShardError(f"{self.root}: no readable samples in the shards of worker stream {stream}")

    def _shard_samples(self, epoch: int, shard: int) -> list[dict[str, Any] | ShardError]:
        """Samples of one shard in this epoch's order; with skip_bad_samples, errors come back as values."""
        samples: list[dict[str, Any] | ShardError] = []
        if self.remote:  # fetched by the worker that reads it, just before reading
            fetch_shard(self.remote, self.root, self.names[shard])
        try:
            samples.extend(read_shard(self.root, self.names[shard], int(self.counts[shard])))
        except ShardError as e:
            if not self.skip_bad_samples:
                raise ShardError(f"{e} (data.skip_bad_samples=true skips bad samples and shards)") from e
            samples.extend([e] * max(int(self.counts[shard]) - len(samples), 1))
        if self.shuffle:
            order = np.random.default_rng(stream_seed(self.seed, epoch, shard)).permutation(len(samples))
            samples = [samples[i] for i in order]
        return samples

    def _collate(self, samples: list[dict[str, Any]], bad: int, pos: int) -> dict[str, Any]:
        """The micro-batch at rank position ``pos``, latents sampled (pixels flipped) here, in the worker, from a
        generator seeded by ``(seed, rank, pos)``: the training process only receives ``x``."""
        arrays = {name: torch.from_numpy(np.stack([s[name] for s in samples])) for name in self.shapes}
        g = torch.Generator().manual_seed(stream_seed(self.seed, self.rank, pos, 7))
        out: dict[str, Any] = {"key": [s["key"] for s in samples], "bad": bad, "pos": pos,
                               "x": self.codec.decode(arrays, generator=g),
                               "y": torch.tensor([s.get("cls", -1) for s in samples], dtype=torch.int64)}
        if "clip_tokens" in arrays:  # kept float16 as stored: half the copy; the model casts
            out["clip_tokens"], out["clip_pooled"] = arrays["clip_tokens"], arrays["clip_pooled"]
        if "repa_feats" in arrays:  # float16 as stored, like the text embeddings
            out["repa_feats"] = arrays["repa_feats"]
        return out


class _EpochDataset(torch.utils.data.IterableDataset):
    """One rank's streams for one epoch from micro-batch ``start`` on.

    DataLoader worker ``i`` plays logical stream ``(i + start) % streams``: the DataLoader takes its first
    batch from worker 0, and the rank's micro-batch ``start`` belongs to stream ``start % streams``.
    """

    def __init__(self, streams: ShardStreams, epoch: int, start: int):
        self.streams, self.epoch, self.start = streams, epoch, start

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        yield from self.streams.batches(self.epoch, (worker + self.start) % self.streams.streams, self.start)


def _raw_batches(streams: ShardStreams, pos: int, num_workers: int, prefetch_factor: int,
                 pin_memory: bool) -> Iterator[dict[str, Any]]:
    """A rank's raw micro-batches from position ``pos`` on, across epochs (one DataLoader per epoch)."""
    epoch, start = streams.locate(pos)
    while True:
        ds = _EpochDataset(streams, epoch, start)
        if num_workers == 0:
            yield from (pin_batch(b) for b in ds) if pin_memory else ds
        else:
            yield from torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers,
                                                   prefetch_factor=prefetch_factor, pin_memory=pin_memory)
        epoch, start = epoch + 1, 0


class WdsLoader(ShardDataset):
    """``data=wds``: the training loader over WebDataset tars (see the module docstring for the stream it reads).

    ``root`` is the shard directory, or with ``remote`` (s3://, gs://, ..., or a path) the local cache
    that the manifest and each shard are copied to before they are first read (the cache is not evicted).
    ``num_workers`` DataLoader processes per rank read and decode shards and sample the latents with
    :class:`bigdit.codec.LatentCodec` (0: all in the training process, with the sample order of one
    worker); ``prefetch_factor`` micro-batches are queued per worker. The latent noise and flip choices
    come from a generator seeded by ``(seed, rank, micro-batch position)``, so they do not depend on
    which worker made a batch or when. ``repa_feats`` (set by the training loop for REPA) adds the stored
    REPA features to each batch. ``record_keys``: the sample keys of every micro-batch go to ``keys_dir``
    (:class:`bigdit.data.KeysLog`).
    """

    format = "wds"

    def __init__(self, root: str, plan: BatchPlan, rank: int, seed: int, num_workers: int = 2,
                 prefetch_factor: int = 2, shuffle: bool = True, flip: bool = True,
                 skip_bad_samples: bool = False, pin_memory: bool | None = None, remote: str | None = None,
                 repa_feats: bool = False, record_keys: bool = False, keys_dir: str | None = None):
        shapes = self._open_shards(root, remote, flip, repa_feats)
        self.plan, self.rank, self.seed = plan, rank, int(seed)
        self.num_workers, self.prefetch_factor = int(num_workers), int(prefetch_factor)
        self.pin_memory = resolve_pin_memory(pin_memory)
        self.keys_log = keys_log(record_keys, keys_dir, rank)
        self.streams = ShardStreams(self.root, self.manifest, plan.world_size, rank,
                                    max(1, self.num_workers), plan.micro_batch, self.seed, shuffle, skip_bad_samples,
                                    shapes, self.codec, remote)
        needed = plan.world_size * self.streams.streams
        if len(self.manifest.shards) < needed:
            raise ValueError(f"{self.root} has {len(self.manifest.shards)} shards but {plan.world_size} rank(s) x "
                             f"{self.streams.streams} worker(s) need at least {needed}: lower data.num_workers "
                             f"or re-encode with a smaller shard_size")
        self._it: Iterator[dict[str, Any]] | None = None
        self._pos = 0  # micro-batch position the live iterator yields next
        #: samples skipped as bad (data.skip_bad_samples=true), counted on this rank
        self.bad_samples = 0

    def batches_per_stream(self, epoch: int) -> int:
        """Micro-batches each worker stream yields in ``epoch``; a rank's epoch is ``streams`` times that."""
        return self.streams.batches_per_stream(epoch)

    def raw_micro_batches(self, step: int) -> Iterator[dict[str, Any]]:
        """This rank's micro-batches of ``step`` with their bookkeeping: ``key`` (sample keys), ``pos``
        (micro-batch position) and ``bad`` (samples skipped before it) besides the training fields."""
        pos = step * self.plan.accum_steps
        if self._it is None or self._pos != pos:
            self.close()
            self._it = _raw_batches(self.streams, pos, self.num_workers, self.prefetch_factor, self.pin_memory)
        for _ in range(self.plan.accum_steps):
            batch = next(self._it)
            if batch["pos"] != pos:  # the interleaving invariant of the module docstring
                raise RuntimeError(f"{self.root}: micro-batch {batch['pos']} arrived at position {pos}")
            self._pos = pos = pos + 1
            if batch["bad"]:
                self.bad_samples += batch["bad"]
                warnings.warn(f"{self.root}: skipped {batch['bad']} bad sample(s) ({self.bad_samples} so far)",
                              stacklevel=2)
            yield batch

    def micro_batches(self, step: int) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's ``plan.accum_steps`` micro-batches of ``step``: ``x`` (model-space latents), ``y``,
        plus ``clip_tokens``/``clip_pooled`` (float16) when the shards carry text embeddings and
        ``repa_feats`` (float16) when asked for."""
        for micro, raw in enumerate(self.raw_micro_batches(step)):
            if self.keys_log:
                self.keys_log.write(step, micro, raw["key"])
            yield {k: v for k, v in raw.items() if k not in ("key", "pos", "bad")}

    def close(self) -> None:
        """Stop the worker processes now (they also stop when the loader is dropped)."""
        if self._it is not None:
            self._it.close()
            self._it = None

    def state_dict(self) -> dict[str, Any]:
        """Global progress: the micro-batch position (the same on every rank) and the stream layout."""
        return {"format": self.format, "position": self._pos, "world_size": self.plan.world_size,
                "streams": self.streams.streams, "micro_batch": self.plan.micro_batch, "seed": self.seed,
                "manifest_sha256": self.manifest_sha256}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Check the layout; the position itself follows from the step the loop resumes at."""
        if not state:
            return
        self.check_same_shards(state)
        saved = {k: state.get(k) for k in ("world_size", "streams", "micro_batch", "seed")}
        now = {"world_size": self.plan.world_size, "streams": self.streams.streams,
               "micro_batch": self.plan.micro_batch, "seed": self.seed}
        if saved != now:
            warnings.warn(f"resuming {self.root} with stream layout {now} instead of {saved}: the data order "
                          f"changes, so the rest of the run does not see what an uninterrupted run would",
                          stacklevel=2)
