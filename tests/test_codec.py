"""The sample contract and the latent codec: manifest round trip and fail-fast checks, moments sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from bigdit.codec import LOGVAR_MIN, LatentCodec, pixel_moments
from bigdit.data.images import center_crop_arr, sanitize_key
from bigdit.data.npy import npy_array, npy_bytes
from bigdit.data.schema import SCHEMA_VERSION, Manifest, SchemaError, check_key, validate_sample


def test_sampling_is_reparameterized_scaled_and_deterministic():
    mean = torch.randn(64, 4, 8, 8)
    logvar = torch.full_like(mean, 2 * np.log(0.5))  # std 0.5
    moments = torch.cat([mean, logvar], 1).half()
    codec = LatentCodec(scaling_factor=0.25, shift_factor=0.1)
    z = codec.sample(moments, generator=torch.Generator().manual_seed(0))
    again = codec.sample(moments, generator=torch.Generator().manual_seed(0))
    assert z.shape == (64, 4, 8, 8) and z.dtype == torch.float32 and torch.equal(z, again)
    eps = (z / 0.25 + 0.1 - moments[:, :4].float()) / 0.5
    assert abs(eps.mean().item()) < 0.05 and abs(eps.std().item() - 1) < 0.05
    exact = torch.cat([mean, torch.full_like(mean, LOGVAR_MIN)], 1)  # zero variance: sampling returns the mean
    assert torch.allclose(codec.to_vae(codec.sample(exact)), mean, atol=1e-5)  # to_vae inverts the scaling


def test_flip_picks_either_moments_at_random():
    a = pixel_moments(torch.zeros(200, 1, 2, 2))
    b = pixel_moments(torch.ones(200, 1, 2, 2))
    z = LatentCodec().sample(a, b, generator=torch.Generator().manual_seed(1))
    picked = z.mean((1, 2, 3)).round()
    assert set(picked.tolist()) == {0.0, 1.0} and 60 < picked.sum() < 140
    assert torch.equal(LatentCodec(use_flip=False).sample(a, b).round(), torch.zeros(200, 1, 2, 2))


def test_pixel_moments_decode_to_the_pixels():
    x = torch.rand(3, 3, 4, 4) * 2 - 1
    z = LatentCodec().sample(pixel_moments(x), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(z, x.half().float(), atol=1e-5)


def test_manifest_round_trip_and_stale_schema(tmp_path):
    m = Manifest(format="wds", latent_shape=[4, 32, 32], vae="stabilityai/sd-vae-ft-ema", scaling_factor=0.18215,
                 flip=True, classes=["cat", "dog"], text={"model": "ViT-L-14", "pretrained": "openai",
                                                          "layer": "last", "tokens": 77, "dim": 768})
    m.save(tmp_path)
    back = Manifest.load(tmp_path)
    assert back == m and back.num_classes == 2
    assert back.shapes() == {"moments": (8, 32, 32), "moments_flip": (8, 32, 32), "clip_tokens": (77, 768),
                             "clip_pooled": (768,)}
    raw = (tmp_path / "manifest.json").read_text().replace(f'"schema_version": {SCHEMA_VERSION}', '"schema_version": 0')
    (tmp_path / "manifest.json").write_text(raw)
    with pytest.raises(SchemaError, match="schema version 0"):
        Manifest.load(tmp_path)
    with pytest.raises(SchemaError, match="not a finished shard directory"):
        Manifest.load(tmp_path / "missing")


def test_keys_arrays_and_sample_validation():
    assert check_key("n01440764_10026") == "n01440764_10026"
    for bad in ("a.b", "", "x/y"):
        with pytest.raises(SchemaError):
            check_key(bad)
    assert sanitize_key("n0144/img.1.JPEG") == "n0144_img_1_JPEG"
    a = np.random.rand(8, 4, 4).astype(np.float16)
    data = npy_bytes(a)
    assert np.array_equal(npy_array(data), a)
    with pytest.raises(SchemaError, match="truncated"):
        npy_array(data[:-10])
    m = Manifest(format="wds", latent_shape=[4, 4, 4], classes=["a"])
    assert validate_sample({"key": "k", "moments": a, "cls": 0, "json": {}}, m) == []
    a[0, 0, 0] = np.nan
    problems = validate_sample({"key": "k", "moments": a[:6], "cls": 3}, m)
    assert any("shape" in p for p in problems) and any("json" in p for p in problems)
    assert any("cls=3" in p for p in problems)
    assert validate_sample({"key": "k", "moments": a, "cls": 0, "json": {}}, m) == ["moments has NaN/inf values"]


def test_adm_center_crop():
    image = Image.fromarray(np.random.randint(0, 255, (300, 500, 3), np.uint8))
    out = center_crop_arr(image, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
