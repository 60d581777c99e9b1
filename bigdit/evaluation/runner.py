"""What ``tools/evaluate.py`` runs: ADM's evaluation of a sample batch against a reference batch
(:func:`evaluate`), and the making of a reference batch from a user's images (:func:`make_reference`).

Both run as one process or as the ranks of a process group (torchrun/srun; the caller joins the group).
Each rank computes the features of a contiguous slice of the images (:func:`rank_slice`); the statistics
are float64 sums all-reduced over ranks (:class:`~bigdit.evaluation.stats.MomentAccumulator`), never a
gather of features, so 1 and N ranks give the same numbers (to float64 rounding). Only what ADM's protocol
needs on one rank is gathered to rank 0: the pool_3 features for precision/recall (the reference batch's
and all samples'), and for ``make_ref`` the images that go into ``arr_0``.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from bigdit.evaluation.inception import POOL_DIM, SPATIAL_DIM, InceptionV3, load_inception, resolve_weights
from bigdit.evaluation.reference import STAT_KEYS, Batch, NpzArray, npz_keys, read_batch, write_reference
from bigdit.evaluation.stats import (FID_METHODS, InceptionScoreAccumulator, MomentAccumulator, default_reduce,
                                     frechet_distance, precision_recall)
from bigdit.fsio import atomic_path, write_json_atomic

#: ADM's protocol: 50,000 samples, IS over splits of 5,000, precision/recall with k = 3.
PROTOCOL_SAMPLES = 50_000
IS_SPLIT_SIZE = 5_000
PR_K = 3
#: images in a reference batch's arr_0 (ADM's reference batches hold 10,000)
REF_IMAGES = 10_000
CACHE_VERSION = 1


# ------------------------------------------------------------------------------------------ ranks


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_slice(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share ``[start, stop)`` of ``n`` items (``np.array_split``'s sizes)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def gather_to_main(x: torch.Tensor) -> torch.Tensor | None:
    """The rows of ``x`` of every rank, in rank order, on rank 0 (None elsewhere); ``x`` as is on one rank.
    ``x`` must be on the process group's device (CUDA for nccl)."""
    rank, world = rank_world()
    if world == 1:
        return x
    sizes = [torch.zeros(1, dtype=torch.int64, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(x)], dtype=torch.int64, device=x.device))
    sizes = [int(s) for s in sizes]
    padded = torch.zeros(max(sizes), *x.shape[1:], dtype=x.dtype, device=x.device)
    padded[: len(x)] = x
    parts = [torch.empty_like(padded) for _ in range(world)] if rank == 0 else None
    dist.gather(padded, parts, dst=0)
    if rank != 0:
        return None
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if rank_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


class Progress:
    """A line on stderr (rank 0) every ``every`` seconds."""

    def __init__(self, what: str, total: int | None, enabled: bool = True, every: float = 30.0):
        self.what, self.total, self.every = what, total, every
        self.enabled = enabled and rank_world()[0] == 0
        self.t0 = self.last = time.perf_counter()

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.every:
            self.last = now
            of = f"/{self.total}" if self.total else ""
            print(f"{self.what}: {done}{of} images on rank 0 ({now - self.t0:.0f}s)", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ features


@dataclass
class Networks:
    """The feature networks of an evaluation (loaded on every rank)."""

    inception: InceptionV3
    dinov2: Any = None        # bigdit.evaluation.dinov2.DINOv2
    clip: Any = None          # bigdit.evaluation.clip.CLIPScorer
    identity: dict[str, Any] = field(default_factory=dict)  # what the cache key records

    @property
    def device(self) -> torch.device:
        return self.inception.device


@dataclass
class SetStats:
    """What an image set contributes to the metrics."""

    count: int
    moments: dict[str, tuple[np.ndarray, np.ndarray]]    # pool, spatial (, dinov2): (mu, sigma)
    pool: np.ndarray | None = None                        # (N, 2048) float32, on rank 0
    inception_score: float | None = None
    clip_score: float | None = None

    def save(self, path: Path) -> None:
        arrays: dict[str, np.ndarray] = {"count": np.array(self.count)}
        for name, (mu, sigma) in self.moments.items():
            arrays[f"mu_{name}"], arrays[f"sigma_{name}"] = mu, sigma
        if self.pool is not None:
            arrays["pool"] = self.pool
        for k in ("inception_score", "clip_score"):
            if getattr(self, k) is not None:
                arrays[k] = np.array(getattr(self, k))
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: Path) -> SetStats:
        with np.load(path) as z:
            names = [k[3:] for k in z.files if k.startswith("mu_")]
            return cls(int(z["count"]), {n: (z[f"mu_{n}"], z[f"sigma_{n}"]) for n in names},
                       z["pool"] if "pool" in z.files else None,
                       float(z["inception_score"]) if "inception_score" in z.files else None,
                       float(z["clip_score"]) if "clip_score" in z.files else None)


