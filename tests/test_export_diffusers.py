"""tools/export.py format=diffusers and the model card: a tiny DiT trained a few steps on tiny-VAE latent shards,
exported as a diffusers DiTPipeline, samples as bigdit's sampler does from the same noise (DDIM, with and
without guidance); the weight mapping, the scheduler's timesteps, id2label, the card, and the refusals for
backbones diffusers has no class for."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bigdit.batching import stream_seed
from bigdit.data.schema import Manifest
from bigdit.diffusers_export import (
    PIPELINE_NULL_LABEL,
    build_transformer,
    ddim_scheduler,
    ddim_steps_that_match,
    use_dit_timestep_embedding,
)
from bigdit.diffusion import make_betas, make_schedule, space_timesteps
from bigdit.models import build_model
from bigdit.train import CONFIG_DIR, train

from conftest import REPO, image
from test_encode_tools import encode

sys.path.insert(0, str(REPO / "tools"))
import export as export_tool  # noqa: E402

TINY_DIT = ["model.name=DiT-S/2", "model.input_size=8", "model.in_channels=4", "model.num_classes=2",
            "++model.hidden_size=32", "++model.depth=2", "++model.num_heads=2"]


def export_cfg(**overrides):
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        return compose("export", overrides=[f"{k}={v}" for k, v in overrides.items()])


def train_overrides(run_dir: Path, shards: Path) -> list[str]:
    # DiT's ImageNet preset (its `sample:` section: ddpm, 250 steps, guidance 1.5 on 3 channels), shrunk.
    return ["experiment=dit_xl2_in256", *TINY_DIT, f"data.root={shards}", "data.num_workers=0", f"run.dir={run_dir}",
            "run.steps=4", "run.global_batch=4", "run.log_every=1", "run.ckpt_every=2", "run.precision=fp32",
            "optim.lr=1e-2", "ema.decay=0.5"]


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory, tiny_vae) -> Path:
    """6 images of 2 classes -> tiny-VAE latents 4x8x8 (2 WebDataset shards) -> a tiny DiT, 4 steps, + eval files."""
    root = tmp_path_factory.mktemp("export")
    for c, cls in enumerate(["cat", "dog"]):
        (root / "images" / cls).mkdir(parents=True)
        for i in range(3):
            image(40 + 10 * c + i, size=(20, 16)).save(root / "images" / cls / f"img{i}.png")
    encode(input=root / "images", out=root / "latents", format="wds", vae=tiny_vae, resolution=16, flip=False,
           shard_size=4)
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("train", overrides=train_overrides(root / "run", root / "latents"))
    train(cfg)
    run = root / "run"
    (run / "eval.json").write_text(json.dumps({"fid": 123.4, "samples": 50}) + "\n")
    (run / "samples").mkdir(exist_ok=True)
    (run / "samples" / "precision_recall.json").write_text(json.dumps({"precision": 0.5, "recall": {"k3": 0.25}}))
    return run


def random_dit(**kw) -> torch.nn.Module:
    """A tiny DiT with every weight random (adaLN-Zero's zeros would hide a wrong mapping)."""
    torch.manual_seed(0)
    model = build_model("DiT-S/2", input_size=8, in_channels=4, num_classes=10, hidden_size=32, depth=2,
                        num_heads=2, **kw).eval()
    for name, p in model.named_parameters():
        if name != "pos_embed":  # the fixed sin-cos table, which diffusers recomputes
            p.data.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_transformer_computes_our_dit_with_dits_timestep_frequencies(learn_sigma):
    model = random_dit(learn_sigma=learn_sigma)
    transformer = build_transformer(model)
    x, t = torch.randn(4, 4, 8, 8), torch.tensor([0, 1, 500, 999])
    y = torch.tensor([0, 3, 9, 10])  # 10: our null label, diffusers' 1000
    with torch.no_grad():
        ours = model(x, t, y)
        stock = transformer(x, timestep=t, class_labels=torch.tensor([0, 3, 9, PIPELINE_NULL_LABEL])).sample
        exact = use_dit_timestep_embedding(transformer)(
            x, timestep=t, class_labels=torch.tensor([0, 3, 9, PIPELINE_NULL_LABEL])).sample
    assert ours.shape == exact.shape == (4, 8 if learn_sigma else 4, 8, 8)
    torch.testing.assert_close(exact, ours, rtol=1e-5, atol=1e-5)
    # diffusers' own timestep frequencies (10000 ** (-i / 127)) are the only difference, and a real one
    assert (stock - ours).abs().max() > 1e-2
    # the unused label rows hold the null embedding
    table = transformer.transformer_blocks[1].norm1.emb.class_embedder.embedding_table.weight
    assert table.shape == (PIPELINE_NULL_LABEL + 1, 32)
    assert torch.equal(table[500], model.y_embedder.embedding_table.weight[10])


def test_ddim_scheduler_is_ours_on_the_training_betas():
    betas = make_betas("linear", 1000)
    sched = ddim_scheduler(betas)
    ours = make_schedule("linear", 1000)
    np.testing.assert_allclose(sched.alphas_cumprod.double().numpy(), ours.alphas_cumprod, rtol=1e-5)
    assert ddim_steps_that_match(1000) == [2, 4, 5, 8, 10, 20, 25, 40, 50, 100, 125, 200, 250, 500, 1000]
    for n in (4, 10, 25, 50, 250):
        sched.set_timesteps(n)
        assert sched.timesteps.tolist() == sorted(space_timesteps(1000, f"ddim{n}"), reverse=True)
    sched.set_timesteps(30)  # not a divisor: ours strides 34, diffusers 33
    assert sched.timesteps.tolist() != sorted(space_timesteps(1000, "ddim30"), reverse=True)
    cosine = ddim_scheduler(make_betas("cosine", 1000))
    np.testing.assert_allclose(cosine.alphas_cumprod.double().numpy(), make_schedule("cosine").alphas_cumprod,
                               rtol=1e-4, atol=1e-7)


def our_images(run: Path, vae_dir: Path, labels: list[int], steps: int, scale: float, guidance: str):
    """bigdit's sampler (tools/sample.py's path: generate, then the shards' codec and VAE): (the VAE decoder's
    input, images NHWC in [-1, 1])."""
    from diffusers import AutoencoderKL

    from bigdit.inference import generate, load_run

    model, run_cfg = load_run(run)
    x = generate(model, make_schedule(**run_cfg.diffusion), torch.tensor(labels), sampler="ddim", steps=steps,
                 cfg_scale=scale, guidance=guidance, seed=0)
    z = Manifest.load(run_cfg.data.root).codec().to_vae(x)
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    with torch.no_grad():
        return z, vae.decode(z).sample.clamp(-1, 1).permute(0, 2, 3, 1)


def pipeline_images(pipe, labels: list[int], steps: int, scale: float):
    """DiTPipeline from generate(seed=0)'s noise: (the VAE decoder's input, images NHWC in [-1, 1])."""
    from bigdit.inference import sample_generators

    # sample k's noise from a generator seeded stream_seed(0, k), as the model card tells users
    gens = sample_generators(0, range(len(labels)))
    assert gens[1].initial_seed() == stream_seed(0, 1)
    decoder_input = []
    decode = pipe.vae.decode
    pipe.vae.decode = lambda z, *a, **k: decoder_input.append(z) or decode(z, *a, **k)
    try:
        out = pipe(class_labels=labels, guidance_scale=scale, generator=gens, num_inference_steps=steps,
                   output_type="np")
    finally:
        pipe.vae.decode = decode
    return decoder_input[0], torch.from_numpy(out.images) * 2 - 1


@pytest.mark.slow
def test_diffusers_pipeline_samples_as_our_sampler(latent_run, tiny_vae, tmp_path):
    from diffusers import DiTPipeline

    out = export_tool.run(export_cfg(run=latent_run, format="diffusers", out=tmp_path / "pipe"))
    assert {"model_index.json", "README.md"} <= {p.name for p in out.iterdir()}
    pipe = DiTPipeline.from_pretrained(out)
    assert pipe.labels == {"cat": 0, "dog": 1} and pipe.get_label_ids(["dog"]) == [1]
    assert pipe.vae.config.scaling_factor == Manifest.load(latent_run.parent / "latents").scaling_factor == 0.5
    np.testing.assert_allclose(pipe.scheduler.config.trained_betas, make_betas("linear", 1000))
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"

    stock_z, stock = pipeline_images(pipe, [0, 1], 10, 1.0)
    use_dit_timestep_embedding(pipe.transformer)
    for scale in (1.0, 3.0):
        ours_z, ours = our_images(latent_run, tiny_vae, [0, 1], 10, scale, "all")
        theirs_z, theirs = pipeline_images(pipe, [0, 1], 10, scale)
        assert theirs.shape == ours.shape == (2, 16, 16, 3)
        torch.testing.assert_close(theirs_z, ours_z, rtol=1e-5, atol=1e-5 * ours_z.abs().max().item())
        torch.testing.assert_close(theirs, ours, rtol=0, atol=2e-4)
    # DiTPipeline guides every latent channel; DiT's form (the first 3 of 4) is another sampler
    dit_form_z, _ = our_images(latent_run, tiny_vae, [0, 1], 10, 3.0, "dit")
    assert (dit_form_z - theirs_z).abs().max() > 1e-3 * theirs_z.abs().max()
    # the stock pipeline (diffusers' timestep frequencies) samples close to, not exactly as, the trained model
    plain_z, plain = our_images(latent_run, tiny_vae, [0, 1], 10, 1.0, "all")
    assert torch.isfinite(stock).all() and (stock_z - plain_z).abs().max() > 1e-4 * plain_z.abs().max()
    print(f"stock pipeline vs trained model: latents {((stock_z - plain_z).abs().max() / plain_z.abs().max()):.2e} "
          f"of their range, images {(stock - plain).abs().max():.2e}; guided DiT form vs all channels "
          f"{((dit_form_z - theirs_z).abs().max() / theirs_z.abs().max()):.2e}")


def test_model_card_in_every_format(latent_run, tiny_vae, tmp_path):
    out = export_tool.run(export_cfg(run=latent_run, format="diffusers", out=tmp_path / "d"))
    card = (out / "README.md").read_text()
    n_params = sum(p.numel() for p in build_model(**OmegaConf.load(latent_run / "config.yaml").model).parameters())
    for text in ("library_name: diffusers", "# dit_xl2_in256: DiT-S/2", f"| parameters | {n_params:,} |",
                 '"hidden_size": 32', "| optimizer steps | 4 |", "| images seen (nimg) | 16 |",
                 f"| shard root | {latent_run.parent / 'latents'} |", "| samples | 6 |", "| resolution | 16 |",
                 "| classes | 2 |", "| class names | cat, dog |", "| scaling factor | 0.5 |",
                 "the run preset's `sample:` section (tools/sample.py's defaults for eta)", "| sampler | ddpm |",
                 "| steps | 250 |", "| cfg_scale | 1.5 |", "| guidance | dit |", "`eval.json`", "| fid | 123.4 |", "`samples/precision_recall.json`",
                 "| recall.k3 | 0.25 |", "DiTPipeline.from_pretrained", "downscale_freq_shift = 0",
                 "guidance_scale=1.5", "`model_index.json`", "`transformer/config.json`"):
        assert text in card, text
    assert f"| vae | {tiny_vae} |" in card

    # safetensors, for a run whose preset has no `sample:` section: tools/sample.py's defaults
    run = tmp_path / "run"
    shutil.copytree(latent_run, run)
    cfg = OmegaConf.load(run / "config.yaml")
    del cfg["sample"]
    OmegaConf.save(cfg, run / "config.yaml")
    out = export_tool.run(export_cfg(run=run, out=tmp_path / "s", raw="true"))
    card = (out / "README.md").read_text()
    assert {"ema.safetensors", "model.safetensors", "ema.pt", "model_config.json", "README.md"} == \
        {p.name for p in out.iterdir()}
    for text in ("tools/sample.py's defaults (the run preset has no `sample:` section)", "| sampler | ddpm |",
                 "| cfg_scale | 4 |", "`ema.safetensors`", "`model.safetensors`", "load_weights",
                 f"sampler=ddpm steps=250 cfg_scale=4.0 cfg_convention=dit guidance=dit eta=0.0 vae={tiny_vae} "
                 "vae_scale=0.5", "| fid | 123.4 |", "| images seen (nimg) | 16 |"):
        assert text in card, text
    assert "library_name" not in card


def fake_run(tmp_path: Path, *overrides: str) -> Path:
    """A run directory holding only a config.yaml: the diffusers checks come before any checkpoint is read."""
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("train", overrides=[*overrides, f"run.dir={tmp_path}"])
    tmp_path.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, tmp_path / "config.yaml", resolve=True)
    return tmp_path


