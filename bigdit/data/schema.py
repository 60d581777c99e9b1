"""The shard sample contract and the dataset manifest, shared by the tools, the loaders and the tests.

A sample (in memory, a dict) has these fields:

==================  =====================  ==========================================================
field               type                   meaning
==================  =====================  ==========================================================
``key``             str, no dots           unique id (WebDataset splits member names at the first dot)
``moments``         float16 (2C, H, W)     VAE posterior: mean and logvar stacked on the channel axis
``moments_flip``    float16 (2C, H, W)     optional: moments of the horizontally flipped image
``cls``             int                    class label (-1 when the data has no classes)
``txt``             str                    optional caption
``clip_tokens``     float16 (T, D)         optional: CLIP per-token text states (after the final LN)
``clip_pooled``     float16 (D,)           optional: CLIP pooled text embedding
``json``            dict                   free metadata
==================  =====================  ==========================================================

``moments`` follow diffusers' ``DiagonalGaussianDistribution.parameters`` (mean, logvar), so an encoder
stores exactly what the VAE returns and :mod:`bigdit.codec` samples ``z = mean + exp(logvar / 2) * eps``.

The manifest (``manifest.json`` at the shard root) records what produced the shards; training reads it
and refuses to start when the model config disagrees or the schema is stale (:func:`check_model_against`).
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigdit.codec import LatentCodec

#: Bumped whenever a field changes meaning; loaders refuse manifests with another version.
SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
#: Empty-prompt CLIP embedding for classifier-free guidance, written by tools/cache_text.py.
EMPTY_PROMPT_NAME = "empty_prompt.npz"

ARRAY_FIELDS = ("moments", "moments_flip", "clip_tokens", "clip_pooled")
#: field -> WebDataset member extension (the part of a tar member name after the key's dot).
WDS_EXT = {"moments": "moments.npy", "moments_flip": "moments_flip.npy", "clip_tokens": "clip_tokens.npy",
           "clip_pooled": "clip_pooled.npy", "cls": "cls", "txt": "txt", "json": "json"}
EXT_FIELD = {v: k for k, v in WDS_EXT.items()}
#: MosaicML MDS column encodings of the same fields.
MDS_COLUMNS = {"key": "str", "moments": "ndarray", "moments_flip": "ndarray", "cls": "int", "txt": "str",
               "clip_tokens": "ndarray", "clip_pooled": "ndarray", "json": "json"}


class SchemaError(ValueError):
    """A sample, shard or manifest does not follow the contract."""


def check_key(key: str) -> str:
    """Return ``key`` when it is a valid sample key (non-empty, no dots, no slashes)."""
    if not key or "." in key or "/" in key:
        raise SchemaError(f"sample key {key!r} must be non-empty and contain no '.' or '/' "
                          f"(WebDataset splits tar member names at the first dot)")
    return key


@dataclass
class Manifest:
    """``manifest.json``: what produced a shard directory, and its shards."""

    format: str                         # wds | mds
    latent_shape: list[int]             # (C, H, W) of a sampled latent (moments have 2C channels)
    vae: str = "none"                   # hub id / local dir, or "none" for pixels in [-1, 1]
    scaling_factor: float = 1.0         # z_model = (z - shift_factor) * scaling_factor
    shift_factor: float = 0.0
    resolution: int = 0                 # image side after the ADM center crop
    latent_dtype: str = "float16"
    flip: bool = False                  # moments_flip stored
    classes: list[str] = field(default_factory=list)
    text: dict[str, Any] | None = None  # {model, pretrained, layer, model_config, tokens, dim, pooled_dim} (cache_text)
    shards: list[dict[str, Any]] = field(default_factory=list)  # [{name, count}] in order
    count: int = 0
    stats: dict[str, Any] = field(default_factory=dict)  # per-channel latent mean/std (unscaled means)
    schema_version: int = SCHEMA_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def fields(self) -> list[str]:
        """The fields every sample of this dataset carries."""
        out = ["key", "moments", "cls", "json"]
        if self.flip:
            out.append("moments_flip")
        if self.text is not None:
            out += ["clip_tokens", "clip_pooled"]
        return out

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Expected array shapes of the array fields."""
        c, h, w = self.latent_shape
        out = {"moments": (2 * c, h, w)}
        if self.flip:
            out["moments_flip"] = (2 * c, h, w)
        if self.text is not None:
            out["clip_tokens"] = (int(self.text["tokens"]), int(self.text["dim"]))
            out["clip_pooled"] = (int(self.text.get("pooled_dim", self.text["dim"])),)
        return out

    def save(self, root: str | Path) -> Path:
        """Write ``root/manifest.json`` atomically (several encoder ranks may finish at the same time)."""
        path = Path(root) / MANIFEST_NAME
        tmp = path.with_name(f".{MANIFEST_NAME}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, path)
        return path

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


def check_model_against(manifest: Manifest, in_channels: int, input_size: int, text_dim: int | None = None) -> None:
    """Fail fast when a model's input does not match the manifest (before any compute)."""
    c, h, w = manifest.latent_shape
    if (in_channels, input_size, input_size) != (c, h, w):
        raise SchemaError(f"the shards hold {c}x{h}x{w} latents (vae={manifest.vae}) but the model expects "
                          f"{in_channels}x{input_size}x{input_size}: set model.in_channels={c} model.input_size={h}")
    if text_dim is not None:
        if manifest.text is None:
            raise SchemaError("the model needs text embeddings but the shards have none: run tools/cache_text.py")
        if int(manifest.text["dim"]) != text_dim:
            raise SchemaError(f"the shards hold {manifest.text['dim']}-d CLIP embeddings ({manifest.text['model']}) "
                              f"but the model expects {text_dim}-d")


def npy_bytes(a: np.ndarray) -> bytes:
    """``a`` in .npy format (self-describing: dtype and shape travel with the data)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}


def npy_array(data: bytes | memoryview) -> np.ndarray:
    """Inverse of :func:`npy_bytes`, without copying the payload.

    Parsed headers are cached by their bytes: every sample of a field has the same header, and parsing
    it (a Python literal) would otherwise cost more than the rest of decoding.
    """
    data = memoryview(data)
    if bytes(data[:6]) != b"\x93NUMPY" or len(data) < 10:
        raise SchemaError("not an .npy array (bad magic)")
    size_bytes = 2 if data[6] == 1 else 4
    end = 8 + size_bytes + int.from_bytes(data[8 : 8 + size_bytes], "little")
    header = bytes(data[:end])
    parsed = _NPY_HEADERS.get(header)
    if parsed is None:
        buf = io.BytesIO(header)
        version = np.lib.format.read_magic(buf)
        shape, fortran, dtype = np.lib.format._read_array_header(buf, version)  # public readers copy the data
        if fortran:
            raise SchemaError("fortran-ordered arrays are not part of the schema")
        parsed = _NPY_HEADERS[header] = (dtype, shape, int(np.prod(shape)))
    dtype, shape, count = parsed
    if len(data) - end != count * dtype.itemsize:
        raise SchemaError(f"truncated array: {(len(data) - end) // dtype.itemsize} of {count} values")
    return np.frombuffer(data, dtype=dtype, offset=end).reshape(shape)


def validate_sample(sample: dict[str, Any], manifest: Manifest) -> list[str]:
    """Problems of one decoded sample against the manifest (empty when it is fine)."""
    problems = []
    for name in manifest.fields():
        if name not in sample:
            problems.append(f"missing field {name!r}")
    for name, shape in manifest.shapes().items():
        a = sample.get(name)
        if a is None:
            continue
        if tuple(a.shape) != shape:
            problems.append(f"{name} has shape {tuple(a.shape)}, expected {shape}")
        elif a.dtype != np.float16:
            problems.append(f"{name} has dtype {a.dtype}, expected float16")
        elif not np.isfinite(a).all():
            problems.append(f"{name} has NaN/inf values")
    cls = sample.get("cls")
    if cls is not None and manifest.classes and not 0 <= int(cls) < manifest.num_classes:
        problems.append(f"cls={cls} outside 0..{manifest.num_classes - 1}")
    return problems


def shard_io(fmt: str):
    """The shard module of a format (``Writer``, ``read_shard``, ``exists``, ``shard_bytes``)."""
    import importlib

    if fmt not in ("wds", "mds"):
        raise ValueError(f"format={fmt!r}: use wds (WebDataset tars) or mds (MosaicML Streaming)")
    return importlib.import_module(f"bigdit.data.{fmt}")


class ChannelStats:
    """Running per-channel mean/std of latent means (float64 sums, mergeable across shards)."""

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
        if not self.s.size:
            self.s, self.ss = np.zeros_like(other.s), np.zeros_like(other.ss)
        self.n += other.n
        self.s = self.s + other.s
        self.ss = self.ss + other.ss

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "s": self.s.tolist(), "ss": self.ss.tolist()}

    def summary(self) -> dict[str, list[float]]:
        """Per-channel mean and std."""
        mean = self.s / max(self.n, 1)
        std = np.sqrt(np.maximum(self.ss / max(self.n, 1) - mean**2, 0.0))
        return {"mean": [round(float(v), 6) for v in mean], "std": [round(float(v), 6) for v in std]}


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON under a temporary name and rename: readers never see a partial file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def finalize(root: str | Path, base: Manifest, names: list[str]) -> Manifest | None:
    """Write ``manifest.json`` once every shard in ``names`` has its ``<name>.json`` record.

    Shard records are written after the shard itself, so a record means a complete shard. Returns the
    manifest, or None while other ranks are still working.
    """
    root = Path(root)
    records = []
    for name in names:
        p = root / f"{name}.json"
        if not p.is_file():
            return None
        records.append(json.loads(p.read_text()))
    stats = ChannelStats()
    for r in records:
        stats.merge(ChannelStats(**r["stats"]))
    shapes = {tuple(r["latent_shape"]) for r in records}
    if len(shapes) != 1:
        raise SchemaError(f"{root}: shards disagree on the latent shape {sorted(shapes)}; re-encode into an empty out")
    base.latent_shape = list(shapes.pop())
    base.shards = [{"name": n, "count": r["count"]} for n, r in zip(names, records)]
    base.count = sum(r["count"] for r in records)
    base.stats = stats.summary()
    if base.format == "mds":
        from bigdit.data.mds import merge_index

        merge_index(root, names)
    base.save(root)
    return base


def fetch(remote: str, root: str | Path, relpath: str) -> Path:
    """Copy ``remote/relpath`` to ``root/relpath`` unless cached (any remote that MosaicML Streaming reads:
    s3://, gs://, oci://, azure://, hf://, sftp://, or a plain path). Written under a per-process temporary
    name and renamed, so ranks and workers sharing a cache never read a partial file."""
    from streaming.base.storage.download import CloudDownloader

    local = Path(root) / relpath
    if not local.is_file():
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{os.getpid()}.dl")
        tmp.unlink(missing_ok=True)
        try:
            CloudDownloader.direct_download(f"{remote.rstrip('/')}/{relpath}", str(tmp))
        except Exception as e:  # the cloud clients raise many types; name the file
            raise OSError(f"cannot download {remote.rstrip('/')}/{relpath} to {local}: {e}") from e
        os.replace(tmp, local)
    return local


def open_manifest(root: str, fmt: str, remote: str | None = None) -> Manifest:
    """The manifest of the shard directory ``root`` (fetched from ``remote`` first when given), checked to
    describe ``fmt`` shards: what a loader reads before anything else."""
    if remote:
        fetch(remote, root, MANIFEST_NAME)
    manifest = Manifest.load(root)
    if manifest.format != fmt:
        raise SchemaError(f"{root} holds {manifest.format} shards: use data={manifest.format}")
    return manifest


def empty_prompt_context(root: str, manifest: Manifest, remote: str | None = None) -> torch.Tensor | None:
    """The cached empty-prompt CLIP tokens (T, D) float32 of a text dataset (None without text): what a dropped
    caption becomes in training, so the model learns the unconditional branch guidance samples from."""
    if manifest.text is None:
        return None
    if remote:
        fetch(remote, root, EMPTY_PROMPT_NAME)
    path = Path(root) / EMPTY_PROMPT_NAME
    if not path.is_file():
        raise SchemaError(f"{path} is missing: tools/cache_text.py writes it beside the manifest; rerun it on these "
                          f"shards (finished shards are skipped)")
    tokens = torch.from_numpy(np.load(path)["tokens"]).float()
    want = (int(manifest.text["tokens"]), int(manifest.text["dim"]))
    if tuple(tokens.shape) != want:
        raise SchemaError(f"{path} holds {tuple(tokens.shape)} tokens but the manifest says {want}: rerun "
                          f"tools/cache_text.py")
    return tokens


class ShardDataset:
    """What both shard loaders (``data=wds``, ``data=mds``) learn from a shard directory's manifest before
    reading any sample: the latent codec, the sample shape, classes, text embeddings and expected shapes."""

    format: str

    def _open_shards(self, root: str, remote: str | None, flip: bool) -> dict[str, tuple[int, ...]]:
        """Read the manifest of ``root`` (fetched from ``remote`` first); the array fields' expected shapes."""
        self.root = str(root)
        self.manifest = open_manifest(self.root, self.format, remote)
        self.codec = LatentCodec.from_manifest(self.manifest, use_flip=flip)
        self.sample_shape = tuple(self.manifest.latent_shape)
        self.num_classes = self.manifest.num_classes
        self.text_dim = None if self.manifest.text is None else int(self.manifest.text["dim"])
        #: cached empty-prompt CLIP tokens (T, D) for caption dropout; None without text embeddings
        self.empty_context = empty_prompt_context(self.root, self.manifest, remote)
        return {k: v for k, v in self.manifest.shapes().items() if k != "moments_flip" or self.codec.use_flip}