def set_stats(nets: Networks, images: NpzArray, count: int, *, batch_size: int = 100, want_pool: bool = True,
              want_is: bool = True, prompts: list[str] | None = None, is_split_size: int = IS_SPLIT_SIZE,
              what: str = "images", progress: bool = True) -> SetStats:
    """Features of the first ``count`` images of ``images``, this rank's slice, reduced over ranks."""
    rank, world = rank_world()
    device = nets.device
    start, stop = rank_slice(count, rank, world)
    acc = {"pool": MomentAccumulator(POOL_DIM, device), "spatial": MomentAccumulator(SPATIAL_DIM, device)}
    if nets.dinov2 is not None:
        acc["dinov2"] = MomentAccumulator(nets.dinov2.dim, device)
    isc = InceptionScoreAccumulator(is_split_size, device=device) if want_is else None
    clip_sum = torch.zeros(2, dtype=torch.float64, device=device)  # sum of 100 cos, count
    text = None
    if nets.clip is not None and prompts is not None:
        unique = sorted(set(prompts[start:stop]))
        text = (dict(zip(unique, range(len(unique)))), nets.clip.text_embeddings(unique) if unique else None)
    pools = []
    bar = Progress(what, stop - start, progress)
    for a in range(start, stop, batch_size):
        b = min(a + batch_size, stop)
        x = images.read(a, b)
        f = nets.inception.features(x)
        acc["pool"].update(f["pool"])
        acc["spatial"].update(f["spatial"])
        if isc is not None:
            isc.update(f["logits"], start=a)
        if want_pool:
            pools.append(f["pool"].cpu())
        if "dinov2" in acc:
            acc["dinov2"].update(nets.dinov2.features(x))
        if text is not None:
            index, emb = text
            rows = torch.tensor([index[p] for p in prompts[a:b]], device=emb.device)
            cos = (nets.clip.image_embeddings(x) * emb[rows]).sum(-1)
            clip_sum += torch.stack([100 * cos.double().sum(), torch.tensor(float(len(cos)), dtype=torch.float64,
                                                                          device=cos.device)]).to(device)
        bar.update(b - start)
    moments = {k: v.reduced(default_reduce).mean_cov() for k, v in acc.items()}
    pool = None
    if want_pool:
        local = torch.cat(pools) if pools else torch.zeros(0, POOL_DIM)
        gathered = gather_to_main(local.to(device))
        pool = None if gathered is None else gathered.cpu().numpy()
    out = SetStats(count, moments, pool)
    if isc is not None:
        out.inception_score = isc.compute(default_reduce)
    if text is not None:
        from bigdit.evaluation.clip import clip_score

        total = default_reduce(clip_sum)
        out.clip_score = clip_score(float(total[0]), int(total[1]))
    return out


