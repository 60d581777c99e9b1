"""What both shard loaders (``data=wds``, ``data=mds``) read from a shard directory before any sample.

:class:`ShardDataset` is their common base: it opens the manifest (:func:`open_manifest`), builds the
latent codec and loads the cached empty prompt (:func:`empty_prompt_context`). With a ``remote``, those
files are first copied into the local cache (:func:`fetch`), as the WebDataset loader also does for each
shard.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigdit.data.schema import EMPTY_PROMPT_NAME, MANIFEST_NAME, Manifest, SchemaError
from bigdit.fsio import atomic_path


def fetch(remote: str, root: str | Path, relpath: str) -> Path:
    """Copy ``remote/relpath`` to ``root/relpath`` unless cached (any remote that MosaicML Streaming reads:
    s3://, gs://, oci://, azure://, hf://, sftp://, or a plain path). Written atomically, so ranks and
    workers sharing a cache never read a partial file."""
    # Imported here, not at the top: importing streaming takes seconds, and most runs read local shards.
    from streaming.base.storage.download import CloudDownloader

    local = Path(root) / relpath
    if not local.is_file():
        local.parent.mkdir(parents=True, exist_ok=True)
        url = f"{remote.rstrip('/')}/{relpath}"
        with atomic_path(local) as tmp:
            try:
                CloudDownloader.direct_download(url, str(tmp))
            except Exception as e:  # the cloud clients raise many types; name the file
                raise OSError(f"cannot download {url} to {local}: {e}") from e
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
    """What both shard loaders learn from a shard directory's manifest before reading any sample: the latent
    codec, the sample shape, classes, text embeddings and expected shapes."""

    format: str

    def _open_shards(self, root: str, remote: str | None, flip: bool,
                     repa_feats: bool = False) -> dict[str, tuple[int, ...]]:
        """Read the manifest of ``root`` (fetched from ``remote`` first); the array fields' expected shapes.

        ``repa_feats``: deliver the stored REPA features (refused when the shards have none, or with flips:
        the features are of the unflipped image, so a flipped latent would be aligned to the wrong image)."""
        self.root = str(root)
        self.manifest = open_manifest(self.root, self.format, remote)
        self.codec = self.manifest.codec(use_flip=flip)
        self.sample_shape = tuple(self.manifest.latent_shape)
        self.num_classes = self.manifest.num_classes
        self.text_dim = None if self.manifest.text is None else int(self.manifest.text["dim"])
        #: cached empty-prompt CLIP tokens (T, D) for caption dropout; None without text embeddings
        self.empty_context = empty_prompt_context(self.root, self.manifest, remote)
        #: identifies the shard set: a checkpoint records it, and resuming on changed shards is refused
        self.manifest_sha256 = hashlib.sha256((Path(self.root) / MANIFEST_NAME).read_bytes()).hexdigest()
        #: the manifest's record of the REPA features the batches carry (``repa_feats``); None when not delivered
        self.repa = self.manifest.repa if repa_feats else None
        if repa_feats and self.repa is None:
            raise SchemaError(f"{root} holds no REPA features: encode the images with tools/encode_latents.py "
                              f"repa_encoder=<timm name or folder> (or train with repa=none)")
        if repa_feats and self.codec.use_flip:
            raise SchemaError(f"{root}: REPA features are of the unflipped images, so flipped latents cannot be "
                              f"aligned to them: set data.flip=false (REPA trains without flips)")
        skip = {"moments_flip"} if not self.codec.use_flip else set()
        if not repa_feats:
            skip.add("repa_feats")  # not read into batches unless asked for: 256 x 768 float16 per sample
        return {k: v for k, v in self.manifest.shapes().items() if k not in skip}

    def check_same_shards(self, state: dict[str, Any]) -> None:
        """Refuse to resume from a checkpoint's data ``state`` taken on other shards (re-encoded, replaced or
        re-sharded under the run: the rest of the run would not see what an uninterrupted run sees)."""
        saved = state.get("manifest_sha256")
        if saved is not None and saved != self.manifest_sha256:
            raise SchemaError(f"the shards in {self.root} changed since the checkpoint was written ({MANIFEST_NAME} "
                              f"differs): resume on the shards the run started with, or start a new run.dir")
