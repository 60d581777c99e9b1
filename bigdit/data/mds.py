"""MosaicML Streaming (MDS) shards and the ``data=mds`` loader.

Each work shard ``shard-NNNNNN`` is one MDS directory (``index.json`` + ``shard.*.mds``) written by
``streaming.MDSWriter`` (:class:`Writer`); a finished directory also gets a root ``index.json``
(:func:`merge_index`, written by :func:`bigdit.data.shards.save_manifest`), so the whole dataset opens
directly with ``streaming.StreamingDataset(local=root)``, which is how the training loader
(:class:`MdsLoader`) reads it. :func:`read_shard` decodes one shard directory on its own, for
``tools/shards.py`` (inspect, verify, convert).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigdit.batching import BatchPlan, stream_seed
from bigdit.data import keys_log, resolve_pin_memory
from bigdit.data.schema import ShardError, check_count, check_key, sample_problems
from bigdit.data.shard_dataset import ShardDataset
from bigdit.fsio import temp_name, write_atomic

#: MDS column encodings of the sample fields.
MDS_COLUMNS = {"key": "str", "moments": "ndarray", "moments_flip": "ndarray", "pixels": "ndarray", "cls": "int",
               "txt": "str", "clip_tokens": "ndarray", "clip_pooled": "ndarray", "repa_feats": "ndarray", "json": "json"}

# streaming is imported inside the functions that use it: importing it takes seconds, and the tools that
# only dispatch between formats (bigdit.data.shards) import this module whatever the format.


class Writer:
    """One MDS shard directory, written in a ``with`` block: ``with Writer(root, name) as w: w.write(sample)``.

    ``streaming.MDSWriter`` writes into a temporary directory (:func:`bigdit.fsio.temp_name`), renamed to
    ``<name>/`` when the block ends cleanly and removed when it raises. A directory cannot go through
    :func:`bigdit.fsio.atomic_path` (which syncs one file), hence the rename here.
    """

    def __init__(self, root: str | Path, name: str):
        self.path = Path(root) / name
        self.tmp = temp_name(self.path)
        self.columns: list[str] = []
        self._writer = None
        self.count = 0

    def __enter__(self) -> Writer:
        # This rank owns the shard: temporary directories of killed earlier attempts go.
        for stale in self.path.parent.glob(f".{glob.escape(self.path.name)}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        return self

    def write(self, sample: dict[str, Any]) -> None:
        """Append one sample (see :mod:`bigdit.data.schema`); the first sample fixes the columns."""
        check_key(sample["key"])
        row = {k: v for k, v in sample.items() if k in MDS_COLUMNS and v is not None}
        if self._writer is None:
            from streaming import MDSWriter

            self.columns = list(row)
            self._writer = MDSWriter(out=str(self.tmp), columns={k: MDS_COLUMNS[k] for k in self.columns},
                                     size_limit=1 << 31)
        missing = [c for c in self.columns if c not in row]
        if missing:
            raise ValueError(f"sample {sample['key']!r} lacks {missing}: every sample of a shard needs the same fields")
        self._writer.write({c: row[c] for c in self.columns})
        self.count += 1

    def __exit__(self, exc_type: type[BaseException] | None, *_: Any) -> None:
        """Finish the shard and move it under its final name; after an error, drop it."""
        try:
            if self._writer is not None:
                self._writer.finish()  # also after an error: it closes the shard file it holds open
            if exc_type is None:
                if self._writer is None:
                    raise ValueError(f"{self.path}: no samples written")
                if self.path.exists():
                    shutil.rmtree(self.path)
                os.replace(self.tmp, self.path)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)  # gone after the rename; a partial shard otherwise


def exists(root: str | Path, name: str) -> bool:
    """Whether shard ``name`` was completed (the directory gets its final name only once it is whole)."""
    return (Path(root) / name / "index.json").is_file()


def shard_bytes(root: str | Path, name: str) -> int:
    """Size of a finished shard on disk."""
    return sum(p.stat().st_size for p in (Path(root) / name).iterdir())


def read_shard(root: str | Path, name: str, expected: int | None = None) -> Iterator[dict[str, Any]]:
    """Decoded samples of shard ``name``, in stored order; :class:`ShardError` names the shard and key
    (also when it holds other than ``expected`` samples)."""
    from streaming.base.format import reader_from_json

    d = Path(root) / name
    try:
        index = json.loads((d / "index.json").read_text())
    except (OSError, ValueError) as e:
        raise ShardError(f"{d}: unreadable MDS index ({e})") from e
    n = 0
    key = None
    for obj in index["shards"]:
        reader = reader_from_json(str(d), None, obj)
        path = d / obj["raw_data"]["basename"]
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise ShardError(f"{path}: cannot read shard ({e})") from e
        count = obj["samples"]
        if len(raw) != obj["raw_data"]["bytes"] or len(raw) < 4 * (count + 2):
            raise ShardError(f"{path}: truncated shard ({len(raw)} of {obj['raw_data']['bytes']} bytes)")
        offsets = np.frombuffer(raw, np.uint32, count + 1, offset=4)
        for i in range(count):
            try:
                sample = reader.decode_sample(raw[offsets[i] : offsets[i + 1]])
            except Exception as e:  # any decoding failure means corrupt bytes
                raise ShardError(f"{path}: corrupt sample {i} after key {key!r} ({e})") from e
            key = sample.get("key")
            n += 1
            yield sample
    check_count(d, n, expected, key)


def __getattr__(name: str):
    """``ValidatingDataset``, the ``StreamingDataset`` subclass, is built on first use (importing streaming
    takes seconds); this makes it picklable by name for spawned DataLoader workers."""
    if name == "ValidatingDataset":
        return _validating_dataset()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_DATASET_CLASS = None
#: whether this process cleaned streaming's stale shared memory (done once: it would also remove the
#: live shared memory of this process's earlier loaders)
_CLEANED = False


def _validating_dataset():
    global _DATASET_CLASS
    if _DATASET_CLASS is None:
        from streaming import StreamingDataset

        class ValidatingDataset(StreamingDataset):
            """``StreamingDataset`` whose samples carry their global index (seeding their latent noise)
            and pass the per-sample check of what training consumes; a sample that cannot be read or fails
            the check raises :class:`ShardError` naming its shard file and key, or with
            ``skip_bad_samples`` comes back as ``{"bad": reason, "index": i}`` (replaced when batched)."""

            def configure(self, root: str, shapes: dict[str, tuple], required: tuple[str, ...],
                          skip_bad_samples: bool):
                self.bigdit = (root, shapes, required, skip_bad_samples)
                return self

            def get_item(self, sample_id: int, retry: int = 7) -> Any:
                root, shapes, required, skip = self.bigdit
                sample = None
                try:
                    sample = super().get_item(sample_id, retry)
                    problem = "; ".join(sample_problems(sample, shapes, required, finite=False))
                except Exception as e:  # any decoding failure means corrupt or truncated bytes
                    problem = f"cannot decode it ({type(e).__name__}: {e})"
                if not problem:
                    sample["index"] = sample_id
                    return sample
                shard_id, k = self.spanner[sample_id]
                shard = self.shards[shard_id]
                if sample is not None and sample.get("key"):
                    key = f"key {sample['key']!r}"
                else:
                    key = f"key unreadable, the last readable key before it {_key_before(shard, k)!r}"
                reason = f"{root}/{shard.raw_data.basename}: sample {k}, {key}: {problem}"
                if not skip:
                    raise ShardError(f"{reason} (data.skip_bad_samples=true skips bad samples)")
                return {"bad": reason, "index": sample_id}

        ValidatingDataset.__module__ = __name__
        ValidatingDataset.__qualname__ = "ValidatingDataset"
        _DATASET_CLASS = ValidatingDataset
    return _DATASET_CLASS


def _key_before(shard, k: int) -> str | None:
    """Key of the readable sample closest before sample ``k`` of a shard (to name where a bad one sits)."""
    for j in range(k - 1, -1, -1):
        try:
            return shard[j]["key"]
        except Exception:  # noqa: S112 - that one is unreadable too
            continue
    return None


class _Collate:
    """Worker-side batching: stacks the array fields (as stored) and labels; skipped bad samples
    are replaced by the good samples of the same micro-batch in turn, so every micro-batch is full and
    streaming's sample count (its resume position) stays exact."""

    def __init__(self, fields: list[str]):
        self.fields = fields

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        good = [s for s in samples if "bad" not in s]
        bad = [s["bad"] for s in samples if "bad" in s]
        if not good:
            raise ShardError(f"every sample of a micro-batch is bad, e.g. {bad[0]}")
        rows = [good[j % len(good)] if "bad" in s else s for j, s in enumerate(samples)]
        out: dict[str, Any] = {"index": torch.tensor([s["index"] for s in rows], dtype=torch.int64),
                               "key": [s["key"] for s in rows], "bad": bad,
                               "y": torch.tensor([s.get("cls", -1) for s in rows], dtype=torch.int64)}
        for name in self.fields:
            out[name] = torch.from_numpy(np.stack([s[name] for s in rows]))
        return out