def _fingerprint(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cached_set_stats(cache_dir: Path | None, key: dict[str, Any], compute) -> tuple[SetStats, bool]:
    """``compute()``'s SetStats, or the cached one of the same ``key`` (rank 0 reads and writes the cache;
    every rank learns whether there was a hit). Returns (stats, hit)."""
    rank, _ = rank_world()
    path = None
    if cache_dir is not None:
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        path = cache_dir / f"{Path(key['file']['path']).stem}-{key['role']}-{digest}.npz"
    hit = broadcast(bool(path is not None and rank == 0 and path.is_file()))
    if hit:
        return (SetStats.load(path) if rank == 0 else SetStats(key["count"], {})), True
    stats = compute()
    if path is not None and rank == 0:
        stats.save(path)
    return stats, False


# ------------------------------------------------------------------------------------------ inputs


def sample_prompts(path: str | Path, count: int) -> list[str] | None:
    """The prompt of each of the first ``count`` samples, when the batch is text-to-image: a ``prompts`` or
    ``captions`` string array in the npz, or ``arr_1`` indices into the prompt list beside it (what
    ``tools/sample.py`` writes: ``samples.json``'s ``prompts``, or ``prompts.txt``). None when there are none."""
    path = Path(path)
    keys = set(npz_keys(path))
    for k in ("prompts", "captions"):
        if k in keys:
            with np.load(path, allow_pickle=False) as z:
                texts = [str(t) for t in z[k]]
            if len(texts) < count:
                raise ValueError(f"samples {path}: {k} holds {len(texts)} prompts for {count} samples")
            return texts[:count]
    names, where = prompt_list(path)
    if names is None:
        return None
    if "arr_1" not in keys:
        raise ValueError(f"{where} lists prompts for {path} but the batch has no arr_1 (each sample's prompt index)")
    index = NpzArray(path, "arr_1").read(0, count)
    if len(index) < count or index.min() < 0 or index.max() >= len(names):
        raise ValueError(f"samples {path}: arr_1 holds prompt indices outside 0..{len(names) - 1} of {where}")
    return [names[int(i)] for i in index]


def prompt_list(path: Path) -> tuple[list[str] | None, Path | None]:
    """The prompts ``tools/sample.py`` recorded beside a text-to-image ``samples.npz`` (and where), else None."""
    meta = path.parent / "samples.json"
    if meta.is_file():
        try:
            prompts = json.loads(meta.read_text()).get("prompts")
        except ValueError:
            prompts = None
        if isinstance(prompts, list):
            return [str(p) for p in prompts], meta
    txt = path.parent / "prompts.txt"
    if txt.is_file():
        return txt.read_text().splitlines(), txt
    return None, None


def check_count(images: NpzArray, num_samples: int, path: str | Path) -> None:
    """Raise when the batch holds fewer samples than the protocol needs (saying how many)."""
    if len(images) < num_samples:
        raise ValueError(f"samples {path} holds {len(images)} images; the protocol needs {num_samples} "
                         f"(ADM/DiT: {PROTOCOL_SAMPLES:,}, num_samples=): sample more, or set "
                         f"num_samples={len(images)} to score these (not comparable with published numbers)")
    if num_samples < PR_K + 1:
        raise ValueError(f"num_samples={num_samples}: precision/recall need more than k={PR_K} samples")


# ------------------------------------------------------------------------------------------ evaluate


def load_networks(inception_weights: str | None, device: torch.device, *, batch_size: int = 100,
                  dinov2_weights: str | None = None, dinov2_model: str | None = None,
                  dinov2_arch: dict | None = None, clip: dict | None = None) -> Networks:
    """The Inception (weights resolved, downloaded when allowed), and DINOv2 / CLIP when asked for."""
    weights = resolve_weights(inception_weights)
    identity: dict[str, Any] = {"inception": {"path": str(weights.resolve()), "size": weights.stat().st_size}}
    nets = Networks(load_inception(weights, device, batch_size), identity=identity)
    if dinov2_weights:
        from bigdit.evaluation.dinov2 import DEFAULT_MODEL, load_dinov2

        nets.dinov2 = load_dinov2(dinov2_weights, dinov2_model or DEFAULT_MODEL, device, batch_size,
                                  **(dinov2_arch or {}))
        p = Path(str(dinov2_weights))
        identity["dinov2"] = {"weights": _fingerprint(p) if p.is_file() else str(dinov2_weights),
                              "model": dinov2_model, "arch": dinov2_arch or {}}
    if clip:
        from bigdit.evaluation.clip import CLIPScorer

        nets.clip = CLIPScorer(clip["model"], clip.get("pretrained"), device, clip.get("model_config"), batch_size)
        identity["clip"] = {k: str(v) for k, v in clip.items()}
    return nets


def evaluate(samples: str | Path, ref: str | Path, *, inception_weights: str | None = None,
             device: str | torch.device = "cpu", num_samples: int = PROTOCOL_SAMPLES, batch_size: int = 100,
             is_split_size: int = IS_SPLIT_SIZE, pr_k: int = PR_K, dinov2_weights: str | None = None,
             dinov2_model: str | None = None, dinov2_arch: dict | None = None, clip: dict | None = None,
             out: str | Path | None = None, cache: bool = True, fid_method: str = "sqrtm",
             progress: bool = True) -> dict[str, Any]:
    """ADM's evaluation of ``samples`` against the reference batch ``ref``; the JSON result (on every rank),
    also written to ``out`` (default ``<samples dir>/eval-<ref name>.json``) by rank 0.

    ``clip``: ``{model, pretrained, model_config}`` of an open_clip model for the CLIP score (text-to-image
    batches only). ``fid_method``: :func:`~bigdit.evaluation.stats.frechet_distance`'s (ADM's ``sqrtm``
    by default). All inputs are checked before any network runs.
    """
    t0 = time.perf_counter()
    rank, world = rank_world()
    device = torch.device(device)
    if fid_method not in FID_METHODS:
        raise ValueError(f"fid_method={fid_method!r}: use one of {FID_METHODS}")
    samples, ref = Path(samples), Path(ref)
    sb = read_batch(samples, "samples")
    check_count(sb.images, num_samples, samples)
    rb = read_batch(ref, "reference batch")
    if sb.resolution != rb.resolution:
        raise ValueError(f"samples {samples} are {sb.resolution[0]}x{sb.resolution[1]} but the reference batch "
                         f"{ref} is {rb.resolution[0]}x{rb.resolution[1]}: use the reference of the samples' "
                         f"resolution (ADM publishes one per resolution)")
    if len(rb.images) <= pr_k:
        raise ValueError(f"reference batch {ref} holds {len(rb.images)} images; precision/recall need more "
                         f"than k={pr_k}")
    prompts = None
    if clip:
        prompts = sample_prompts(samples, num_samples)
        if prompts is None:
            raise ValueError(f"clip_model={clip['model']} given but samples {samples} carry no prompts (a prompts "
                             f"array in the npz, or arr_1 + prompts.txt as tools/sample.py writes them)")
    out = Path(out) if out else samples.parent / f"eval-{ref.stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    nets = load_networks(inception_weights, device, batch_size=batch_size, dinov2_weights=dinov2_weights,
                         dinov2_model=dinov2_model, dinov2_arch=dinov2_arch, clip=clip)
    cache_dir = samples.parent / ".eval-cache" if cache else None

    skey = {"role": "samples", "file": _fingerprint(samples), "count": num_samples, "nets": nets.identity,
            "is_split_size": is_split_size, "version": CACHE_VERSION,
            "prompts": None if prompts is None else hashlib.sha1("\n".join(prompts).encode()).hexdigest()}
    s, s_hit = cached_set_stats(cache_dir, skey, lambda: set_stats(
        nets, sb.images, num_samples, batch_size=batch_size, prompts=prompts, is_split_size=is_split_size,
        what="samples", progress=progress))
    rkey = {"role": "ref", "file": _fingerprint(ref), "count": len(rb.images),
            "nets": {k: v for k, v in nets.identity.items() if k != "clip"}, "version": CACHE_VERSION}
    r, r_hit = cached_set_stats(cache_dir, rkey, lambda: set_stats(
        nets, rb.images, len(rb.images), batch_size=batch_size, want_is=False, what="reference", progress=progress))

    result: dict[str, Any] = {}
    if rank == 0:
        result = metrics(sb, s, rb, r, num_samples, pr_k, device, fid_method)
        result.update(samples=str(samples), ref=str(ref), num_samples=num_samples,
                      num_ref_images=len(rb.images), resolution=list(sb.resolution),
                      inception_weights=nets.identity["inception"]["path"], world_size=world,
                      fid_method=fid_method, cached={"samples": s_hit, "ref": r_hit}, seconds=round(time.perf_counter() - t0, 1),
                      out=str(out))
        if nets.clip is not None:
            result["clip_model"] = nets.clip.name
        write_json_atomic(out, result, indent=1)
    barrier()
    return broadcast(result)


