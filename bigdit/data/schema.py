"""The shard sample contract and the dataset manifest: the leaf of the data layer, format-neutral.

Holds what every shard format, tool, loader and test agrees on: the sample fields (below) and the one
check of a decoded sample (:func:`sample_problems`), the manifest (:class:`Manifest`) with its per-channel
statistics (:class:`ChannelStats`), shard names and sample keys, and the errors of the layer
(:class:`SchemaError`, :class:`ShardError`). How each format stores a sample lives in its module
(:mod:`bigdit.data.wds`, :mod:`bigdit.data.mds`); :mod:`bigdit.data.shards` dispatches between them.

A sample (in memory, a dict) has these fields:

==================  =====================  ==========================================================
field               type                   meaning
==================  =====================  ==========================================================
``key``             str, no dots           unique id (WebDataset splits member names at the first dot)
``moments``         float16 (2C, H, W)     VAE posterior: mean and logvar stacked on the channel axis
``moments_flip``    float16 (2C, H, W)     optional: moments of the horizontally flipped image
``pixels``          uint8 (C, H, W)        instead of moments in pixel shards: the centre-cropped image
``cls``             int                    class label (-1 when the data has no classes)
``txt``             str                    optional caption
``clip_tokens``     float16 (T, D)         optional: CLIP per-token text states (after the final LN)
``clip_pooled``     float16 (D,)           optional: CLIP pooled text embedding
``repa_feats``      float16 (P, D)         optional: REPA's target, the encoder's patch features of the
                                           image (not flipped; :mod:`bigdit.repa_features`)
``json``            dict                   free metadata
==================  =====================  ==========================================================

``moments`` follow diffusers' ``DiagonalGaussianDistribution.parameters`` (mean, logvar), so an encoder
stores exactly what the VAE returns and :mod:`bigdit.codec` samples ``z = mean + exp(logvar / 2) * eps``.
Pixel shards (manifest ``pixels: true``, encoded with ``vae=none``) hold ``pixels`` instead of ``moments``, and
the loaders flip them at random (no flipped copy is stored).

The manifest (``manifest.json`` at the shard root) records what produced the shards; loaders refuse a
directory without one or with a stale schema (:meth:`Manifest.load`), and training checks the model
against what the loader read from it before any compute.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bigdit.codec import LatentCodec, PixelCodec
from bigdit.fsio import write_json_atomic

#: Bumped whenever a field changes meaning; loaders refuse manifests with another version.
SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
#: Empty-prompt CLIP embedding for classifier-free guidance, written by tools/cache_text.py.
EMPTY_PROMPT_NAME = "empty_prompt.npz"

#: The array fields of a sample, and the dtype of each (float16 unless listed in FIELD_DTYPES).
ARRAY_FIELDS = ("moments", "moments_flip", "pixels", "clip_tokens", "clip_pooled", "repa_feats")
FIELD_DTYPES = {"pixels": np.uint8}


class SchemaError(ValueError):
    """A sample, shard or manifest does not follow the contract."""


class ShardError(RuntimeError):
    """A corrupt or truncated shard, or a bad sample in it (the message names the shard and key)."""


def check_key(key: str) -> str:
    """Return ``key`` when it is a valid sample key (non-empty, no dots, no slashes)."""
    if not key or "." in key or "/" in key:
        raise SchemaError(f"sample key {key!r} must be non-empty and contain no '.' or '/' "
                          f"(WebDataset splits tar member names at the first dot)")
    return key


def shard_name(index: int) -> str:
    """Canonical name (without a format's suffix) of shard ``index``."""
    return f"shard-{index:06d}"


def check_count(path: str | Path, n: int, expected: int | None, key: str | None) -> None:
    """Raise :class:`ShardError` when the shard at ``path`` held ``n`` samples (the last one ``key``) but its
    record says ``expected``: a shard cut at a sample boundary reads cleanly otherwise."""
    if expected is not None and n != expected:
        raise ShardError(f"{path}: truncated shard: {n} of {expected} samples, the last one {key!r}")


@dataclass
class Manifest:
    """``manifest.json``: what produced a shard directory, and its shards."""

    format: str                         # wds | mds
    latent_shape: list[int]             # (C, H, W) of a sampled latent (moments have 2C channels) or of the pixels
    vae: str = "none"                   # hub id / local dir, or "none" for pixels in [-1, 1]
    scaling_factor: float = 1.0         # z_model = (z - shift_factor) * scaling_factor
    shift_factor: float = 0.0
    resolution: int = 0                 # image side after the ADM center crop
    latent_dtype: str = "float16"
    flip: bool = False                  # moments_flip stored; pixel shards: flipped at random by the loaders
    classes: list[str] = field(default_factory=list)
    text: dict[str, Any] | None = None  # {model, pretrained, layer, model_config, tokens, dim, pooled_dim} (cache_text)
    repa: dict[str, Any] | None = None  # {encoder, model, input_size, layer, tokens, dim} (encode_latents repa_*)
    shards: list[dict[str, Any]] = field(default_factory=list)  # [{name, count}] in order
    count: int = 0
    stats: dict[str, Any] = field(default_factory=dict)  # per-channel latent mean/std (unscaled means)
    pixels: bool = False                # uint8 pixels (C, H, W) instead of VAE moments (vae=none on images)
    schema_version: int = SCHEMA_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def fields(self) -> list[str]:
        """The fields every sample of this dataset carries."""
        if self.pixels:
            out = ["key", "pixels", "cls", "json"]
        else:
            out = ["key", "moments", "cls", "json"]
        if self.flip and not self.pixels:
            out.append("moments_flip")
        if self.text is not None:
            out += ["clip_tokens", "clip_pooled"]
        if self.repa is not None:
            out.append("repa_feats")
        return out

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Expected array shapes of the array fields."""
        c, h, w = self.latent_shape
        out = {"pixels": (c, h, w)} if self.pixels else {"moments": (2 * c, h, w)}
        if self.flip and not self.pixels:
            out["moments_flip"] = (2 * c, h, w)
        if self.text is not None:
            out["clip_tokens"] = (int(self.text["tokens"]), int(self.text["dim"]))
            out["clip_pooled"] = (int(self.text.get("pooled_dim", self.text["dim"])),)
        if self.repa is not None:
            out["repa_feats"] = (int(self.repa["tokens"]), int(self.repa["dim"]))
        return out

    def codec(self, use_flip: bool = True) -> LatentCodec | PixelCodec:
        """The codec of these shards: the latent codec of the VAE they were encoded with (flips only when they are
        stored), or for pixel shards the uint8 -> [-1, 1] pixel codec (flips when the manifest allows them)."""
        if self.pixels:
            return PixelCodec(use_flip and self.flip)
        return LatentCodec(self.scaling_factor, self.shift_factor, use_flip and self.flip)

    def save(self, root: str | Path) -> Path:
        """Write ``root/manifest.json`` atomically (several encoder ranks may finish at the same time)."""
        return write_json_atomic(Path(root) / MANIFEST_NAME, asdict(self), indent=1)

    @classmethod
    def load(cls, root: str | Path) -> Manifest:
        """Read ``root/manifest.json``; raise :class:`SchemaError` when missing or of another schema version."""
        path = Path(root) / MANIFEST_NAME
        if not path.is_file():
            raise SchemaError(f"{path} not found: {root} is not a finished shard directory "
                              f"(run tools/encode_latents.py out={root} ... to completion)")
        raw = json.loads(path.read_text())
        version = raw.get("schema_version")
        if version != SCHEMA_VERSION:
            raise SchemaError(f"{path} has schema version {version}, this code reads version {SCHEMA_VERSION}: "
                              f"re-encode the data with tools/encode_latents.py")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in raw.items() if k in known})


def sample_problems(sample: dict[str, Any], shapes: dict[str, tuple[int, ...]], required: Iterable[str] = (),
                    num_classes: int = 0, finite: bool = True) -> list[str]:
    """Problems of one decoded sample (empty when it is fine): the one sample check.

    A field of ``required`` or ``shapes`` is missing, an array of ``shapes`` is not of its shape and dtype
    (:data:`FIELD_DTYPES`, else float16),
    with ``finite`` an array holds NaN/inf, with ``num_classes`` the ``cls`` label is out of range. The
    loaders pass ``finite=False``: scanning every value costs more than decoding the sample, and the
    full check is what ``tools/shards.py verify`` is for (:func:`validate_sample`).
    """
    problems = [f"missing field {name!r}" for name in dict.fromkeys([*required, *shapes])
                if sample.get(name) is None]
    for name, shape in shapes.items():
        a = sample.get(name)
        if a is None:
            continue
        if tuple(a.shape) != shape:
            problems.append(f"{name} has shape {tuple(a.shape)}, expected {shape}")
        elif a.dtype != (dtype := np.dtype(FIELD_DTYPES.get(name, np.float16))):
            problems.append(f"{name} has dtype {a.dtype}, expected {dtype}")
        elif finite and not np.isfinite(a).all():
            problems.append(f"{name} has NaN/inf values")
    cls = sample.get("cls")
    if cls is not None and num_classes and not 0 <= int(cls) < num_classes:
        problems.append(f"cls={cls} outside 0..{num_classes - 1}")
    return problems


def validate_sample(sample: dict[str, Any], manifest: Manifest) -> list[str]:
    """Problems of one decoded sample against everything its manifest promises (empty when it is fine)."""
    return sample_problems(sample, manifest.shapes(), manifest.fields(), manifest.num_classes)


class ChannelStats:
    """Running per-channel mean/std of latent means (float64 sums, mergeable across shards): the manifest's
    ``stats`` summarise them, each shard's record holds its own (:meth:`to_json`)."""

    def __init__(self, n: int = 0, s: list[float] | None = None, ss: list[float] | None = None):
        self.n = n
        self.s = np.zeros(0) if s is None else np.asarray(s, np.float64)
        self.ss = np.zeros(0) if ss is None else np.asarray(ss, np.float64)

    def add(self, mean: np.ndarray) -> None:
        """Add latent means (N, C, H, W)."""
        x = mean.astype(np.float64)
        if not self.s.size:
            self.s, self.ss = np.zeros(x.shape[1]), np.zeros(x.shape[1])
        self.n += x.shape[0] * x.shape[2] * x.shape[3]
        self.s += x.sum((0, 2, 3))
        self.ss += (x * x).sum((0, 2, 3))

    def merge(self, other: ChannelStats) -> None:
        """Add another shard's sums."""
        if not self.s.size:
            self.s, self.ss = np.zeros_like(other.s), np.zeros_like(other.ss)
        self.n += other.n
        self.s = self.s + other.s
        self.ss = self.ss + other.ss

    def to_json(self) -> dict[str, Any]:
        """The sums, as a shard record stores them (``ChannelStats(**record["stats"])`` reads them back)."""
        return {"n": self.n, "s": self.s.tolist(), "ss": self.ss.tolist()}

    def summary(self) -> dict[str, list[float]]:
        """Per-channel mean and std."""
        mean = self.s / max(self.n, 1)
        std = np.sqrt(np.maximum(self.ss / max(self.n, 1) - mean**2, 0.0))
        return {"mean": [round(float(v), 6) for v in mean], "std": [round(float(v), 6) for v in std]}
