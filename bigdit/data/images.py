"""Encoder inputs: image folders, scikit-learn's digits and WebDataset tars (as img2dataset writes them), with
ADM's center crop.

Folders and digits are listed as :class:`Item` records (cheap: no pixels read) so that every encoder rank sees
the same ordered list and can take a disjoint slice of it; :func:`load_pixels` then reads one item.
WebDataset inputs are URL specs (:func:`input_tars` expands one into its tars) read through the webdataset
library one tar at a time (:func:`tar_samples`); :func:`decode_sample` turns one of their samples into pixels.
"""

from __future__ import annotations

import glob
import io
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
from PIL import Image, UnidentifiedImageError
from webdataset.gopen import Pipe, gopen_schemes
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
#: Tar member extensions read as the image of a WebDataset sample.
IMAGE_MEMBERS = tuple(sorted(e[1:] for e in IMAGE_EXTS))
DIGITS = "sklearn:digits"
#: URL schemes webdataset's gopen opens (pipe:, http(s), gs, hf, ...), besides local paths.
URL_SCHEMES = sorted({*gopen_schemes, "file"} - {"__default__"})
_digits_cache: dict[str, np.ndarray] = {}  # load_digits once per process, not once per image


@dataclass
class Item:
    """One listed input image: where its pixels are, its key and label."""

    key: str
    source: str                    # file path, or "sklearn:digits"
    offset: int = 0                # digits index
    cls: int = -1


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
    """Items of a listed input and its sorted class names (empty without classes).

    ``spec`` is an image folder (class sub-folders give labels; images directly in it are unlabeled) or
    ``sklearn:digits``; WebDataset tars are streamed instead (:func:`input_tars`).
    """
    if spec == DIGITS:
        from bigdit.data.digits import load_digits_arrays

        _, labels = load_digits_arrays()
        return [Item(f"digit{i:05d}", DIGITS, offset=i, cls=int(c)) for i, c in enumerate(labels)], [str(d) for d in range(10)]
    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(f"input={spec}: no such image folder or .tar files (give an image folder, WebDataset "
                                f"tars as a path, folder, glob, brace pattern, pipe: command or URL, or {DIGITS})")
    return _list_folder(path)


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
    seen: set[str] = set()
    for it in items:
        if it.key in seen:
            raise ValueError(f"{root}: two inputs map to the sample key {it.key!r}; rename one of them")
        seen.add(it.key)
    return items, classes


def _to_pixels(image: Image.Image, resolution: int) -> np.ndarray:
    arr = center_crop_arr(image.convert("RGB"), resolution)
    return arr.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0


def load_pixels(item: Item, resolution: int) -> np.ndarray:
    """One item as float32 (C, H, W) in [-1, 1]: RGB, ADM center-cropped to ``resolution`` (digits: as they are)."""
    if item.source == DIGITS:
        from bigdit.data.digits import DIGITS_MAX, load_digits_arrays

        images = _digits_cache.get("x")
        if images is None:
            images = _digits_cache["x"] = load_digits_arrays()[0]
        return (images[item.offset] / (DIGITS_MAX / 2) - 1.0)[None].astype(np.float32)
    image = Image.open(item.source)
    image.load()
    return _to_pixels(image, resolution)


# ------------------------------------------------------------------------------------------ WebDataset tars


