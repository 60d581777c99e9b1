"""REPA end to end with a tiny random ViT: encoder features in shards, the checks before training, the alignment
loss and its stop step, export without the projector, and 2 ranks equal to 1 under DDP, FSDP2 and ZeRO-3."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from bigdit.checkpoint import latest_checkpoint
from bigdit.data.schema import Manifest
from bigdit.data.wds import read_shard
from bigdit.export import consolidated_weights
from bigdit.inference import load_run
from bigdit.metrics import read_metrics
from bigdit.repa import PROJECTOR, alignment_loss, alignment_weight
from bigdit.train import CONFIG_DIR, setup, train

from conftest import REPO

#: digits through a 4x4-patch DiT; the encoder sees them at 56 px (4x4 patches of 14): one feature per token
TINY = ["experiment=demo", "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "run.global_batch=16",
        "run.log_every=1", "run.ckpt_every=3", "ema.decay=0.9", "optim.warmup_steps=0", "optim.schedule=constant",
        "optim.lr=2e-3"]
#: the REPA shards through the WebDataset loader, in the training process, without flips (REPA's)
DATA = ["data=wds", "data.num_workers=0", "data.flip=false"]


def repa_on(encoder: Path) -> list[str]:
    return ["repa=dinov2_b", f"repa.encoder={encoder}", "repa.feature_dim=32", "repa.depth=1", "repa.projector_dim=16"]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    """A 2-block random DINOv2-style ViT (32 wide) in a local timm folder, as timm's save_for_hf writes it."""
    import timm
    from timm.models._hub import save_for_hf

    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, depth=2, embed_dim=32,
                            num_heads=2, img_size=56)
    folder = tmp_path_factory.mktemp("tiny-dinov2")
    save_for_hf(vit, str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory, encoder) -> Path:
    """96 digits in 12 WebDataset shards of 8 with REPA features, made by tools/encode_latents.py (flips stored too)."""
    sys.path.insert(0, str(REPO / "tools"))
    import encode_latents

    out = tmp_path_factory.mktemp("repa-shards")
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("encode_latents", overrides=["input=sklearn:digits", f"out={out}", "limit=96", "shard_size=8",
                                                   "num_workers=0", "progress=false", f"repa_encoder={encoder}",
                                                   "repa_input_size=56"])
    encode_latents.run(cfg)
    return out


def train_cfg(run_dir: Path, shards: Path | None, *overrides: str):
    """The tiny run on ``shards`` (None: the demo's in-memory digits)."""
    data = [] if shards is None else [*DATA, f"data.root={shards}"]
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        return compose("train", overrides=[*TINY, *data, f"run.dir={run_dir}", *overrides])


# ------------------------------------------------------------------------------------------- the pure parts


def test_alignment_loss_is_minus_one_aligned_zero_orthogonal_one_opposite():
    a = torch.randn(3, 5, 8)
    torch.testing.assert_close(alignment_loss(2 * a, a), torch.full((3,), -1.0))  # scale does not matter
    torch.testing.assert_close(alignment_loss(-a, a), torch.ones(3))
    e = torch.eye(8)
    torch.testing.assert_close(alignment_loss(e[None, :1], e[None, 1:2]), torch.zeros(1))
    half = torch.stack([a[0], -a[0]])[None].reshape(1, 10, 8)  # half the patches aligned, half opposite
    torch.testing.assert_close(alignment_loss(half, torch.cat([a[0], a[0]])[None]), torch.zeros(1), atol=1e-6,
                               rtol=0)
    with pytest.raises(ValueError, match="differ in shape"):
        alignment_loss(a, a[:, :4])


def test_alignment_weight_is_the_coefficient_until_the_stop_step():
    assert [alignment_weight(s, 0.5, 3) for s in range(5)] == [0.5, 0.5, 0.5, 0.0, 0.0]
    assert alignment_weight(10**6, 0.5, None) == 0.5


# ------------------------------------------------------------------------------------------------ the data


