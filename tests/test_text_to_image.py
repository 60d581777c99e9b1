"""Text-to-image end to end on tiny shards made by the real tools: images + captions -> encode_latents (tiny
random AutoencoderKL) -> cache_text (tiny random open_clip tower) -> bigdit-train (cond=text) -> tools/sample.py
from a prompt; plus the presets, caption dropout and the checks that run before any work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from bigdit.checkpoint import latest_checkpoint
from bigdit.data.schema import EMPTY_PROMPT_NAME
from bigdit.diffusion import dit_cfg_scale
from bigdit.models import build_model
from bigdit.train import CONFIG_DIR, conditioning, train

from conftest import REPO
from test_encode_tools import cache_text, encode, tool_cfg

PRESETS = {  # preset -> (model, parameters, sampler, steps, DiT-form guidance scale)
    "dit_xl2_in256": ("DiT-XL/2", 675_129_632, "ddpm", 250, 1.5),
    "udit_b_in256": ("U-DiT-B", 231_251_304, "ddpm", 250, 1.5),
    "udit_l_in256": ("U-DiT-L", 916_335_304, "ddpm", 250, 1.5),
    "uvit_h2_in256": ("U-ViT-H/2", 500_832_016, "dpm++", 50, 1.4),
    "uvit_s2_t2i_coco": ("U-ViT-S/2", 44_692_644, "dpm++", 50, 2.0),
}
# Tiny text-to-image variants of each backbone, overriding the preset's sizes (latents 4x16x16, CLIP 77x32).
TINY_MODELS = {
    "U-ViT-S/2": ["++model.hidden_size=32", "++model.depth=2", "++model.num_heads=2"],
    "DiT-S/2": ["++model.hidden_size=32", "++model.depth=2", "++model.num_heads=2"],
    "U-DiT-S": ["++model.hidden_size=16", "++model.num_heads=2", "++model.depth=[1,1,1,1,1]"],
}


def train_cfg(run_dir: Path, shards: Path, *overrides: str):
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        return compose("train", overrides=[
            "experiment=uvit_s2_t2i_coco", f"data.root={shards}", "data.num_workers=0", f"run.dir={run_dir}",
            "model.input_size=16", "model.context_dim=32", "run.steps=4", "run.global_batch=2", "run.log_every=1",
            "run.ckpt_every=2", "run.precision=fp32", "optim.warmup_steps=0", "optim.lr=1e-3", "ema.decay=0.5",
            *overrides])


@pytest.fixture(scope="module")
def text_shards(tmp_path_factory, tiny_vae, caption_tars, tiny_clip) -> Path:
    """6 captioned images -> 4x16x16 latents (4 WebDataset shards: 2 per input tar) -> + CLIP tokens of the tiny tower."""
    config, weights = tiny_clip
    root = tmp_path_factory.mktemp("t2i")
    encode(input=caption_tars, out=root / "latents", format="wds", vae=tiny_vae, resolution=32, flip=False,
           shard_size=2)
    cache_text.run(tool_cfg("cache_text", shards=root / "latents", out=root / "text", clip_model="tiny-clip-test",
                            pretrained=weights, model_config=config, layer="last", batch_size=4))
    return root / "text"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_carry_the_papers_settings(preset):
    name, params, sampler, steps, scale = PRESETS[preset]
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("train", overrides=[f"experiment={preset}", "data.root=x"])
    with torch.device("meta"):
        model = build_model(**cfg.model)
    assert cfg.model.name == name and sum(p.numel() for p in model.parameters()) == params
    assert (cfg.sample.sampler, cfg.sample.steps) == (sampler, steps)
    assert dit_cfg_scale(cfg.sample.cfg_scale, cfg.sample.cfg_convention) == pytest.approx(scale)
    assert cfg.ema.decay == 0.9999 and cfg.model.class_dropout_prob == 0.1
    if name.startswith("U-ViT"):  # AdamW(2e-4, wd 0.03) with 5K warmup on SD's scaled-linear betas
        assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_steps) == (2e-4, 0.03, 5000)
        assert (cfg.diffusion.schedule, cfg.diffusion.beta_start, cfg.diffusion.beta_end) == ("scaled_linear", 0.00085, 0.012)
        assert not cfg.model.learn_sigma
    else:  # DiT's recipe, which U-DiT follows
        assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.schedule, cfg.run.global_batch) == (1e-4, 0.0, "constant", 256)
        assert cfg.diffusion.schedule == "linear" and cfg.model.learn_sigma
    assert (cfg.model.get("context_dim") is not None) == preset.endswith("coco")


def test_uvit_guidance_scale_is_dits_plus_one():
    assert dit_cfg_scale(0.4, "uvit") == pytest.approx(1.4) and dit_cfg_scale(1.5, "dit") == 1.5
    with pytest.raises(ValueError, match="dit, uvit"):
        dit_cfg_scale(1.0, "edm")


def test_caption_dropout_replaces_tokens_by_the_empty_prompt():
    tokens = torch.randn(4, 5, 3)
    empty = torch.randn(5, 3)
    drop = torch.tensor([0, 1, 0, 1])
    out = conditioning({"clip_tokens": tokens.half(), "y": torch.zeros(4)}, drop, empty, torch.device("cpu"))
    torch.testing.assert_close(out[[1, 3]], empty.expand(2, 5, 3))
    torch.testing.assert_close(out[[0, 2]], tokens.half().float()[[0, 2]])
    labels = torch.arange(4)
    assert torch.equal(conditioning({"y": labels}, drop, None, torch.device("cpu")), labels)  # the model drops labels


@pytest.mark.slow
@pytest.mark.parametrize("backbone", sorted(TINY_MODELS))
def test_text_to_image_end_to_end(tmp_path, text_shards, backbone):
    run = tmp_path / "run"
    cfg = train_cfg(run, text_shards, f"model.name={backbone}", *TINY_MODELS[backbone])
    train(cfg)
    state = torch.load(latest_checkpoint(run / "checkpoints") / "state.pt", weights_only=False)
    init = build_model(**cfg.model)
    # the caption projection learned: gradients flowed from the loss through the CLIP tokens
    name = next(k for k in state["model"] if "context" in k or "caption" in k)
    assert not torch.equal(state["model"][name], init.state_dict()[name])

    out = tmp_path / "samples"
    prompts = "[photo number 1 of 0,a prompt never seen]"
    proc = subprocess.run([sys.executable, "tools/sample.py", f"run={run}", f"prompts={prompts}", "per_class=2",
                           "steps=3", f"out={out}"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dpm++, 3 steps, cfg 2.0" in proc.stdout  # the preset's sampler and U-ViT's scale 1.0 as DiT's 2.0
    images, index = np.load(out / "samples.npz").values()
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8  # decoded by the shards' VAE at 32px
    assert index.tolist() == [0, 0, 1, 1]
    assert (out / "prompts.txt").read_text().splitlines() == ["photo number 1 of 0", "a prompt never seen"]
    assert (out / "grid.png").is_file()

    # cached embeddings sample too, and prompt-encoded ones equal the cache for a training caption
    cached = np.load(text_shards / EMPTY_PROMPT_NAME)["tokens"][None].repeat(2, 0)
    np.savez(tmp_path / "emb.npz", tokens=cached)
    proc = subprocess.run([sys.executable, "tools/sample.py", f"run={run}", f"embeddings={tmp_path / 'emb.npz'}",
                           "per_class=1", "steps=2", "sampler=ddim", f"out={tmp_path / 'cached'}"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert np.load(tmp_path / "cached" / "samples.npz")["arr_0"].shape == (2, 32, 32, 3)


def test_text_model_refuses_data_without_text_before_any_work(tmp_path, text_shards):
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("train", overrides=["experiment=demo", "cond=text", "model.name=U-ViT-S/2",
                                          "++model.hidden_size=32", "++model.depth=2", "++model.num_heads=2",
                                          "++model.learn_sigma=false", f"run.dir={tmp_path / 'a'}"])
    with pytest.raises(ValueError, match="needs CLIP token embeddings.*tools/cache_text.py"):
        train(cfg)
    with pytest.raises(ValueError, match=r"77x32 CLIP tokens but the model expects 77x768.*model.context_dim=32"):
        train(train_cfg(tmp_path / "b", text_shards, "model.context_dim=768", *TINY_MODELS["U-ViT-S/2"]))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b" / "checkpoints").exists()
