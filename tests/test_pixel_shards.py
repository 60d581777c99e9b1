"""Pixel shards (``tools/encode_latents.py vae=none`` on images): ADM's centre crop, uint8 storage (a quarter of
float16 moments' bytes), both loaders reading them with random flips and an exact resume, clear errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from bigdit.batching import BatchPlan
from bigdit.data.images import center_crop_arr
from bigdit.data.mds import MdsLoader
from bigdit.data.schema import Manifest
from bigdit.data.shards import shard_io
from bigdit.data.wds import WdsLoader
from bigdit.train import CONFIG_DIR
from conftest import REPO, image

sys.path.insert(0, str(REPO / "tools"))
import encode_latents  # noqa: E402


def encode(**overrides):
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("encode_latents", overrides=[f"{k}={v}" for k, v in
                                                   {"num_workers": 0, "progress": "false", **overrides}.items()])
    return encode_latents.run(cfg)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """12 images of 2 classes, sizes that exercise both the BOX halving and the BICUBIC step."""
    root = tmp_path_factory.mktemp("images")
    for c in range(2):
        (root / f"class{c}").mkdir()
        for i in range(6):
            image(10 * c + i, size=(37 + 5 * i, 29 + 3 * c)).save(root / f"class{c}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def pixel_shards(folder, tmp_path_factory):
    base = tmp_path_factory.mktemp("pixel-shards")
    for fmt in ("wds", "mds"):
        encode(input=folder, out=base / fmt, format=fmt, vae="none", resolution=8, shard_size=3)
    return base


def test_center_crop_is_adms(tmp_path):
    """guided-diffusion's center_crop_arr spelled out for a 300x200 image at 64: BOX to 150x100 (100 < 128 stops
    the halving), BICUBIC so the short side is 64 (96x64), then the centre 64x64 (columns 16..79)."""
    img = image(3, size=(300, 200))
    want = img.resize((150, 100), resample=Image.BOX).resize((96, 64), resample=Image.BICUBIC)
    want = np.array(want)[:, 16:80]
    np.testing.assert_array_equal(center_crop_arr(img, 64), want)
    # several halvings (800x500 -> 400x250 -> 200x125 at 64: 125 < 128), odd sides rounded as ADM rounds them
    img = image(4, size=(801, 500))
    want = img.resize((400, 250), resample=Image.BOX).resize((200, 125), resample=Image.BOX)
    want = np.array(want.resize((round(200 * 64 / 125), 64), resample=Image.BICUBIC))
    x0 = (want.shape[1] - 64) // 2
    np.testing.assert_array_equal(center_crop_arr(img, 64), want[:, x0 : x0 + 64])


def test_pixel_shards_store_the_centre_crop_as_uint8(folder, pixel_shards):
    expected = {f"class{c}_{i}": center_crop_arr(Image.open(folder / f"class{c}" / f"{i}.png").convert("RGB"), 8)
                for c in range(2) for i in range(6)}
    for fmt in ("wds", "mds"):
        m = Manifest.load(pixel_shards / fmt)
        assert m.pixels and m.latent_dtype == "uint8" and m.latent_shape == [3, 8, 8] and m.flip
        assert m.fields() == ["key", "pixels", "cls", "json"]  # no moments, no stored flipped copy
        seen = {}
        for s in m.shards:
            for sample in shard_io(fmt).read_shard(pixel_shards / fmt, s["name"], s["count"]):
                seen[sample["key"]] = sample
        assert sorted(seen) == sorted(expected)
        for key, sample in seen.items():
            px = sample["pixels"]
            assert px.dtype == np.uint8 and px.shape == (3, 8, 8) and "moments" not in sample
            np.testing.assert_array_equal(px.transpose(1, 2, 0), expected[key])
            # a quarter of the bytes of float16 moments (mean and logvar, 2 x 3 channels) of the same image
            assert 4 * px.nbytes == np.zeros((6, 8, 8), np.float16).nbytes


def loader_batches(cls, root, steps, state=None, **kw):
    plan = BatchPlan(global_batch=4, world_size=1, micro_batch=2)
    loader = cls(str(root), plan, rank=0, seed=5, num_workers=0, **kw)
    if state is not None:
        loader.load_state_dict(state)
    out = {step: [(b["x"].clone(), b["y"].clone()) for b in loader.micro_batches(step)] for step in steps}
    return out, loader


@pytest.mark.parametrize("fmt", ["wds", "mds"])
def test_loaders_decode_flip_and_resume_exactly(pixel_shards, fmt):
    cls = {"wds": WdsLoader, "mds": MdsLoader}[fmt]
    root = pixel_shards / fmt
    stored = {}
    m = Manifest.load(root)
    for s in m.shards:
        for sample in shard_io(fmt).read_shard(root, s["name"]):
            stored[int(sample["cls"]), sample["pixels"].tobytes()] = torch.from_numpy(sample["pixels"].copy())
    full, _ = loader_batches(cls, root, range(6))
    flips = 0
    for batches in full.values():
        for x, y in batches:
            assert x.dtype == torch.float32 and x.shape[1:] == (3, 8, 8)
            for xi, yi in zip(x, y):  # x / 127.5 - 1 of a stored image, or of its mirror image
                u = ((xi + 1) * 127.5).round().to(torch.uint8)
                assert torch.allclose(xi, u.float() / 127.5 - 1, atol=1e-6)
                plain = (int(yi), u.numpy().tobytes()) in stored
                mirrored = (int(yi), u.flip(2).numpy().tobytes()) in stored
                assert plain or mirrored
                flips += mirrored and not plain
    assert 0 < flips < 6 * 4  # data.flip=true (ADM's random_flip): some flipped, not all
    unflipped, _ = loader_batches(cls, root, range(2), flip=False)
    assert all((int(y), ((x + 1) * 127.5).round().to(torch.uint8).numpy().tobytes()) in stored
               for b in unflipped.values() for xs, ys in b for x, y in zip(xs, ys))

    # exact resume: a loader restored from the state after step 2 yields steps 3-5 bit for bit
    _, crashed = loader_batches(cls, root, range(3))
    resumed, _ = loader_batches(cls, root, range(3, 6), state=crashed.state_dict())
    for step in range(3, 6):
        for (xa, ya), (xb, yb) in zip(full[step], resumed[step]):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_impossible_combinations_fail_before_any_work(folder, tiny_vae, tmp_path):
    with pytest.raises(ValueError, match=r"downsamples by 2.*resolution=14"):
        encode(input=folder, out=tmp_path / "a", vae=tiny_vae, resolution=15)
    with pytest.raises(ValueError, match="use vae=none"):
        encode(input="sklearn:digits", out=tmp_path / "b", vae=tiny_vae)
    with pytest.raises(ValueError, match="resolution must be positive"):
        encode(input=folder, out=tmp_path / "c", vae="none", resolution=0)
    assert not any((tmp_path / "a").glob("shard-*")) and not (tmp_path / "b").exists()
