"""ADM's ``.npz`` batches: reading images lazily, the reference statistics, writing a reference, input checks.

A batch (ADM's ``evaluations/evaluator.py`` format) holds ``arr_0``: uint8 images (N, H, W, 3) NHWC in
0..255, and, for reference batches, the statistics of the whole dataset: ``mu``/``sigma`` (pool_3, 2048-d)
and ``mu_s``/``sigma_s`` (sFID's ``mixed_6/conv`` features, 2023-d). Like ADM's ``read_statistics``, a
batch without them has them computed from its images. Extra keys are ignored by ADM's evaluator; this one
also reads and writes ``mu_dinov2``/``sigma_dinov2`` (FD-DINOv2 statistics) there.

``arr_0`` is read in slices (:class:`NpzArray`) so that each rank reads only its share of a 50K-image
batch: memory-mapped when the member is stored uncompressed (``np.savez``, ADM's and ``tools/sample.py``'s
format), streamed through the zip otherwise (``np.savez_compressed``).
"""

from __future__ import annotations

import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bigdit.fsio import atomic_path

#: statistic name -> (mean key, covariance key, dimension or None when any)
STAT_KEYS: dict[str, tuple[str, str, int | None]] = {
    "pool": ("mu", "sigma", 2048),
    "spatial": ("mu_s", "sigma_s", 2023),
    "dinov2": ("mu_dinov2", "sigma_dinov2", None),
}


class NpzArray:
    """One array of an ``.npz`` file, read in slices without loading the rest."""

    def __init__(self, path: str | Path, key: str = "arr_0"):
        self.path = Path(path)
        self.key = key
        self._mm: np.memmap | None = None
        self._full: np.ndarray | None = None
        with zipfile.ZipFile(self.path) as zf:
            try:
                self._info = zf.getinfo(f"{key}.npy")
            except KeyError:
                raise KeyError(f"{self.path} has no {key!r} (it holds {', '.join(npz_keys(self.path)) or 'nothing'})"
                               ) from None
            with zf.open(self._info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    header = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    header = np.lib.format.read_array_header_2_0(f)
                else:
                    header = None
                self._data_start = f.tell()
        if header is None or header[1] or header[2].hasobject:  # other npy versions, Fortran order, objects
            with np.load(self.path, allow_pickle=False) as z:
                self._full = z[key]
            self.shape, self.dtype = tuple(self._full.shape), self._full.dtype
            return
        self.shape, self.dtype = tuple(int(s) for s in header[0]), header[2]
        if self._info.compress_type == zipfile.ZIP_STORED and int(np.prod(self.shape)) > 0:
            with open(self.path, "rb") as f:
                f.seek(self._info.header_offset)
                local = f.read(30)
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            offset = self._info.header_offset + 30 + name_len + extra_len + self._data_start
            self._mm = np.memmap(self.path, dtype=self.dtype, mode="r", offset=offset, shape=self.shape)

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 0

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as an in-memory array."""
        start, stop = max(0, int(start)), min(len(self), int(stop))
        if stop <= start:
            return np.zeros((0, *self.shape[1:]), self.dtype)
        if self._full is not None:
            return np.array(self._full[start:stop])
        if self._mm is not None:
            return np.array(self._mm[start:stop])
        with zipfile.ZipFile(self.path) as zf, zf.open(self._info) as f:
            f.seek(self._data_start + start * self.row_bytes)
            data = f.read((stop - start) * self.row_bytes)
        return np.frombuffer(data, self.dtype).reshape(stop - start, *self.shape[1:]).copy()

    def take(self, indices: np.ndarray, chunk: int = 1000) -> np.ndarray:
        """Rows at sorted ``indices``, read chunk by chunk."""
        indices = np.asarray(indices, np.int64)
        parts = []
        for a in range(0, len(indices), chunk):
            idx = indices[a : a + chunk]
            block = self.read(int(idx[0]), int(idx[-1]) + 1)
            parts.append(block[idx - idx[0]])
        return np.concatenate(parts) if parts else np.zeros((0, *self.shape[1:]), self.dtype)


def npz_keys(path: str | Path) -> list[str]:
    """The array names in an ``.npz`` (without reading them)."""
    with zipfile.ZipFile(path) as zf:
        return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]


def open_batch(path: str | Path, what: str) -> NpzArray:
    """``arr_0`` of an ADM batch, checked (:func:`check_images`) before anything is computed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: no such file")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{what} {path} is not an .npz file (ADM's batch format: np.savez with arr_0)")
    try:
        images = NpzArray(path, "arr_0")
    except KeyError as e:
        raise ValueError(f"{what} {path}: {e.args[0]}; ADM's batch format puts the images in arr_0") from None
    check_images(images, f"{what} {path}")
    return images


