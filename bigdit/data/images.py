"""Encoder inputs: image folders, img2dataset-style WebDataset tars and scikit-learn's digits, with ADM's center crop.

An input is listed as :class:`Item` records (cheap: no pixels read) so that every encoder rank sees the
same ordered list and can take a disjoint slice of it; :func:`load_pixels` then reads one item.
"""

from __future__ import annotations

import glob
import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DIGITS = "sklearn:digits"
_digits_cache: dict[str, np.ndarray] = {}  # load_digits once per process, not once per image


@dataclass
class Item:
    """One input image: where its pixels are, its key, label, caption and metadata."""

    key: str
    source: str                    # file path, tar path, or "sklearn:digits"
    offset: int = 0                # tar member data offset / digits index
    size: int = 0                  # tar member size
    cls: int = -1
    txt: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def sanitize_key(text: str) -> str:
    """A sample key from a path or id: dots and separators become underscores (keys contain no dots)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's center crop (guided-diffusion): BOX-halve while the short side is >= 2x, BICUBIC-resize the short
    side to ``image_size``, then crop the center. Returns uint8 (H, W, C)."""
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.array(image)
    y = (arr.shape[0] - image_size) // 2
    x = (arr.shape[1] - image_size) // 2
    return arr[y : y + image_size, x : x + image_size]


def list_inputs(spec: str) -> tuple[list[Item], list[str]]:
    """Items of an input and its sorted class names (empty without classes).

    ``spec`` is an image folder (class sub-folders give labels; images directly in it are unlabeled),
    a directory or glob of WebDataset ``.tar`` files (``jpg``/``png`` + ``txt`` + ``json`` members), or
    ``sklearn:digits``.
    """
    if spec == DIGITS:
        from bigdit.data.digits import load_digits_arrays

        _, labels = load_digits_arrays()
        return [Item(f"digit{i:05d}", DIGITS, offset=i, cls=int(c)) for i, c in enumerate(labels)], [str(d) for d in range(10)]
    tars = sorted(glob.glob(spec)) if any(c in spec for c in "*?[") else []
    path = Path(spec)
    if not tars and path.is_dir():
        tars = sorted(str(p) for p in path.glob("*.tar"))
        if not tars:
            return _list_folder(path)
    if not tars:
        raise FileNotFoundError(f"input={spec}: no such image folder or .tar files "
                                f"(give an image folder, a folder or glob of WebDataset tars, or {DIGITS})")
    return _list_tars(tars), []


def _list_folder(root: Path) -> tuple[list[Item], list[str]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    items: list[Item] = []
    for cls, name in enumerate(classes or [None]):
        folder = root / name if name is not None else root
        for p in sorted(folder.rglob("*") if name is not None else folder.iterdir()):
            if p.suffix.lower() in IMAGE_EXTS and p.is_file():
                rel = p.relative_to(root)
                items.append(Item(sanitize_key(str(rel.with_suffix(""))), str(p), cls=cls if name is not None else -1))
    if not items:
        raise FileNotFoundError(f"input={root}: no images ({', '.join(sorted(IMAGE_EXTS))}) in it or its class "
                                f"sub-folders")
    _check_unique(items, str(root))
    return items, classes


def _list_tars(tars: list[str]) -> list[Item]:
    items: list[Item] = []
    for tar_path in tars:
        groups: dict[str, dict[str, Any]] = {}
        try:
            with tarfile.open(tar_path) as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    key, _, ext = info.name.rsplit("/", 1)[-1].partition(".")
                    g = groups.setdefault(key, {})
                    ext = ext.lower()
                    if ext in ("jpg", "jpeg", "png", "webp"):
                        g["image"] = (info.offset_data, info.size)
                    elif ext == "txt":
                        g["txt"] = tar.extractfile(info).read().decode()
                    elif ext == "json":
                        g["json"] = json.loads(tar.extractfile(info).read())
        except tarfile.TarError as e:
            raise ValueError(f"input tar {tar_path} is corrupt ({e})") from e
        for key, g in groups.items():
            if "image" in g:
                offset, size = g["image"]
                items.append(Item(sanitize_key(key), tar_path, offset, size, txt=g.get("txt"), meta=g.get("json", {})))
    if not items:
        raise FileNotFoundError(f"no jpg/png members in {len(tars)} tar(s) starting with {tars[0]}")
    _check_unique(items, tars[0])
    return items


def _check_unique(items: list[Item], where: str) -> None:
    seen: set[str] = set()
    for it in items:
        if it.key in seen:
            raise ValueError(f"{where}: two inputs map to the sample key {it.key!r}; rename one of them")
        seen.add(it.key)


def load_pixels(item: Item, resolution: int) -> np.ndarray:
    """One item as float32 (C, H, W) in [-1, 1]: RGB, ADM center-cropped to ``resolution`` (digits: as they are)."""
    if item.source == DIGITS:
        from bigdit.data.digits import DIGITS_MAX, load_digits_arrays

        images = _digits_cache.get("x")
        if images is None:
            images = _digits_cache["x"] = load_digits_arrays()[0]
        return (images[item.offset] / (DIGITS_MAX / 2) - 1.0)[None].astype(np.float32)
    if item.size:
        with open(item.source, "rb") as f:
            f.seek(item.offset)
            image = Image.open(io.BytesIO(f.read(item.size)))
            image.load()
    else:
        image = Image.open(item.source)
        image.load()
    arr = center_crop_arr(image.convert("RGB"), resolution)
    return arr.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0

