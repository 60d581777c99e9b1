"""Flow matching (diffusion=flow): closed forms of the transport module, the flow samplers on Gaussian data whose exact
velocity field is known, guidance intervals (flow and DDPM), the refusals, and a tiny flow DiT that learns the digits."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from bigdit.diffusion import (Transport, build_diffusion, build_objective, flow_sample, guidance_time,
                              guided_model_fn, make_schedule, sample)
from bigdit.diffusion import transport as tp
from bigdit.inference import generate
from bigdit.models import build_model
from bigdit.train import CONFIG_DIR, train

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import sample as sample_tool  # noqa: E402  (tools/ is no package)
from eval_digits import digits_accuracy  # noqa: E402

PATHS = ("linear", "gvp")
PREDICTIONS = ("velocity", "noise", "score")
# Gaussian data, independent per dimension: the exact velocity field of both paths is known in closed form
MEAN = torch.tensor([1.5, -0.5])
STD = torch.tensor([0.5, 2.0])


def gaussian_field(path: str, prediction: str = "velocity"):
    """``model_fn(x, t)`` giving the exact ``E[v | x_t]`` for data ~ N(MEAN, STD^2) as a ``prediction`` model:
    x_t ~ N(a m, a^2 S^2 + s^2) and v = a' m + (a' a S^2 + s' s) (x - a m) / var_t."""

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, da, s, ds = tp.path_coefficients(path, t.double()[:, None])
        var = a**2 * STD**2 + s**2
        v = (da * MEAN + (da * a * STD**2 + ds * s) * (x - a * MEAN) / var).float()
        return tp.prediction_from_velocity(path, prediction, v, x, t)

    return fn


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_conversions_invert_each_other(path, prediction):
    g = torch.Generator().manual_seed(0)
    x1, noise = torch.randn(64, 3, 4, 4, generator=g), torch.randn(64, 3, 4, 4, generator=g)
    t = 0.02 + 0.96 * torch.rand(64, generator=g)
    xt = tp.interpolate(path, x1, noise, t)
    v = tp.target_velocity(path, x1, noise, t)
    # the velocity of one (data, noise) pair, seen as each prediction and back
    out = tp.prediction_from_velocity(path, prediction, v, xt, t)
    torch.testing.assert_close(tp.velocity_from_prediction(path, prediction, out, xt, t), v, atol=2e-4, rtol=1e-4)
    # and the prediction is what it should be for that pair
    expected = {"velocity": v, "noise": noise, "score": -noise / tp.path_coefficients(path, t)[2][:, None, None, None]}
    torch.testing.assert_close(out, expected[prediction], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("path", PATHS)
def test_path_ends_and_derivatives(path):
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    a, da, s, ds = tp.path_coefficients(path, t)
    torch.testing.assert_close(a, torch.tensor([0.0, 1.0], dtype=torch.float64))  # data at t = 1
    torch.testing.assert_close(s, torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-12, rtol=0)
    tt = torch.linspace(0.1, 0.9, 9, dtype=torch.float64, requires_grad=True)
    a, da, s, ds = tp.path_coefficients(path, tt)
    torch.testing.assert_close(torch.autograd.grad(a.sum(), tt, retain_graph=True)[0], da.detach())
    torch.testing.assert_close(torch.autograd.grad(s.sum(), tt)[0], ds.detach())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("prediction,weight", [("velocity", "none"), ("noise", "none"), ("noise", "velocity"),
                                               ("score", "likelihood")])
def test_perfect_prediction_gives_zero_loss_and_a_wrong_one_does_not(path, prediction, weight):
    tr = Transport(path=path, prediction=prediction, loss_weight=weight)
    g = torch.Generator().manual_seed(1)
    x1, noise = torch.randn(32, 2, 4, 4, generator=g), torch.randn(32, 2, 4, 4, generator=g)
    t = tp.time_from_uniform(tr, torch.rand(32, generator=g))
    obj = build_objective({"kind": "flow", "path": path, "prediction": prediction, "loss_weight": weight}, False)
    xt = obj.noised(x1, t, noise)
    perfect = tp.prediction_from_velocity(path, prediction, tp.target_velocity(path, x1, noise, t), xt, t)
    assert obj.loss(perfect, x1, xt, t, noise).abs().max() < 1e-6
    wrong = obj.loss(perfect + 0.1, x1, xt, t, noise)
    assert (wrong > 0).all() and wrong.mean() > 1e-3


def test_velocity_loss_is_sits():
    """velocity: mean |out - (x1 - noise)|^2 on the linear path (x_t = t x1 + (1 - t) noise)."""
    g = torch.Generator().manual_seed(2)
    x1, noise, out = (torch.randn(8, 4, 2, 2, generator=g) for _ in range(3))
    t = torch.rand(8, generator=g)
    loss = tp.training_losses(Transport(), out, x1, noise, t)
    torch.testing.assert_close(loss, ((out - (x1 - noise)) ** 2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(tp.interpolate("linear", x1, noise, t), t[:, None, None, None] * x1
                               + (1 - t[:, None, None, None]) * noise)


def test_time_sampling_is_a_function_of_u():
    u = torch.tensor([0.0, 0.025, 0.5, 0.975, 0.999999])
    torch.testing.assert_close(tp.time_from_uniform(Transport(), u), u)
    noise_model = Transport(prediction="noise")  # SiT: [1e-3, 1 - 1e-3]
    torch.testing.assert_close(tp.time_from_uniform(noise_model, u), 1e-3 + (1 - 2e-3) * u)
    ln = Transport(t_sampling="logit_normal", t_mean=0.5, t_std=2.0)
    z = torch.special.ndtri(u.double())
    torch.testing.assert_close(tp.time_from_uniform(ln, u), torch.sigmoid(0.5 + 2.0 * z).float())
    assert tp.time_from_uniform(ln, torch.tensor([0.5])).item() == pytest.approx(torch.sigmoid(torch.tensor(0.5)).item())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("sampler,steps,prediction,tol", [("euler", 50, "velocity", 0.05), ("heun", 10, "velocity", 0.02),
                                                          ("dopri5", 1, "velocity", 1e-3), ("heun", 10, "noise", 0.02),
                                                          ("euler", 50, "score", 0.05)])
def test_ode_samplers_with_the_exact_field_map_noise_to_the_gaussian(path, sampler, steps, prediction, tol):
    """Both paths keep every x_t Gaussian, so the probability-flow ODE is the affine map x0 -> MEAN + STD x0, sample by
    sample; the samplers reproduce it to their discretisation error (and so the data's mean and variance)."""
    x0 = torch.randn(256, 2, generator=torch.Generator().manual_seed(3))
    x = flow_sample(gaussian_field(path, prediction), Transport(path=path, prediction=prediction), sampler=sampler,
                    steps=steps, shape=(256, 2), noise=x0, atol=1e-7, rtol=1e-5)  # tolerances: dopri5's
    assert (x - (MEAN + STD * x0)).abs().mean() < tol
    torch.testing.assert_close(x.mean(0), MEAN + STD * x0.mean(0), atol=tol, rtol=0)
    torch.testing.assert_close(x.std(0), STD * x0.std(0), atol=0, rtol=tol)


@pytest.mark.parametrize("path,prediction", [("linear", "velocity"), ("gvp", "score")])
def test_sde_sampler_with_the_exact_field_reproduces_the_gaussian(path, prediction):
    """SiT's SDE (w = sigma_t, 100 steps, the mean last step): mean and standard deviation of 4,000 samples (the
    standard error of the mean is STD / 63)."""
    x = flow_sample(gaussian_field(path, prediction), Transport(path=path, prediction=prediction), sampler="sde",
                    steps=100, shape=(4000, 2), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(x.mean(0), MEAN, atol=0.1, rtol=0)
    torch.testing.assert_close(x.std(0), STD, atol=0, rtol=0.05)


def test_the_sde_draws_its_noise_from_per_sample_generators():
    tr = Transport()
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    both = flow_sample(gaussian_field("linear"), tr, sampler="sde", steps=10, shape=(2, 2), generator=gens([5, 6]))
    alone = flow_sample(gaussian_field("linear"), tr, sampler="sde", steps=10, shape=(1, 2), generator=gens([6]))
    torch.testing.assert_close(both[1:], alone)
    other = flow_sample(gaussian_field("linear"), tr, sampler="euler", steps=10, shape=(1, 2), generator=gens([6]))
    assert not torch.allclose(other, alone)  # the SDE's increments change the sample


class CountingModel(torch.nn.Module):
    """A class-conditional toy: output ``x * 0 + y`` (so guidance's effect is exact), recording each batch size."""

    def __init__(self):
        super().__init__()
        self.batches: list[tuple[int, float]] = []

    def forward(self, x, t, y):
        self.batches.append((len(x), float(t.double().mean())))
        return torch.zeros_like(x) + y.float().reshape(-1, *([1] * (x.ndim - 1)))


def test_guidance_interval_flow():
    model, y = CountingModel(), torch.tensor([2, 2])
    tr = Transport()
    fn = guided_model_fn(model, y, 3.0, null=0, guidance="all", in_channels=1, interval=(0.5, 1.0),
                         time_of=lambda t: t)
    flow_sample(fn, tr, sampler="euler", steps=10, shape=(2, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    doubled = [t for n, t in model.batches if n == 4]
    single = [t for n, t in model.batches if n == 2]
    assert doubled == pytest.approx([0.5, 0.6, 0.7, 0.8, 0.9]) and single == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    # on: guided (0 + 3 (2 - 0) = 6); off: the conditional output (2)
    x = torch.zeros(2, 1, 2, 2)
    assert fn(x, torch.full((2,), 0.7)).unique().tolist() == [6.0]
    assert fn(x, torch.full((2,), 0.2)).unique().tolist() == [2.0]
    # samples whose times differ get each their own
    mixed = fn(x, torch.tensor([0.7, 0.2]))
    assert mixed[0].unique().tolist() == [6.0] and mixed[1].unique().tolist() == [2.0]


def test_guidance_interval_ddpm_and_its_off_and_on_ends():
    s = make_schedule("linear", 100)
    model, y = CountingModel(), torch.tensor([1])
    fn = guided_model_fn(model, y, 2.0, null=0, guidance="all", in_channels=1, interval=(0.0, 0.5),
                         time_of=guidance_time(s.num_timesteps))
    sample(fn, sampler="ddim", steps=10, train_schedule=s, shape=(1, 1, 2, 2), learn_sigma=False,
           generator=torch.Generator().manual_seed(0))
    # DDIM 10 visits timesteps 90, 80, ..., 0 (times 0.1 .. 1.0): guided where 1 - k/100 <= 0.5, i.e. k >= 50
    assert [int(round(t)) for n, t in model.batches if n == 2] == [90, 80, 70, 60, 50]
    assert [int(round(t)) for n, t in model.batches if n == 1] == [40, 30, 20, 10, 0]
    # the whole interval equals no interval; with guidance interval the results differ
    kw = dict(sampler="ddpm", steps=10, train_schedule=s, shape=(1, 1, 2, 2), learn_sigma=False)
    plain = sample(guided_model_fn(CountingModel(), y, 2.0, 0, "all", 1), generator=torch.Generator().manual_seed(1),
                   **kw)
    whole = sample(guided_model_fn(CountingModel(), y, 2.0, 0, "all", 1, interval=(0, 1),
                                   time_of=guidance_time(100)), generator=torch.Generator().manual_seed(1), **kw)
    part = sample(fn, generator=torch.Generator().manual_seed(1), **kw)
    torch.testing.assert_close(plain, whole)
    assert not torch.allclose(plain, part)


@pytest.mark.parametrize("interval", [(0.5, 0.5), (-0.1, 0.5), (0.2, 1.5), (0.1,)])
def test_bad_guidance_interval_is_refused(interval):
    with pytest.raises(ValueError, match="guidance_interval"):
        guided_model_fn(CountingModel(), torch.tensor([1]), 2.0, 0, interval=interval, time_of=lambda t: t)


def tiny_dit(learn_sigma: bool):
    return build_model("DiT-S/2", input_size=8, in_channels=1, num_classes=10, hidden_size=32, depth=1, num_heads=2,
                       learn_sigma=learn_sigma)


def test_flow_and_ddpm_samplers_refuse_the_other_kind():
    labels = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"sampler='ddpm' is a Gaussian diffusion .* flow-matching model"):
        generate(tiny_dit(False), Transport(), labels, sampler="ddpm", steps=2)
    with pytest.raises(ValueError, match=r"sampler='euler' is a flow sampler, but this is a Gaussian"):
        generate(tiny_dit(True), make_schedule(), labels, sampler="euler", steps=2)
    with pytest.raises(ValueError, match="learn_sigma=false"):
        generate(tiny_dit(True), Transport(), labels, sampler="euler", steps=2)
    x = generate(tiny_dit(False), Transport(), labels, sampler="sde", steps=2, cfg_scale=1.5)
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()


@pytest.mark.parametrize("name,kwargs", [
    ("DiT-S/2", dict(input_size=8, hidden_size=32, depth=1, num_heads=2)),
    ("U-DiT-S", dict(input_size=16, hidden_size=16, num_heads=2, depth=(1, 1, 1, 1, 1))),
    ("U-ViT-S/2", dict(input_size=8, depth=1, hidden_size=32, num_heads=2)),
])
def test_backbones_take_float_times_in_training_and_sampling(name, kwargs):
    """SiT feeds t in [0, 1] as it is to the timestep embedder: every backbone's output depends on it, and the flow
    loss trains through it."""
    torch.manual_seed(0)
    model = build_model(name, in_channels=1, num_classes=10, learn_sigma=False, **kwargs)
    with torch.no_grad():
        for p in model.parameters():  # DiT zero-initialises its output: randomise so outputs can differ
            p.normal_(0, 0.05)
    side = kwargs["input_size"]
    x1, noise, y = torch.randn(2, 1, side, side), torch.randn(2, 1, side, side), torch.tensor([3, 4])
    obj = build_objective({"kind": "flow"}, learn_sigma=False)
    t = obj.time(torch.tensor([0.25, 0.75]))
    assert t.dtype == torch.float32
    out = model(obj.noised(x1, t, noise), t, y)
    obj.loss(out, x1, None, t, noise).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        xt = torch.randn(1, 1, side, side).expand(2, -1, -1, -1)
        early, late = model(xt, torch.tensor([0.25, 0.75]), torch.tensor([3, 3]))
    assert not torch.allclose(early, late)


@pytest.mark.parametrize("cfg,message", [
    ({"kind": "flow", "schedule": "cosine"}, r"~diffusion.schedule"),
    ({"kind": "flow", "path": "vp"}, r"diffusion.path='vp'; valid: linear, gvp"),
    ({"kind": "flow", "loss_weight": "velocity"}, r"velocity model has none"),
    ({"kind": "flow", "prediction": "noise", "train_eps": 0}, r"train_eps > 0"),
    ({"kind": "ddim"}, r"diffusion.kind='ddim'"),
])
def test_bad_flow_configs_are_named(cfg, message):
    with pytest.raises(ValueError, match=message):
        build_diffusion(cfg)


def test_learn_sigma_with_flow_fails_before_any_compute(tmp_path):
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("train", overrides=["experiment=sit_b2_in256", "model.learn_sigma=true", f"run.dir={tmp_path}",
                                          "data=synthetic"])
    with pytest.raises(ValueError, match="model.learn_sigma=false"):
        train(cfg)
    assert not any(tmp_path.iterdir())


def test_sit_presets_are_sits_recipe():
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        xl = compose("train", overrides=["experiment=sit_xl2_in256"])
        dit = compose("train", overrides=["experiment=dit_xl2_in256"])
        b = compose("train", overrides=["experiment=sit_b2_in256"])
    assert (xl.model.name, b.model.name, xl.model.learn_sigma) == ("DiT-XL/2", "DiT-B/2", False)
    assert build_diffusion(xl.diffusion) == Transport(path="linear", prediction="velocity")
    assert (xl.optim.lr, xl.optim.weight_decay, xl.run.global_batch, xl.ema.decay) == (1e-4, 0.0, 256, 0.9999)
    assert dict(xl.sample) == {"sampler": "sde", "steps": 250, "cfg_scale": 1.5, "cfg_convention": "dit",
                               "guidance": "dit", "diffusion_form": "sigma", "diffusion_norm": 1.0,
                               "last_step": "mean", "last_step_size": 0.04}
    # DiT's preset still gets gaussian.yaml's linear betas from the shared recipe
    assert dict(dit.diffusion) == {"schedule": "linear", "num_steps": 1000, "beta_start": 1e-4, "beta_end": 2e-2}


@pytest.mark.slow
def test_a_tiny_flow_dit_learns_the_digits(tmp_path):
    """A flow DiT (linear path, velocity) trained in-process on the real digits; tools/sample.py samples the run as an
    evaluation set (ADM's .npz, what tools/evaluate.py reads) and as a grid, and the samples are the digits asked
    for. DDPM samplers are refused for it."""
    run = tmp_path / "run"
    overrides = ["experiment=demo", "diffusion=flow", "~diffusion.schedule", "model.learn_sigma=false",
                 "model.hidden_size=64", "model.depth=2", "run.global_batch=64", "run.steps=500", "run.log_every=100",
                 "run.ckpt_every=500", "optim.warmup_steps=20", "optim.lr=3e-3", "ema.decay=0.98", f"run.dir={run}"]
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        train(compose("train", overrides=overrides))
        tool = lambda *o: sample_tool.run(compose("sample", overrides=[f"run={run}", "cfg_scale=4.0", *o]))  # noqa: E731
        meta = tool("num_samples=100", "labels=balanced", "sampler=euler", "steps=10", f"out={tmp_path / 'set'}")
        grid = tool("per_class=2", "sampler=sde", "steps=10", "guidance_interval=[0.2,1.0]", f"out={tmp_path / 'grid'}")
        with pytest.raises(ValueError, match=r"sampler='ddpm' is a Gaussian diffusion .*sampler=euler\|heun"):
            tool("per_class=1", "sampler=ddpm")
    assert meta["count"] == 100 and meta["settings"]["sampler"] == "euler"
    assert grid["settings"]["guidance_interval"] == [0.2, 1.0] and grid["settings"]["last_step"] == "mean"
    with np.load(tmp_path / "set" / "samples.npz") as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (100, 8, 8, 1) and images.dtype == np.uint8
    accuracy = digits_accuracy(images, labels)  # 0.67 here after 500 steps (chance: 0.1; the DDPM demo: 1,500)
    assert accuracy > 0.5, accuracy