def _local_path(url: str) -> str | None:
    """The file a URL names when webdataset opens it as a local file (a plain path or file://), else None."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return url2pathname(parsed.path)
    return url if not parsed.scheme else None


def input_tars(spec: str) -> list[str] | None:
    """The WebDataset tars of ``input=spec`` in order, as URLs webdataset opens; None for an image folder or
    ``sklearn:digits`` (:func:`list_inputs`).

    Local tars: a ``.tar`` file, a folder holding ``*.tar`` files, a glob (``/data/*.tar``) or a brace pattern
    (``/data/shard-{000000..000999}.tar``), every path checked to exist. Anything else webdataset's ``gopen``
    opens, with the same brace patterns: ``pipe:<command writing a tar to stdout>`` (e.g. ``pipe:aws s3 cp
    s3://bucket/shard-{000000..000999}.tar -``), ``http(s)://`` (read with curl), ``gs://`` (gsutil), ``hf://``,
    ``file://``; several specs join with ``::`` (webdataset's ``expand_urls``).
    """
    if spec == DIGITS:
        return None
    if not urlparse(spec).scheme and "{" not in spec and "::" not in spec:  # a local path or glob
        path = Path(spec)
        if any(c in spec for c in "*?["):
            tars = sorted(p for p in glob.glob(spec) if Path(p).is_file())
            if not tars:
                raise FileNotFoundError(f"input={spec}: the pattern matches no files")
            return tars
        if path.is_dir():
            return sorted(str(p) for p in path.glob("*.tar")) or None  # no tars: an image folder
        return [spec] if path.is_file() and path.suffix == ".tar" else None
    urls = expand_urls(spec)
    for url in urls:
        scheme = urlparse(url).scheme
        if _local_path(url) is None and scheme not in URL_SCHEMES:
            raise ValueError(f"input={spec}: webdataset opens no {scheme}: URLs (it opens local paths and "
                             f"{', '.join(s + ':' for s in URL_SCHEMES)}); for s3:// give a command that writes the "
                             f"tar to stdout, e.g. input='pipe:aws s3 cp s3://bucket/shard-{{000000..000099}}.tar -'")
    missing = [u for u in urls if (p := _local_path(u)) is not None and not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"input={spec}: {len(missing)} of the {len(urls)} local tars it names do not exist "
                                f"(first: {missing[0]}): fix the path or the pattern's range")
    return urls


def _check_hint(url: str) -> str:
    """How a user checks by hand that ``url`` yields a tar."""
    scheme = urlparse(url).scheme
    if scheme == "pipe":
        return (f"the command must write a tar to stdout (its own errors are printed above): try "
                f"`{url[5:]} | tar t | head` in a shell")
    if scheme in ("http", "https", "sftp", "ftps", "scp"):  # webdataset reads these with curl
        return f"check it with `curl -fsSL '{url}' | tar t | head`"
    if _local_path(url) is None:
        return "check the URL and the credentials of its tool"
    return f"check it with `tar tf {_local_path(url)}`"


class TarReadError(OSError):
    """An input tar that cannot be opened or read; the message names it and how to check it by hand."""


def _failed_status(exn: Exception) -> int | None:
    """The exit status of the ``pipe:``/curl command behind a tar reading error, when the command failed.

    webdataset's stages append the stream to the error's args; a ``Pipe`` that stopped early (a failing
    command writes nothing) may not have been waited for yet.
    """
    pipe = next((a for a in exn.args if isinstance(a, Pipe)), None)
    if pipe is None:
        return None
    pipe.stream.close()  # a command still writing gets SIGPIPE and exits
    status = pipe.proc.wait(timeout=60)
    return status if status > 0 and status not in (*pipe.ignore_status, 141) else None  # 141: our SIGPIPE


def _closing(sources: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """url_opener's sources, each stream closed once the next one is asked for (its tar fully read).

    Closing a webdataset ``Pipe`` (pipe:, and curl for http) waits for the command and raises on a non-zero
    exit; ``wds.tarfile_to_samples`` never closes its streams, so a command dying right after a whole tar
    member would pass as a shorter tar.
    """
    for source in sources:
        yield source
        try:
            source["stream"].close()
        except Exception as exn:
            exn.args = (*exn.args, source["stream"])  # as webdataset's stages do: _failed_status finds the command
            raise


def tar_samples(url: str) -> Iterator[dict[str, Any]]:
    """The samples of one WebDataset tar, as webdataset groups its members: ``__key__`` (the member path before
    the first dot of its name), ``__url__``, and the bytes of each member by extension (``jpg``, ``txt``, ...).

    The stages of ``wds.tarfile_to_samples`` (gopen, tar member iteration, grouping by key) plus a check of the
    command's exit status (:func:`_closing`). Raises :class:`TarReadError` when the tar cannot be opened or read.
    """
    try:
        yield from group_by_keys(tar_file_expander(_closing(url_opener([{"url": url}]))))
    except Exception as exn:
        status = _failed_status(exn)
        if status:
            reason = f"the command exited with status {status}"
        else:  # webdataset appends " @ <stream>" to the first arg of member errors
            first = getattr(exn, "strerror", None) or (str(exn.args[0]).split(" @ ")[0] if exn.args else "")
            reason = f"{type(exn).__name__}: {first}"
        raise TarReadError(f"cannot read input tar {url} ({reason}); {_check_hint(url)}") from exn


def decode_sample(sample: dict[str, Any], resolution: int) -> tuple[np.ndarray, str | None, dict[str, Any]]:
    """Pixels (as :func:`load_pixels` gives them), caption (``txt`` member) and metadata (``json`` member) of one
    sample of :func:`tar_samples`. Raises ValueError when it has no image member or its members do not decode."""
    ext = next((e for e in IMAGE_MEMBERS if e in sample), None)
    if ext is None:
        members = sorted(k for k in sample if not k.startswith("__"))
        raise ValueError(f"no image member ({'/'.join(IMAGE_MEMBERS)}), only {members}")
    try:
        image = Image.open(io.BytesIO(sample[ext]))
        image.load()
    except UnidentifiedImageError:  # PIL's message names the BytesIO object, which tells nothing
        raise ValueError(f"its {ext} member is no image PIL can read") from None
    except Exception as e:
        raise ValueError(f"its {ext} member does not decode ({type(e).__name__}: {e})") from e
    try:
        txt = sample["txt"].decode() if "txt" in sample else None
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except ValueError as e:  # UTF-8 and JSON errors: the caller skips and counts the sample, as for images
        raise ValueError(f"its txt or json member does not decode ({type(e).__name__}: {e})") from e
    return _to_pixels(image, resolution), txt, meta