class MdsLoader(ShardDataset):
    """``data=mds``: MDS shards read by MosaicML Streaming's ``StreamingDataset`` + ``StreamingDataLoader``.

    ``root`` is the shard directory (its merged ``index.json``), or with ``remote`` (s3://, gs://, ..., or
    a path) the local cache that streaming downloads shards into as they are needed. Streaming shuffles
    (``shuffle_seed`` = run seed, a fresh order each epoch) and splits every epoch over ranks and
    ``num_workers`` worker processes per rank; it reads ``RANK``/``WORLD_SIZE``/``LOCAL_WORLD_SIZE`` from
    the environment (torchrun sets them) and coordinates the ranks of a node through shared memory, of
    which whatever a crashed run left behind is cleaned when the first loader of a process starts.

    ``num_canonical_nodes`` is streaming's: the sample space is split into that many parts, of which each node
    reads ``num_canonical_nodes / nodes``. Its default (None) is the number of nodes of the run's first
    allocation, so a 2-node job reads other batches than a 1-node one; set it (to a multiple or divisor of every
    node count the run will use) for the same global batches on 1 and 2 nodes. Not fixed by default: on small
    datasets more canonical nodes than nodes make streaming repeat a few samples within an epoch (480 samples,
    8 canonical nodes, 2 ranks x 2 workers: 2 of 476 repeated).

    ``record_keys``: the sample keys of every micro-batch go to ``keys_dir`` (:class:`bigdit.data.KeysLog`).

    Every epoch holds ``world_size x workers x micro_batch`` samples times a whole number (streaming's
    ``epoch_size``; the remainder, fewer samples than that, is left out of the epoch at random), so every
    rank reads the same number of full micro-batches and DDP never waits on a rank that ran out of data.

    Resume: :meth:`state_dict` is ``StreamingDataLoader.state_dict()`` (the epoch and the number of samples
    all ranks consumed in it, the same on every rank), and :meth:`load_state_dict` hands it back to
    streaming, which restarts the epoch's global sample order after those samples: a resumed run sees
    exactly the samples of an uninterrupted one for the same world size, workers and micro-batch.

    ``repa_feats`` (set by the training loop for REPA) adds the stored REPA features to each batch.

    Latents are sampled with :class:`bigdit.codec.LatentCodec` in the training process, from a generator
    seeded by ``(seed, epoch, the micro-batch's sample indices)``, so they do not depend on worker timing
    or interruptions.
    """

    format = "mds"

    def __init__(self, root: str, plan: BatchPlan, rank: int, seed: int, num_workers: int = 2,
                 prefetch_factor: int = 2, shuffle: bool = True, flip: bool = True,
                 skip_bad_samples: bool = False, pin_memory: bool | None = None, remote: str | None = None,
                 repa_feats: bool = False, record_keys: bool = False, keys_dir: str | None = None,
                 num_canonical_nodes: int | None = None):
        shapes = self._open_shards(root, remote, flip, repa_feats)
        env = (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))
        if env != (rank, plan.world_size):
            raise ValueError(f"data=mds: rank {rank} of {plan.world_size}, but the environment says RANK={env[0]} "
                             f"WORLD_SIZE={env[1]}: StreamingDataset takes its rank from the environment "
                             f"(run one process per rank, e.g. with torchrun)")
        self.plan, self.rank, self.seed = plan, rank, int(seed)
        self.num_workers = int(num_workers)
        chunk = plan.world_size * max(1, self.num_workers) * plan.micro_batch
        if self.manifest.count < chunk:
            raise ValueError(f"{self.root} has {self.manifest.count} samples but {plan.world_size} rank(s) x "
                             f"{max(1, self.num_workers)} worker(s) x micro-batch {plan.micro_batch} need at "
                             f"least {chunk}: lower data.num_workers or run.micro_batch")
        #: samples per epoch, and the optimizer steps it makes
        self.epoch_samples = self.manifest.count // chunk * chunk
        global _CLEANED
        if not _CLEANED:
            from streaming.base.util import clean_stale_shared_memory

            clean_stale_shared_memory()
            _CLEANED = True
        from streaming import StreamingDataLoader

        self.dataset = _validating_dataset()(
            local=self.root, remote=remote, batch_size=plan.micro_batch, shuffle=shuffle, shuffle_seed=self.seed,
            epoch_size=self.epoch_samples, num_canonical_nodes=num_canonical_nodes,
        ).configure(self.root, shapes, ("cls",) if self.manifest.classes else (), skip_bad_samples)
        extra = {"prefetch_factor": int(prefetch_factor)} if self.num_workers else {}
        self.loader = StreamingDataLoader(self.dataset, batch_size=plan.micro_batch, num_workers=self.num_workers,
                                          collate_fn=_Collate(list(shapes)), pin_memory=resolve_pin_memory(pin_memory),
                                          drop_last=True, **extra)
        self.keys_log = keys_log(record_keys, keys_dir, rank)
        self._it: Iterator[dict[str, Any]] | None = None
        self._epoch = -1
        self._step: int | None = None  # the step micro_batches reads next
        self._loaded: dict[str, Any] = {}
        #: samples skipped as bad (data.skip_bad_samples=true), counted on this rank
        self.bad_samples = 0

    def _next(self) -> dict[str, Any]:
        """The next micro-batch of this rank, across epochs."""
        for _ in range(3):  # a resumed epoch may be empty (saved at its very end)
            if self._it is None:
                self._it = iter(self.loader)
            try:
                batch = next(self._it)
            except StopIteration:
                self._it = None
                continue
            self._epoch = self.dataset.next_epoch - 1  # set by the workers before their first sample
            return batch
        raise RuntimeError(f"{self.root}: StreamingDataset yielded no micro-batch in two epochs")

    def raw_micro_batches(self, step: int) -> Iterator[dict[str, Any]]:
        """This rank's micro-batches of ``step`` with their bookkeeping besides the training fields: ``key``
        (sample keys), ``index`` (streaming's sample indices), ``epoch`` and ``bad`` (reasons of the
        samples skipped in it). Steps are read in order, starting at the step of the loaded state."""
        saved = self._loaded.get("step")
        if self._step is None and saved is not None and step != saved:
            raise ValueError(f"{self.root}: the data state was saved before step {saved}, not {step}")
        if self._step is not None and step != self._step:
            raise ValueError(f"{self.root}: data=mds reads steps in order: step {step} asked after step "
                             f"{self._step - 1}")
        self._step = step
        for _ in range(self.plan.accum_steps):
            batch = self._next()
            if batch["bad"]:
                self.bad_samples += len(batch["bad"])
                warnings.warn(f"skipped {len(batch['bad'])} bad sample(s) ({self.bad_samples} so far): "
                              f"{batch['bad'][0]}", stacklevel=2)
            batch["x"] = self._latents(batch)
            batch["epoch"] = self._epoch
            yield batch
        self._step = step + 1

    def _latents(self, batch: dict[str, Any]) -> torch.Tensor:
        """Model-space latents of a micro-batch from one generator seeded by ``(seed, epoch, its sample
        indices)``: the same micro-batch (as a resumed run reads it too) gets the same noise and flips."""
        g = torch.Generator().manual_seed(stream_seed(self.seed, self._epoch, *batch["index"].tolist()))
        return self.codec.decode(batch, generator=g)

    def micro_batches(self, step: int) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's ``plan.accum_steps`` micro-batches of ``step``: ``x`` (model-space latents), ``y``,
        plus ``clip_tokens``/``clip_pooled`` (float16) when the shards carry text embeddings and
        ``repa_feats`` (float16) when asked for."""
        for micro, raw in enumerate(self.raw_micro_batches(step)):
            if self.keys_log:
                self.keys_log.write(step, micro, raw["key"])
            yield {k: raw[k] for k in ("x", "y", "clip_tokens", "clip_pooled", "repa_feats") if k in raw}

    def close(self) -> None:
        """Stop the worker processes now (they also stop when the loader is dropped)."""
        if self._it is not None:
            self._it.close()
            self._it = None

    def state_dict(self) -> dict[str, Any]:
        """Global progress: streaming's state (epoch, samples of all ranks consumed in it) and the layout."""
        if self._epoch < 0:  # nothing read since the start or the resume
            streaming = self._loaded.get("streaming")
        else:
            streaming = self.loader.state_dict()
        return {"format": self.format, "streaming": streaming, "step": self._step if self._step is not None
                else self._loaded.get("step", 0), "manifest_sha256": self.manifest_sha256, **self._layout()}

    def _layout(self) -> dict[str, Any]:
        return {"world_size": self.plan.world_size, "workers": max(1, self.num_workers),
                "micro_batch": self.plan.micro_batch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume where ``state`` (rank 0's :meth:`state_dict`) left off."""
        if not state:
            return
        if state.get("format") != self.format:
            raise ValueError(f"{self.root}: the checkpoint's data state is of data={state.get('format')}")
        self.check_same_shards(state)
        saved = {k: state.get(k) for k in self._layout()}
        if saved != self._layout():
            warnings.warn(f"resuming {self.root} with layout {self._layout()} instead of {saved}: streaming "
                          f"re-partitions the rest of the epoch, so the samples seen differ from an "
                          f"uninterrupted run", stacklevel=2)
        self._loaded = dict(state)
        if state.get("streaming"):
            self.dataset.load_state_dict(state["streaming"])


def merge_index(root: str | Path, names: list[str]) -> Path:
    """Write the root ``index.json`` listing every shard directory's MDS files, which is what
    ``StreamingDataset(local=root)`` opens.

    streaming's own ``merge_index`` builds it; it writes into a scratch directory here and the result is
    renamed into place (:func:`bigdit.fsio.write_atomic`), because streaming moves its file onto ``root``
    non-atomically and refuses to replace an existing index (several last ranks may finish together).
    """
    from streaming.base.util import merge_index as merge_partition_indexes

    root = Path(root)
    # streaming announces its scratch folder at every merge with a warning logged on the root logger itself. A
    # logger's filters only see records logged on it, and this one passes loggers named streaming* only: it
    # drops that notice, while streaming's own loggers (its real warnings) still reach the handlers.
    drop = logging.Filter("streaming")
    logging.root.addFilter(drop)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            merge_partition_indexes([str(root / name / "index.json") for name in names], scratch)
            return write_atomic(root / "index.json", (Path(scratch) / "index.json").read_bytes())
    finally:
        logging.root.removeFilter(drop)