def test_shards_hold_the_encoders_patch_features_and_the_manifest_names_it(shards, encoder):
    from bigdit.data.images import DIGITS, Item, load_pixels
    from bigdit.repa_features import load_patch_encoder

    manifest = Manifest.load(shards)
    assert manifest.repa == {"encoder": str(encoder), "model": "vit_small_patch14_dinov2", "input_size": 56,
                             "layer": 1, "tokens": 16, "dim": 32}
    assert manifest.shapes()["repa_feats"] == (16, 32) and "repa_feats" in manifest.fields()
    sample = next(read_shard(shards, manifest.shards[0]["name"]))
    assert sample["repa_feats"].dtype == np.float16 and sample["repa_feats"].shape == (16, 32)
    # the stored features are the encoder's on that very image (the key names the digit)
    pixels = torch.from_numpy(load_pixels(Item(sample["key"], DIGITS, offset=int(sample["key"][5:])), 8))[None]
    expected = load_patch_encoder(str(encoder), 56)(pixels)[0].half().numpy()
    np.testing.assert_allclose(sample["repa_feats"].astype(np.float32), expected.astype(np.float32), atol=2e-3)


def test_both_loaders_deliver_each_samples_features_only_when_asked(shards, tmp_path):
    sys.path.insert(0, str(REPO / "tools"))
    import shards as shards_tool

    from bigdit.batching import BatchPlan
    from bigdit.data.mds import MdsLoader
    from bigdit.data.wds import WdsLoader

    stored = {s["key"]: s["repa_feats"] for shard in Manifest.load(shards).shards
              for s in read_shard(shards, shard["name"])}
    shards_tool.convert(str(shards), str(tmp_path / "mds"), progress=False)
    plan = BatchPlan.from_config(8, None, 1)
    for loader, root in ((WdsLoader, shards), (MdsLoader, tmp_path / "mds")):
        data = loader(str(root), plan, 0, 0, num_workers=0, flip=False, repa_feats=True)
        batch = next(data.raw_micro_batches(0))
        assert batch["repa_feats"].dtype == torch.float16 and data.repa["dim"] == 32
        np.testing.assert_array_equal(batch["repa_feats"].numpy(), np.stack([stored[k] for k in batch["key"]]))
        data.close()
        plain = loader(str(root), plan, 0, 0, num_workers=0, flip=False)
        assert "repa_feats" not in next(plain.micro_batches(0)) and plain.repa is None
        plain.close()


@pytest.mark.parametrize("case", ["no features", "other encoder", "flips", "other width", "in-memory data", "U-ViT"])
def test_training_refuses_a_repa_run_it_cannot_align_before_any_compute(case, shards, encoder, tmp_path,
                                                                        monkeypatch):
    from bigdit.engine.ddp import DDPStrategy

    root, overrides = shards, repa_on(encoder)
    if case == "no features":
        root = tmp_path / "plain"
        shutil.copytree(shards, root)
        raw = json.loads((root / "manifest.json").read_text())
        (root / "manifest.json").write_text(json.dumps(dict(raw, repa=None)))
    extra = {"no features": [], "other encoder": ["repa.encoder=vit_base_patch14_dinov2.lvd142m"],
             "flips": ["data.flip=true"], "other width": ["repa.feature_dim=768"], "in-memory data": [],
             "U-ViT": ["model=uvit", "model.name=U-ViT-S/2", "model.learn_sigma=false"]}[case]
    match = {"no features": "holds no REPA features", "other encoder": "features of repa_encoder=",
             "flips": "data.flip=false", "other width": "repa.feature_dim=32", "in-memory data": "reads none",
             "U-ViT": "supports DiT"}[case]
    monkeypatch.setattr(DDPStrategy, "setup", lambda *a, **k: pytest.fail("reached the strategy setup"))
    with pytest.raises(ValueError, match=match):
        setup(train_cfg(tmp_path / "run", None if case == "in-memory data" else root, *overrides, *extra))


# ------------------------------------------------------------------------------------- training and export