@pytest.mark.parametrize("overrides,match", [
    (["experiment=uvit_h2_in256", "data.root=none"], r"U-ViT-H/2 \(UViT\) has no diffusers model class"),
    (["experiment=udit_b_in256", "data.root=none"], r"U-DiT-B \(UDiT\) has no diffusers model class"),
    (["experiment=dit_xl2_in256", "data.root=none", "cond=text", "model.num_classes=0", "++model.context_dim=32"],
     "DiT-XL/2 is the text-to-image DiT form"),
    (["experiment=demo"], r"DiT-S/2 was trained in pixel space \(vae=none\)"),
])
def test_format_diffusers_refuses_what_diffusers_cannot_hold(tmp_path, overrides, match):
    run = fake_run(tmp_path / "run", *overrides)
    with pytest.raises(ValueError, match=match) as err:
        export_tool.run(export_cfg(run=run, format="diffusers"))
    assert "format=safetensors" in str(err.value) and "model_config.json" in str(err.value)
    assert not (run / "export").exists()


def test_format_and_raw_are_checked_first(tmp_path):
    run = fake_run(tmp_path / "run", "experiment=dit_xl2_in256", "data.root=none")
    with pytest.raises(ValueError, match="raw=true"):
        export_tool.run(export_cfg(run=run, format="diffusers", raw="true"))
    with pytest.raises(ValueError, match="format='onnx'"):
        export_tool.run(export_cfg(run=run, format="onnx"))


@pytest.mark.slow
def test_cli(latent_run, tmp_path):
    py = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").is_dir() else sys.executable
    proc = subprocess.run([py, "tools/export.py", f"run={latent_run}", "format=diffusers", f"out={tmp_path / 'o'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(diffusers)" in proc.stdout and (tmp_path / "o" / "transformer" / "config.json").is_file()
    run = fake_run(tmp_path / "uvit", "experiment=uvit_h2_in256", "data.root=none")
    proc = subprocess.run([py, "tools/export.py", f"run={run}", "format=diffusers"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0 and "U-ViT-H/2 (UViT) has no diffusers model class" in proc.stderr
