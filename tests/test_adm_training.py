"""ADM in pixel space through the one training loop: presets, strategies (2 ranks: DDP and ZeRO-2 step for step,
resumed), training from uint8 pixel shards, clear errors, and classifier guidance (ADM-G) end to end on the digits:
a noisy classifier trained with task=classifier raises an unconditional ADM's digits accuracy."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bigdit.diffusion import classifier_cond_fn, ddim_sample, make_schedule, respace, space_timesteps
from bigdit.data.digits import Digits
from bigdit.inference import generate, to_uint8_images
from bigdit.metrics import read_metrics
from bigdit.train import CONFIG_DIR, train
from conftest import REPO, image
from test_strategies import assert_close_dicts, ema, launch, losses

sys.path.insert(0, str(REPO / "tools"))
import encode_latents  # noqa: E402
import eval_digits  # noqa: E402
import export as export_tool  # noqa: E402
import sample as sample_tool  # noqa: E402

#: classifier scale of the guidance test
SCALE = 10

ADM = ["experiment=adm_digits", "run.global_batch=16", "run.log_every=1", "run.ckpt_every=2", "ema.decay=0.9",
       "optim.warmup_steps=0", "optim.schedule=constant", "optim.lr=2e-3"]


def cfg_of(config: str, *overrides: str):
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        return compose(config, overrides=list(overrides))


@pytest.mark.parametrize("experiment", ["adm_in64", "adm_in256", "adm_classifier_in64", "adm_digits"])
def test_adm_presets_compose_with_the_papers_settings(experiment):
    cfg = cfg_of("train", f"experiment={experiment}")
    if experiment == "adm_in64":
        assert (cfg.model.name, cfg.model.input_size, cfg.model.dropout) == ("ADM-64", 64, 0.1)
        assert (cfg.diffusion.schedule, cfg.optim.lr, cfg.run.global_batch) == ("cosine", 3e-4, 2048)
    if experiment == "adm_in256":
        assert (cfg.model.name, cfg.diffusion.schedule, cfg.optim.lr, cfg.run.global_batch) == ("ADM-256", "linear",
                                                                                               1e-4, 256)
    if experiment.startswith("adm_in"):
        assert cfg.model.learn_sigma and cfg.task.name == "diffusion" and cfg.ema.decay == 0.9999
        assert (cfg.sample.sampler, cfg.sample.steps, cfg.run.precision) == ("ddpm", 250, "bf16")
    if experiment == "adm_classifier_in64":
        assert cfg.task.name == "classifier" and cfg.model.name == "ADM-classifier-64"
        assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.schedule) == (3e-4, 0.05, "linear")


@pytest.mark.slow
def test_adm_under_ddp_and_zero2_on_two_ranks_step_for_step(tmp_path):
    """The same 4 steps: DDP on 2 ranks straight, ZeRO-2 on 2 ranks interrupted at step 2 and resumed."""
    launch(tmp_path / "ddp", 2, "run.steps=4", base=ADM)
    zero2 = ["strategy=deepspeed", "strategy.zero_stage=2"]
    launch(tmp_path / "zero2", 2, *zero2, "run.steps=2", base=ADM)
    launch(tmp_path / "zero2", 2, *zero2, "run.steps=4", base=ADM)
    assert len(losses(tmp_path / "ddp")) == 4
    np.testing.assert_allclose(losses(tmp_path / "zero2"), losses(tmp_path / "ddp"), rtol=1e-5)
    assert_close_dicts(ema(tmp_path / "zero2"), ema(tmp_path / "ddp"))


@pytest.mark.slow
def test_adm_trains_from_pixel_shards_and_refuses_mismatches(tmp_path):
    root = tmp_path / "images"
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(4):
            image(c * 10 + i, size=(20 + i, 16)).save(root / f"c{c}" / f"{i}.png")
    encode_latents.run(cfg_of("encode_latents", f"input={root}", f"out={tmp_path / 'px'}", "vae=none",
                              "resolution=8", "shard_size=4", "num_workers=0", "progress=false"))
    common = [*ADM, "data=wds", f"data.root={tmp_path / 'px'}", "data.num_workers=0", "run.global_batch=4",
              "model.in_channels=3", "model.num_classes=2"]
    train(cfg_of("train", *common, "run.steps=2", f"run.dir={tmp_path / 'run'}"))
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2]
    with pytest.raises(ValueError, match=r"gives 3x8x8: set model.in_channels=3 model.input_size=8"):
        train(cfg_of("train", *common, "model.input_size=16", f"run.dir={tmp_path / 'a'}"))
    with pytest.raises(ValueError, match="task=classifier trains a noisy classifier.*model=adm_classifier"):
        train(cfg_of("train", *common, "task=classifier", f"run.dir={tmp_path / 'b'}"))


def test_classifier_gradient_and_ddim_score_correction_are_adms():
    """cond_fn is scale * grad log softmax(logits)[y] (closed form for a linear classifier), and DDIM with it equals
    DDIM on the model whose eps is eps - sqrt(1 - abar) * grad (ADM's condition_score)."""
    torch.manual_seed(0)
    w = torch.randn(3, 2 * 4 * 4)
    classifier = lambda x, t: x.flatten(1) @ w.T  # noqa: E731
    x, y, scale = torch.randn(5, 2, 4, 4), torch.tensor([0, 1, 2, 1, 0]), 2.5
    p = torch.softmax(x.flatten(1) @ w.T, dim=-1)
    want = scale * (w[y] - p @ w).reshape(x.shape)
    cond_fn = classifier_cond_fn(classifier, y, scale)
    torch.testing.assert_close(cond_fn(x, torch.zeros(5, dtype=torch.long)), want)

    s = respace(make_schedule("cosine", 100), space_timesteps(100, "ddim10"))
    eps_model = lambda x, t: 0.3 * x + 0.01 * t[:, None, None, None]  # noqa: E731
    const = torch.randn(1, 2, 4, 4)
    shifted = lambda x, t: const.expand_as(x)  # noqa: E731
    tmap = torch.tensor(s.timestep_map)

    def corrected(x, t_model):
        i = torch.searchsorted(tmap, t_model)
        abar = torch.tensor(s.alphas_cumprod, dtype=x.dtype)[i][:, None, None, None]
        return eps_model(x, t_model) - torch.sqrt(1 - abar) * const

    noise = torch.randn(5, 2, 4, 4)
    guided = ddim_sample(eps_model, s, noise.shape, learn_sigma=False, noise=noise, cond_fn=shifted)
    plain = ddim_sample(corrected, s, noise.shape, learn_sigma=False, noise=noise)
    torch.testing.assert_close(guided, plain, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(guided, ddim_sample(eps_model, s, noise.shape, learn_sigma=False, noise=noise))


class DigitsOracle(torch.nn.Module):
    """The optimal denoiser of the training digits in closed form (x0 = the posterior mean over the 1,797 images
    given x_t), an unconditional pixel-space epsilon model that needs no training: the guidance test measures the
    classifier's guidance alone, not how well a tiny denoiser learned on two CPU cores."""

    in_channels, input_size, num_classes, learn_sigma = 1, 8, None, False

    def __init__(self, schedule):
        super().__init__()
        self.x0 = Digits().x.flatten(1).double()
        self.abar = torch.tensor(schedule.alphas_cumprod)

    def forward(self, x, t, y=None, **_):
        abar = self.abar[t][:, None]
        xt = x.flatten(1).double()
        d2 = ((xt[:, None, :] - abar.sqrt()[:, :, None] * self.x0[None]) ** 2).sum(-1)
        x0 = torch.softmax(-d2 / (2 * (1 - abar)), dim=1) @ self.x0
        return ((xt - abar.sqrt() * x0) / (1 - abar).sqrt()).reshape(x.shape).to(x.dtype)


@pytest.mark.slow
def test_classifier_guidance_raises_digits_accuracy(tmp_path):
    """A noisy classifier trained by bigdit-train task=classifier on the digits guides an unconditional denoiser to
    the asked digit (ADM's cond_fn in DDPM), scored by tools/eval_digits.py's independent SVM; the exported
    classifier loads as classifier=<file> the same as classifier=<run dir>."""
    train(cfg_of("train", "experiment=adm_classifier_digits", "run.steps=150", "run.global_batch=64",
                 "run.log_every=25", "run.ckpt_every=1000", f"run.dir={tmp_path / 'clf'}"))
    run_cfg = OmegaConf.load(tmp_path / "clf" / "config.yaml")
    schedule = make_schedule(**run_cfg.diffusion)  # the noise levels the classifier learned, cosine
    oracle = DigitsOracle(schedule)
    by_run = cfg_of("sample", f"classifier={tmp_path / 'clf'}")
    classifier = sample_tool.load_classifier(by_run, oracle)

    # the exported classifier (tools/export.py raw=true) loads as classifier=<file> with its model config, and its
    # ema.pt is a plain state dict as guided-diffusion writes them
    export_tool.run(cfg_of("export", f"run={tmp_path / 'clf'}", f"out={tmp_path / 'clf-export'}", "raw=true"))
    by_file = cfg_of("sample", f"classifier={tmp_path / 'clf-export' / 'model.safetensors'}")
    by_file.classifier_model = json.loads((tmp_path / "clf-export" / "model_config.json").read_text())
    assert_close_dicts(sample_tool.load_classifier(by_file, oracle).state_dict(), classifier.state_dict())
    assert torch.load(tmp_path / "clf-export" / "ema.pt", weights_only=True).keys() == classifier.state_dict().keys()

    labels = torch.arange(100) % 10
    accuracy = {}
    for scale in (0, SCALE):
        x = generate(oracle, schedule, labels, sampler="ddpm", steps=25, cfg_scale=1.0, clip_denoised=True,
                     classifier=classifier if scale else None, classifier_scale=scale, batch_size=100)
        accuracy[scale] = eval_digits.digits_accuracy(to_uint8_images(x), labels.numpy())
    # unguided, the samples ignore their labels (i % 10): accuracy is chance, whatever the model draws
    assert accuracy[0] < 0.25 and accuracy[SCALE] > 0.5, accuracy


@pytest.mark.slow
def test_sample_tool_guides_an_adm_run_with_a_classifier_run(tmp_path):
    """tools/sample.py classifier=<task=classifier run> on an unconditional ADM run: labels from the classifier's
    classes, the settings recorded; a denoiser run as classifier and dpm++ are refused."""
    short = ["run.steps=2", "run.global_batch=8", "run.log_every=1", "run.ckpt_every=1000"]
    train(cfg_of("train", "experiment=adm_digits", "model.num_classes=null", *short, f"run.dir={tmp_path / 'adm'}"))
    train(cfg_of("train", "experiment=adm_classifier_digits", *short, f"run.dir={tmp_path / 'clf'}"))
    common = [f"run={tmp_path / 'adm'}", "per_class=1", "steps=3", f"out={tmp_path / 'grid'}"]
    meta = sample_tool.run(cfg_of("sample", *common, f"classifier={tmp_path / 'clf'}", "classifier_scale=2"))
    assert meta["label_counts"] == {str(c): 1 for c in range(10)}
    assert (meta["settings"]["classifier_scale"], meta["settings"]["classifier_weights"]) == (2.0, "model")
    assert meta["settings"]["classifier"] == str((tmp_path / "clf").resolve())
    with pytest.raises(ValueError, match="is a diffusion run"):
        sample_tool.run(cfg_of("sample", *common, f"classifier={tmp_path / 'adm'}"))
    with pytest.raises(ValueError, match="ddpm or ddim"):
        sample_tool.run(cfg_of("sample", *common, f"classifier={tmp_path / 'clf'}", "sampler=dpm++"))