#: unshuffled shards of 8 samples, micro-batches of 8 per rank: 2 ranks read shards (0, 1), (2, 3), ... per step, one
#: rank reads them in the same order, so both see the same global batches (the WebDataset order otherwise depends
#: on the number of ranks)
SAME_DATA = ["data.shuffle=false", "run.steps=4"]


@pytest.fixture(scope="module")
def runs(shards, encoder, tmp_path_factory) -> dict[str, Path]:
    """One process, DDP, 4 steps without REPA, with it, and with it stopped at step 0 (weight 0 throughout)."""
    root = tmp_path_factory.mktemp("repa-runs")
    overrides = {"none": [], "on": repa_on(encoder), "stopped": [*repa_on(encoder), "repa.stop_step=0"]}
    for name, extra in overrides.items():
        train(train_cfg(root / name, shards, *SAME_DATA, *extra))
    return {name: root / name for name in overrides}


@pytest.mark.slow
def test_alignment_trains_logs_stops_and_export_drops_the_projector(runs, shards):
    on = read_metrics(runs["on"] / "metrics.jsonl")
    assert all(-1 <= r["repa_loss"] <= 1 for r in on) and on[-1]["repa_loss"] < on[0]["repa_loss"]
    assert "repa_loss" not in read_metrics(runs["none"] / "metrics.jsonl")[0]

    ckpt = {name: latest_checkpoint(run / "checkpoints") for name, run in runs.items()}
    saved = torch.load(ckpt["on"] / "state.pt", weights_only=False)
    assert any(k.startswith(f"{PROJECTOR}.") for k in saved["model"]) and f"{PROJECTOR}.0.weight" in saved["ema"]
    model_cfg = train_cfg(runs["on"], shards).model
    weights = {name: consolidated_weights(c, model_cfg, "model") for name, c in ckpt.items()}
    assert not any(k.startswith(PROJECTOR) for k in weights["on"])  # export and sampling get the bare model
    load_run(runs["on"])  # strict load into the bare DiT

    # stop_step=0: the term is weighted 0 from the start, so the model learns exactly what it learns without REPA
    for k in weights["none"]:
        assert torch.equal(weights["stopped"][k], weights["none"][k]), k
    assert any(not torch.equal(weights["on"][k], weights["none"][k]) for k in weights["none"])


def launch(run_dir: Path, ranks: int, *overrides: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m",
           "bigdit.train", *TINY, *DATA, f"run.dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [["strategy=ddp"], ["strategy=fsdp2"],
                                      ["strategy=deepspeed", "strategy.zero_stage=3"]], ids=["ddp", "fsdp2", "zero3"])
def test_two_ranks_equal_one_rank_step_for_step(strategy, runs, shards, encoder, tmp_path):
    one_rank = runs["on"]
    launch(tmp_path, 2, f"data.root={shards}", *SAME_DATA, *repa_on(encoder), *strategy)
    want, got = read_metrics(one_rank / "metrics.jsonl"), read_metrics(tmp_path / "metrics.jsonl")
    for key in ("loss", "repa_loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in got], [r[key] for r in want], rtol=1e-5, err_msg=key)
    model_cfg = train_cfg(one_rank, shards).model
    a = consolidated_weights(latest_checkpoint(one_rank / "checkpoints"), model_cfg, "ema")
    b = consolidated_weights(latest_checkpoint(tmp_path / "checkpoints"), model_cfg, "ema")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("preset, kind", [("sit_xl2_repa_in256", "flow"), ("dit_xl2_repa_in256", None)])
def test_presets_are_repas_recipe_without_flips(preset, kind):
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("train", overrides=[f"experiment={preset}"])
    assert (cfg.model.name, cfg.diffusion.get("kind"), cfg.data.flip) == ("DiT-XL/2", kind, False)
    assert (cfg.repa.enabled, cfg.repa.encoder, cfg.repa.feature_dim, cfg.repa.depth, cfg.repa.projector_dim,
            cfg.repa.coeff) == (True, "vit_base_patch14_dinov2.lvd142m", 768, 8, 2048, 0.5)
