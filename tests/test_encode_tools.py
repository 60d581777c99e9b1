"""tools/encode_latents.py and tools/cache_text.py with a tiny random AutoencoderKL and open_clip text tower
loaded back through the real loading code, then verified on both shard formats."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from bigdit.data.mds import MdsLoader
from bigdit.batching import BatchPlan
from bigdit.data.schema import EMPTY_PROMPT_NAME, Manifest
from bigdit.train import CONFIG_DIR

from conftest import REPO, image

sys.path.insert(0, str(REPO / "tools"))
import cache_text  # noqa: E402
import encode_latents  # noqa: E402
import shards  # noqa: E402


def tool_cfg(name: str, **overrides):
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        return compose(name, overrides=[f"{k}={v}" for k, v in {"progress": False, **overrides}.items()])


def encode(**overrides):
    return encode_latents.run(tool_cfg("encode_latents", num_workers=0, **overrides))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    for c, cls in enumerate(["dog", "cat"]):
        (root / cls).mkdir()
        for i in range(5):
            image(10 * c + i).save(root / cls / f"img.{i}.png")
    return root


def test_image_folder_through_tiny_vae_on_both_formats(tmp_path, tiny_vae, image_folder):
    for fmt in ("wds", "mds"):
        m = encode(input=image_folder, out=tmp_path / fmt, format=fmt, vae=tiny_vae, resolution=16, shard_size=4,
                   batch_size=3)
        assert m.classes == ["cat", "dog"] and m.count == 10 and len(m.shards) == 3
        assert m.latent_shape == [4, 8, 8] and m.scaling_factor == 0.5 and m.flip
        assert Manifest.load(tmp_path / fmt).stats["std"][0] > 0
        assert shards.verify(str(tmp_path / fmt), out=io.StringIO()) == 0
    a = [s for n in m.shards for s in shards.shard_io("wds").read_shard(tmp_path / "wds", n["name"])]
    b = [s for n in m.shards for s in shards.shard_io("mds").read_shard(tmp_path / "mds", n["name"])]
    assert [s["key"] for s in a] == [s["key"] for s in b]
    assert {s["key"]: s["cls"] for s in a}["cat_img_0"] == 0
    # CPU fp32 encoding is deterministic: both formats hold the same moments
    assert all(np.array_equal(x["moments"], y["moments"]) and np.array_equal(x["moments_flip"], y["moments_flip"])
               for x, y in zip(a, b))


def test_captions_encode_cache_text_verify_and_load(tmp_path, tiny_vae, caption_tars, tiny_clip):
    config, weights = tiny_clip
    for fmt in ("wds", "mds"):
        encode(input=caption_tars, out=tmp_path / f"lat-{fmt}", format=fmt, vae=tiny_vae, resolution=16, flip=False,
               shard_size=2)
        m = cache_text.run(tool_cfg("cache_text", shards=tmp_path / f"lat-{fmt}", out=tmp_path / f"txt-{fmt}",
                                    clip_model="tiny-clip-test", pretrained=weights, model_config=config, layer="penultimate",
                                    batch_size=4))
        assert m.text["dim"] == 32 and m.text["pooled_dim"] == 24 and m.text["tokens"] == 77 and m.num_classes == 0
        assert shards.verify(str(tmp_path / f"txt-{fmt}"), out=io.StringIO()) == 0
        empty = np.load(tmp_path / f"txt-{fmt}" / EMPTY_PROMPT_NAME)
        assert empty["tokens"].shape == (77, 32) and empty["pooled"].shape == (24,)
    sample = next(shards.shard_io("wds").read_shard(tmp_path / "txt-wds", m.shards[0]["name"]))
    assert sample["txt"].startswith("photo number") and sample["json"]["url"].startswith("http://x/")
    assert sample["clip_tokens"].dtype == np.float16
    loader = MdsLoader(str(tmp_path / "txt-mds"), BatchPlan(2, 1, 2), rank=0, seed=0, num_workers=0)
    batch = next(loader.micro_batches(0))
    assert batch["x"].shape == (2, 4, 8, 8) and batch["clip_tokens"].shape == (2, 77, 32)
    assert batch["clip_pooled"].shape == (2, 24)
    torch.testing.assert_close(loader.empty_context, torch.from_numpy(empty["tokens"]).float())  # caption dropout


def test_multi_rank_encoding_is_disjoint_complete_and_resumable(tmp_path):
    out = tmp_path / "wds"
    common = dict(input="sklearn:digits", out=out, vae="none", flip=False, limit=100, shard_size=16, world_size=3)
    assert encode(rank=0, **common) is None  # others still own shards: no manifest yet
    assert not (out / "manifest.json").exists()
    encode(rank=2, **common)
    m = encode(rank=1, **common)  # the last one to finish writes the manifest
    assert m.count == 100 and len(m.shards) == 7
    keys = [s["key"] for n in m.shards for s in shards.shard_io("wds").read_shard(out, n["name"])]
    assert len(keys) == len(set(keys)) == 100
    assert set(keys) == {f"digit{i:05d}" for i in range(100)}
    # A crash leaves only a temporary file (of the killed process); rerunning redoes exactly the unrecorded shard
    # and removes the leftover.
    (out / "shard-000003.tar").rename(out / ".shard-000003.tar.99999.tmp")
    (out / "shard-000003.json").unlink()
    before = (out / "shard-000001.tar").stat().st_mtime_ns
    m2 = encode(rank=0, world_size=1, **{k: v for k, v in common.items() if k != "world_size"})
    assert m2.shards == m.shards and (out / "shard-000003.tar").is_file()
    assert not list(out.glob(".*.tmp"))
    assert (out / "shard-000001.tar").stat().st_mtime_ns == before
    assert shards.verify(str(out), out=io.StringIO()) == 0
    with pytest.raises(ValueError, match="other settings.*shard_size"):
        encode(**dict(common, shard_size=10))


def test_bad_inputs_are_named_before_any_work(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such image folder"):
        encode(input=tmp_path / "nope", out=tmp_path / "o")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images"):
        encode(input=tmp_path / "empty", out=tmp_path / "o")
    with pytest.raises(ValueError, match="format='tfrecord'"):
        encode(input="sklearn:digits", out=tmp_path / "o", format="tfrecord")
    with pytest.raises(ValueError, match="vae="):
        encode(input="sklearn:digits", out=tmp_path / "o", vae=tmp_path / "novae", limit=4)


@pytest.mark.slow
def test_cli_help_and_run(tmp_path):
    py = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").is_dir() else sys.executable
    help_text = subprocess.run([py, "tools/encode_latents.py", "--help"], cwd=REPO, capture_output=True, text=True,
                               check=True).stdout
    assert "shard_size" in help_text and "resumably" in help_text and "world_size" in help_text
    out = subprocess.run([py, "tools/encode_latents.py", "input=sklearn:digits", f"out={tmp_path}", "vae=none",
                          "limit=64", "shard_size=32", "progress=false"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    assert "64 samples, 2 wds shards" in out and "per-channel latent std" in out


def test_cache_text_splits_shards_between_ranks_like_one_process(tmp_path, caption_tars, tiny_clip):
    """Two ranks each caption their shards (i % 2); the second to finish writes the manifest and empty prompt,
    and the result is what one process writes."""
    config, weights = tiny_clip
    encode(input=caption_tars, out=tmp_path / "lat", vae="none", resolution=8, flip=False, shard_size=2)
    common = dict(shards=tmp_path / "lat", clip_model="tiny-clip-test", pretrained=weights, model_config=config)
    one = cache_text.run(tool_cfg("cache_text", out=tmp_path / "one", **common))
    assert cache_text.run(tool_cfg("cache_text", out=tmp_path / "two", rank=0, world_size=2, **common)) is None
    assert sorted(p.name for p in (tmp_path / "two").glob("*.json")) == [f"{s['name']}.json" for s in one.shards[::2]]
    two = cache_text.run(tool_cfg("cache_text", out=tmp_path / "two", rank=1, world_size=2, **common))
    assert two == one and (tmp_path / "two" / EMPTY_PROMPT_NAME).is_file()
    for name in (s["name"] for s in one.shards):
        for a, b in zip(shards.shard_io("wds").read_shard(tmp_path / "one", name),
                        shards.shard_io("wds").read_shard(tmp_path / "two", name)):
            assert a["key"] == b["key"] and np.array_equal(a["clip_tokens"], b["clip_tokens"])