def metrics(sb: Batch, s: SetStats, rb: Batch, r: SetStats, num_samples: int, pr_k: int,
            device: torch.device, fid_method: str = "sqrtm") -> dict[str, Any]:
    """The numbers, on rank 0. Statistics stored in a batch are used as ADM uses them (a sample batch's only
    when all its images are evaluated); the others come from the images."""
    whole = len(sb.images) == num_samples
    out: dict[str, Any] = {}
    source: dict[str, dict[str, str]] = {"samples": {}, "ref": {}}

    def pick(name: str) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        if whole and name in sb.stats:
            ss, source["samples"][name] = sb.stats[name], "file"
        else:
            ss, source["samples"][name] = s.moments[name], "images"
        if name in rb.stats:
            rs, source["ref"][name] = rb.stats[name], "file"
        else:
            rs, source["ref"][name] = r.moments[name], "images"
        return ss, rs

    (mu1, s1), (mu2, s2) = pick("pool")
    out["fid"] = frechet_distance(mu1, s1, mu2, s2, method=fid_method)
    (mu1, s1), (mu2, s2) = pick("spatial")
    out["sfid"] = frechet_distance(mu1, s1, mu2, s2, method=fid_method)
    out["is"] = s.inception_score
    out["precision"], out["recall"] = precision_recall(r.pool, s.pool, k=pr_k, device=device)
    if "dinov2" in s.moments:
        (mu1, s1), (mu2, s2) = pick("dinov2")
        out["fd_dinov2"] = frechet_distance(mu1, s1, mu2, s2, method=fid_method)
    if s.clip_score is not None:
        out["clip_score"] = s.clip_score
    out["statistics"] = source
    return out