def check_images(images: NpzArray | np.ndarray, what: str) -> None:
    """Raise ValueError unless ``images`` are ADM's uint8 (N, H, W, 3) NHWC in 0..255."""
    shape, dtype = tuple(images.shape), np.dtype(images.dtype)
    if len(shape) != 4:
        raise ValueError(f"{what}: arr_0 has shape {shape}; expected (N, H, W, 3) uint8 images")
    if dtype != np.uint8:
        head = images.read(0, min(len(images), 16)) if isinstance(images, NpzArray) else images[:16]
        rng = ""
        if head.size and np.issubdtype(dtype, np.number):
            lo, hi = float(np.min(head)), float(np.max(head))
            rng = f" with values in [{lo:g}, {hi:g}]"
            if lo >= -1.0 and hi <= 1.0:
                rng += " (model space? bigdit.inference.to_uint8_images makes uint8 from [-1, 1])"
        raise ValueError(f"{what}: arr_0 is {dtype}{rng}; expected uint8 in 0..255 (ADM's batch format)")
    if shape[-1] != 3:
        hint = ""
        if shape[1] == 3:
            hint = " (NCHW? transpose to NHWC: x.transpose(0, 2, 3, 1))"
        elif shape[-1] == 1:
            hint = " (grayscale: Inception needs RGB; digits have tools/eval_digits.py)"
        raise ValueError(f"{what}: arr_0 has shape {shape}, expected NHWC with 3 channels{hint}")
    if shape[0] == 0:
        raise ValueError(f"{what}: arr_0 holds no images")


@dataclass
class Batch:
    """An ADM batch: its images and whichever statistics it carries ({name: (mu, sigma)}, see STAT_KEYS)."""

    path: Path
    images: NpzArray
    stats: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def resolution(self) -> tuple[int, int]:
        return self.images.shape[1], self.images.shape[2]


def read_batch(path: str | Path, what: str = "batch") -> Batch:
    """Read an ADM batch as it is: checked images (lazily) and the statistics present, checked for shape and
    finiteness. A mean without its covariance (or the reverse) is an error."""
    images = open_batch(path, what)
    keys = set(npz_keys(path))
    stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    with np.load(path, allow_pickle=False) as z:
        for name, (mk, sk, dim) in STAT_KEYS.items():
            if (mk in keys) != (sk in keys):
                raise ValueError(f"{what} {path} has {mk if mk in keys else sk} without "
                                 f"{sk if mk in keys else mk}: give both or neither")
            if mk not in keys:
                continue
            mu, sigma = np.asarray(z[mk], np.float64), np.asarray(z[sk], np.float64)
            d = dim or (mu.shape[0] if mu.ndim == 1 else -1)
            if mu.shape != (d,) or sigma.shape != (d, d):
                want = f"({dim},) and ({dim}, {dim})" if dim else "(D,) and (D, D)"
                raise ValueError(f"{what} {path}: {mk} {mu.shape} / {sk} {sigma.shape}, expected {want}")
            if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
                raise ValueError(f"{what} {path}: {mk}/{sk} hold NaN or inf")
            stats[name] = (mu, sigma)
    return Batch(Path(path), images, stats)


def write_reference(path: str | Path, images: np.ndarray, stats: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    """Write an ADM-format reference batch atomically: ``arr_0`` (uint8 NHWC) plus the statistics given
    (``mu``/``sigma``, ``mu_s``/``sigma_s``, optionally ``mu_dinov2``/``sigma_dinov2``), uncompressed."""
    check_images(images, f"reference images for {path}")
    arrays: dict[str, np.ndarray] = {"arr_0": np.ascontiguousarray(images)}
    for name, (mu, sigma) in stats.items():
        mk, sk, _ = STAT_KEYS[name]
        arrays[mk], arrays[sk] = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return path