# ------------------------------------------------------------------------------------------ make_ref


def make_reference(images: str, out: str | Path, *, resolution: int | None = None, max_images: int = REF_IMAGES,
                   seed: int = 0, inception_weights: str | None = None, device: str | torch.device = "cpu",
                   batch_size: int = 100, num_workers: int = 0, dinov2_weights: str | None = None,
                   dinov2_model: str | None = None, dinov2_arch: dict | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Write an ADM-format reference batch of ``images`` to ``out``: statistics over all the images
    (``mu``/``sigma``, ``mu_s``/``sigma_s``, and ``mu_dinov2``/``sigma_dinov2`` with DINOv2 weights) and
    ``arr_0``, a random subset of ``max_images`` of them (all when fewer), chosen by key (:func:`priority`)
    so that it does not depend on the number of ranks. Returns a summary (on every rank)."""
    from bigdit.evaluation.sources import iterate, open_source, priority

    t0 = time.perf_counter()
    rank, world = rank_world()
    device = torch.device(device)
    out = Path(out)
    if out.suffix != ".npz":
        raise ValueError(f"out={out}: a reference batch is an .npz file")
    if max_images < 1:
        raise ValueError(f"max_images={max_images}: arr_0 needs images (ADM's reference batches hold {REF_IMAGES:,})")
    source = open_source(images, resolution)
    nets = load_networks(inception_weights, device, batch_size=batch_size, dinov2_weights=dinov2_weights,
                         dinov2_model=dinov2_model, dinov2_arch=dinov2_arch)
    acc = {"pool": MomentAccumulator(POOL_DIM, device), "spatial": MomentAccumulator(SPATIAL_DIM, device)}
    if nets.dinov2 is not None:
        acc["dinov2"] = MomentAccumulator(nets.dinov2.dim, device)
    keep: list[tuple[int, str, np.ndarray]] = []  # max-heap of the smallest priorities: (-priority, key, image)
    skipped = 0
    batch: list[np.ndarray] = []
    bar = Progress("reference images", source.count, progress)
    done = 0

    def flush() -> None:
        nonlocal done
        x = np.stack(batch)
        f = nets.inception.features(x)
        acc["pool"].update(f["pool"])
        acc["spatial"].update(f["spatial"])
        if "dinov2" in acc:
            acc["dinov2"].update(nets.dinov2.features(x))
        done += len(batch)
        batch.clear()
        bar.update(done)

    for key, image in iterate(source, rank, world, num_workers):
        if image is None:
            skipped += 1
            continue
        if image.shape != (source.resolution, source.resolution, 3):
            raise ValueError(f"images={images}: {key} is {image.shape}, expected "
                             f"{(source.resolution, source.resolution, 3)}")
        item = (-priority(key, seed), key, image)
        if len(keep) < max_images:
            heapq.heappush(keep, item)
        elif item[0] > keep[0][0]:
            heapq.heapreplace(keep, item)
        batch.append(image)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    reduced = {k: v.reduced(default_reduce) for k, v in acc.items()}
    total = reduced["pool"].n
    skipped = int(default_reduce(torch.tensor([skipped], dtype=torch.int64, device=device))[0])
    if total < 2:
        raise ValueError(f"images={images}: {total} readable image(s); a reference needs at least 2")
    stats = {k: v.mean_cov() for k, v in reduced.items()}

    # arr_0: the max_images smallest priorities over all ranks, gathered on rank 0
    mine = torch.tensor([-p for p, _, _ in keep], dtype=torch.int64, device=device)
    every = gather_to_main(mine)
    cut = broadcast(None if every is None else int(torch.sort(every.cpu()).values[min(max_images, len(every)) - 1]))
    chosen = sorted(((-p, im) for p, _, im in keep if -p <= cut), key=lambda t: t[0])
    shape = (0, source.resolution, source.resolution, 3)
    mine_px = torch.from_numpy(np.stack([im for _, im in chosen]) if chosen else np.zeros(shape, np.uint8))
    mine_pr = torch.tensor([p for p, _ in chosen], dtype=torch.int64)
    all_px = gather_to_main(mine_px.to(device))
    all_pr = gather_to_main(mine_pr.to(device))
    summary: dict[str, Any] = {}
    if rank == 0:
        order = torch.argsort(all_pr.cpu())
        arr_0 = all_px.cpu()[order].numpy()
        write_reference(out, arr_0, stats)
        summary = {"out": str(out), "images": total, "arr_0": len(arr_0), "resolution": source.resolution,
                   "skipped": skipped, "statistics": sorted(STAT_KEYS[k][0] for k in stats) + sorted(
                       STAT_KEYS[k][1] for k in stats), "source": source.kind, "world_size": world,
                   "seconds": round(time.perf_counter() - t0, 1)}
    barrier()
    return broadcast(summary)
