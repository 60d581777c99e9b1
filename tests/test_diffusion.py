"""Closed-form checks of bigdit.diffusion: schedules, posterior, losses, respacing, samplers, guidance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bigdit.diffusion import (
    Schedule,
    approx_standard_normal_cdf,
    ddim_sample,
    ddpm_sample,
    discretized_gaussian_log_likelihood,
    dpm_solver_sample,
    guided_model_fn,
    make_betas,
    make_schedule,
    normal_kl,
    p_mean_variance,
    predict_eps_from_x0,
    predict_x0_from_eps,
    q_posterior_mean_variance,
    q_sample,
    respace,
    sample,
    space_timesteps,
    training_losses,
    vb_terms_bpd,
)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside diffusers

T = 1000


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """Run on one intra-op thread: these tensors are tiny, and on a busy 2-core machine the thread handoff
    makes every elementwise op ~100x slower than the op itself."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def sched() -> Schedule:
    return make_schedule("linear", T)


def _t(values, n=None) -> torch.Tensor:
    """LongTensor of timesteps; a scalar is repeated n times."""
    if n is not None:
        return torch.full((n,), int(values), dtype=torch.long)
    return torch.tensor(values, dtype=torch.long)


# --------------------------------------------------------------------------------------------- schedules


def test_linear_betas_endpoints_and_scaling():
    b = make_betas("linear", 1000)
    assert b.dtype == np.float64 and b.shape == (1000,)
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    assert np.all(np.diff(b) > 0)
    # ADM scales the 1000-step endpoints by 1000 / num_steps.
    b250 = make_betas("linear", 250)
    assert b250[0] == pytest.approx(4e-4) and b250[-1] == pytest.approx(0.08)


def test_scaled_linear_betas():
    b = make_betas("scaled_linear", 1000, 0.00085, 0.012)
    assert b[0] == pytest.approx(0.00085) and b[-1] == pytest.approx(0.012)
    assert np.all(np.diff(b) > 0)
    # linear in sqrt(beta), i.e. not linear in beta
    np.testing.assert_allclose(np.diff(np.sqrt(b)), (0.012**0.5 - 0.00085**0.5) / 999, rtol=1e-9)
    assert not np.allclose(np.diff(b), np.diff(b)[0])


def test_cosine_betas_follow_alpha_bar():
    b = make_betas("cosine", 1000)
    assert b.max() <= 0.999 and b.min() > 0
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    ac = np.cumprod(1 - b)
    expected = np.array([f((i + 1) / 1000) / f(0) for i in range(1000)])
    # equal until the 0.999 cap kicks in at the very end
    np.testing.assert_allclose(ac[:990], expected[:990], rtol=1e-9)


def test_unknown_schedule_lists_valid_names():
    with pytest.raises(ValueError, match="linear.*scaled_linear.*cosine"):
        make_betas("quadratic")


def test_schedule_tables(sched):
    b = make_betas("linear", T)
    ac = np.array([np.prod(1 - b[: i + 1]) for i in range(T)])
    np.testing.assert_allclose(sched.alphas_cumprod, ac, rtol=1e-12)
    np.testing.assert_allclose(sched.alphas_cumprod_prev, np.r_[1.0, ac[:-1]], rtol=1e-12)
    np.testing.assert_allclose(sched.sqrt_recip_alphas_cumprod**2 * ac, 1.0, rtol=1e-12)
    np.testing.assert_allclose(sched.sqrt_recipm1_alphas_cumprod**2, 1 / ac - 1, rtol=1e-10)
    np.testing.assert_allclose(sched.sqrt_alphas_cumprod**2 + sched.sqrt_one_minus_alphas_cumprod**2, 1.0)
    assert sched.num_timesteps == T and np.array_equal(sched.timestep_map, np.arange(T))
    assert all(a.dtype == np.float64 for a in (sched.betas, sched.posterior_variance, sched.posterior_mean_coef1))
    # Marginal variance of x_t for x_0 = 0, built one forward step at a time, is 1 - abar_t.
    var, marg = 0.0, []
    for beta in b:
        var = (1 - beta) * var + beta
        marg.append(var)
    np.testing.assert_allclose(1 - sched.alphas_cumprod, marg, rtol=1e-9)


def test_schedule_is_immutable(sched):
    with pytest.raises(ValueError):
        sched.betas[0] = 0.5
    with pytest.raises(ValueError, match="2 steps"):
        Schedule.from_betas([0.1])


# ------------------------------------------------------------------------------------ Gaussian algebra


def test_normal_kl():
    g = torch.Generator().manual_seed(0)
    m1, m2, lv1, lv2 = (torch.randn(64, generator=g, dtype=torch.float64) for _ in range(4))
    assert torch.allclose(normal_kl(m1, lv1, m1, lv1), torch.zeros(64, dtype=torch.float64), atol=1e-12)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, torch.exp(0.5 * lv1)), torch.distributions.Normal(m2, torch.exp(0.5 * lv2))
    )
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), ref)
    torch.testing.assert_close(normal_kl(m1, 0.0, 0.0, 0.0), 0.5 * m1**2)  # scalars broadcast


def test_posterior_matches_bayes_closed_form(sched):
    g = torch.Generator().manual_seed(1)
    ts = [0, 1, 10, 500, 999]
    x0 = torch.randn(len(ts), 3, 2, 2, generator=g, dtype=torch.float64)
    xt = torch.randn(len(ts), 3, 2, 2, generator=g, dtype=torch.float64)
    mean, var, log_var = q_posterior_mean_variance(sched, x0, xt, _t(ts))
    for k, t in enumerate(ts):
        if t == 0:  # q(x_{-1} | x_0) is a point mass at x_0
            torch.testing.assert_close(mean[k], x0[k])
            assert float(var[k].max()) == 0.0
            continue
        # Product of q(x_{t-1} | x_0) = N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}) and the likelihood of x_t
        # under q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t), as a Gaussian in x_{t-1}.
        abar_prev = float(np.prod(1 - sched.betas[:t]))
        alpha, beta = 1 - float(sched.betas[t]), float(sched.betas[t])
        precision = 1 / (1 - abar_prev) + alpha / beta
        post_var = 1 / precision
        post_mean = post_var * (math.sqrt(abar_prev) * x0[k] / (1 - abar_prev) + math.sqrt(alpha) * xt[k] / beta)
        torch.testing.assert_close(mean[k], post_mean, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(var[k], torch.full_like(var[k], post_var), rtol=1e-9, atol=0)
        torch.testing.assert_close(log_var[k], torch.full_like(var[k], math.log(post_var)), rtol=1e-9, atol=0)


def test_q_sample_statistics(sched):
    g = torch.Generator().manual_seed(2)
    n = 200_000
    for t in (0, 300, 999):
        x0 = torch.full((n, 1), 0.7)
        xt = q_sample(sched, x0, _t(t, n), torch.randn(n, 1, generator=g))
        abar = sched.alphas_cumprod[t]
        assert float(xt.mean()) == pytest.approx(math.sqrt(abar) * 0.7, abs=5e-3)
        assert float(xt.var()) == pytest.approx(1 - abar, rel=2e-2, abs=1e-6)


def test_predict_x0_and_eps_invert_q_sample(sched):
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64)
    t = _t([0, 1, 250, 700, 999])
    xt = q_sample(sched, x0, t, noise)
    torch.testing.assert_close(predict_x0_from_eps(sched, xt, t, noise), x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(predict_eps_from_x0(sched, xt, t, x0), noise, rtol=0, atol=1e-10)


def test_extract_follows_x_dtype_and_shape(sched):
    x = torch.zeros(2, 4, 3, 3, dtype=torch.bfloat16)
    mean, var, _ = q_posterior_mean_variance(sched, x, x, _t([5, 6]))
    assert mean.dtype == torch.bfloat16 and var.shape == x.shape
    assert float(var[1, 2, 0, 1]) == pytest.approx(sched.posterior_variance[6], rel=1e-2)


def test_p_mean_variance_variances(sched):
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    t = _t([0, 1, 600])
    fixed = p_mean_variance(sched, torch.zeros_like(x), x, t, learn_sigma=False)
    expected = [sched.posterior_variance[1], sched.betas[1], sched.betas[600]]  # ADM "fixed large"
    for k in range(3):
        assert torch.allclose(fixed["variance"][k], torch.tensor(expected[k], dtype=torch.float64))
        assert torch.allclose(fixed["log_variance"][k], torch.tensor(math.log(expected[k]), dtype=torch.float64))
    for v, table in ((-1.0, sched.posterior_log_variance_clipped), (1.0, np.log(sched.betas))):
        out = torch.cat([torch.zeros_like(x), torch.full_like(x, v)], dim=1)
        learned = p_mean_variance(sched, out, x, t, learn_sigma=True)
        torch.testing.assert_close(learned["log_variance"][:, 0, 0, 0], torch.from_numpy(table[[0, 1, 600]]))
    # v = 0 is the midpoint in log space
    out = torch.cat([torch.zeros_like(x), torch.zeros_like(x)], dim=1)
    mid = p_mean_variance(sched, out, x, t, learn_sigma=True)["log_variance"][2, 0, 0, 0]
    assert float(mid) == pytest.approx(0.5 * (sched.posterior_log_variance_clipped[600] + math.log(sched.betas[600])))
    with pytest.raises(ValueError, match="channels"):
        p_mean_variance(sched, torch.zeros_like(x), x, t, learn_sigma=True)


def test_clip_and_denoised_fn(sched):
    x = torch.full((1, 1, 2, 2), 50.0, dtype=torch.float64)
    t = _t([10])
    out = p_mean_variance(sched, torch.zeros_like(x), x, t, learn_sigma=False, clip_denoised=True)
    assert float(out["pred_x0"].max()) == 1.0
    out = p_mean_variance(sched, torch.zeros_like(x), x, t, False, denoised_fn=lambda z: z * 0 + 0.25)
    torch.testing.assert_close(out["mean"], q_posterior_mean_variance(sched, torch.full_like(x, 0.25), x, t)[0])


def test_discretized_likelihood_is_a_distribution_over_256_levels():
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in ((0.0, -3.0), (0.3, -1.0), (-0.9, -5.0), (0.5, 0.5)):
        lp = discretized_gaussian_log_likelihood(
            levels, torch.full_like(levels, mean), torch.full_like(levels, log_scale)
        )
        assert float(lp.exp().sum()) == pytest.approx(1.0, abs=1e-6)
        # the mass of a level is ~ density * bin width when the bin is narrow compared with the scale
    sd = math.exp(0.5)
    lp = discretized_gaussian_log_likelihood(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.5]))
    assert float(lp.exp()) == pytest.approx(2 / 255 / (sd * math.sqrt(2 * math.pi)), rel=1e-3)
    x = torch.linspace(-5, 5, 101, dtype=torch.float64)
    exact = torch.distributions.Normal(0.0, 1.0).cdf(x)
    assert float((approx_standard_normal_cdf(x) - exact).abs().max()) < 2e-4


# ---------------------------------------------------------------------------------------------- losses


def _oracle_batch(sched, learn_sigma, v=-1.0, ts=(0, 1, 37, 500, 999), seed=4):
    g = torch.Generator().manual_seed(seed)
    n = len(ts)
    x0 = torch.rand(n, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64)
    t = _t(list(ts))
    xt = q_sample(sched, x0, t, noise)
    out = torch.cat([noise, torch.full_like(noise, v)], dim=1) if learn_sigma else noise.clone()
    return out, x0, xt, t, noise


def test_oracle_losses(sched):
    out, x0, xt, t, noise = _oracle_batch(sched, learn_sigma=True, v=-1.0)
    losses = training_losses(sched, out, x0, xt, t, noise, learn_sigma=True)
    assert set(losses) == {"loss", "mse", "vb"} and all(v.shape == (5,) for v in losses.values())
    assert float(losses["mse"].abs().max()) == 0.0
    # v = -1 selects the posterior variance, and the exact eps the posterior mean: KL = 0 for t > 0
    torch.testing.assert_close(losses["vb"][1:], torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-8)
    # at t = 0 the term is the decoder NLL -log p(x_0 | x_1) in bits, with p's mean exactly x_0 here
    log_scale = torch.full_like(x0[0], 0.5 * sched.posterior_log_variance_clipped[0])
    nll = -discretized_gaussian_log_likelihood(x0[0], x0[0], log_scale).mean() / math.log(2)
    assert float(nll) > 1.0
    assert float(losses["vb"][0]) == pytest.approx(float(nll), rel=1e-6)
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])

    # v = +1 selects beta_t: KL between two Gaussians with the same mean, in bits
    out, x0, xt, t, noise = _oracle_batch(sched, learn_sigma=True, v=1.0)
    vb = vb_terms_bpd(sched, out, x0, xt, t, learn_sigma=True)
    for k, ti in enumerate(t.tolist()[1:], start=1):
        pv, beta = sched.posterior_variance[ti], sched.betas[ti]
        kl = 0.5 * (-1 + math.log(beta) - math.log(pv) + pv / beta) / math.log(2)
        assert float(vb[k]) == pytest.approx(kl, rel=1e-6, abs=1e-10)


def test_mse_loss_without_learned_sigma(sched):
    out, x0, xt, t, noise = _oracle_batch(sched, learn_sigma=False)
    out = out + 0.5
    losses = training_losses(sched, out, x0, xt, t, noise, learn_sigma=False)
    torch.testing.assert_close(losses["mse"], torch.full((5,), 0.25, dtype=torch.float64))
    torch.testing.assert_close(losses["loss"], losses["mse"])
    assert float(losses["vb"].abs().max()) == 0.0


def test_vb_only_trains_the_variance(sched):
    out, x0, xt, t, noise = _oracle_batch(sched, learn_sigma=True, v=0.3)
    out = (out + 0.1).requires_grad_(True)
    losses = training_losses(sched, out, x0, xt, t, noise, learn_sigma=True)
    (g_vb,) = torch.autograd.grad(losses["vb"].sum(), out, retain_graph=True)
    assert float(g_vb[:, :3].abs().max()) == 0.0  # eps half detached
    assert float(g_vb[:, 3:].abs().max()) > 0
    (g_mse,) = torch.autograd.grad(losses["mse"].sum(), out)
    assert float(g_mse[:, :3].abs().max()) > 0 and float(g_mse[:, 3:].abs().max()) == 0.0


# ------------------------------------------------------------------------------------------- respacing


def test_space_timesteps_matches_adm():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim25") == set(range(0, 1000, 40))
    s250 = space_timesteps(1000, "250")
    assert len(s250) == 250 and min(s250) == 0 and max(s250) == 999
    # stride 999/249 = 333/83 never lands on a .5, so plain rounding of i * stride is the ADM set
    assert s250 == {round(i * 999 / 249) for i in range(250)}
    assert space_timesteps(1000, "1000") == set(range(1000))
    s = space_timesteps(300, "10,15,20")  # three sections of 100 steps
    assert len(s) == 45
    assert sorted(s)[:10] == [round(i * 11) for i in range(10)]
    assert min(x for x in s if x >= 100) == 100 and max(s) == 299
    assert space_timesteps(10, [2, 3]) == {0, 4, 5, 7, 9}  # section 0: 0..4 (2 steps), section 1: 5..9 (3)
    with pytest.raises(ValueError):
        space_timesteps(1000, "ddim300")
    with pytest.raises(ValueError):
        space_timesteps(10, "20")


def test_respace_keeps_alphas_cumprod(sched):
    keep = space_timesteps(T, "ddim50")
    sp = respace(sched, keep)
    assert sp.num_timesteps == 50
    np.testing.assert_array_equal(sp.timestep_map, np.arange(0, T, 20))
    np.testing.assert_allclose(sp.alphas_cumprod, sched.alphas_cumprod[sorted(keep)], rtol=1e-12)
    # from raw betas, and respacing a respaced schedule maps back to training timesteps
    assert np.allclose(respace(make_betas("linear", T), keep).betas, sp.betas)
    sp2 = respace(sp, {0, 10, 49})
    np.testing.assert_array_equal(sp2.timestep_map, [0, 200, 980])
    np.testing.assert_allclose(sp2.alphas_cumprod, sched.alphas_cumprod[[0, 200, 980]], rtol=1e-12)
    # identical respacing is the identity
    np.testing.assert_allclose(respace(sched, range(T)).betas, sched.betas, rtol=1e-10)


# -------------------------------------------------------------------------------------------- samplers


def _toy_model_fn(learn_sigma: bool):
    def fn(x, t):
        eps = 0.3 * torch.tanh(x) + (t.float() / T).view(-1, 1, 1, 1)
        return torch.cat([eps, torch.tanh(x)], dim=1) if learn_sigma else eps

    return fn


def _point_oracle(s: Schedule, x_star: torch.Tensor, learn_sigma: bool):
    """The eps whose x_0 prediction is exactly x_star, at training timestep t (indexes s, the full chain)."""

    def fn(x, t):
        eps = predict_eps_from_x0(s, x, t, x_star.expand_as(x))
        return torch.cat([eps, torch.zeros_like(eps)], dim=1) if learn_sigma else eps

    return fn


def _gaussian_oracle(s: Schedule, mu: float, sd: float):
    """E[eps | x_t] when the data is elementwise N(mu, sd^2): the exact optimal network."""

    def fn(x, t):
        abar = torch.tensor(s.alphas_cumprod, device=x.device)[t].view(-1, 1, 1, 1).float()
        return torch.sqrt(1 - abar) * (x - torch.sqrt(abar) * mu) / (abar * sd**2 + 1 - abar)

    return fn


SAMPLER_CASES = [("ddpm", 20), ("ddim", 20), ("dpm++", 10)]


@pytest.mark.parametrize("sampler,steps", SAMPLER_CASES)
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_sampler_determinism(sched, sampler, steps, learn_sigma):
    kw = dict(sampler=sampler, steps=steps, train_schedule=sched, shape=(2, 4, 4, 4), learn_sigma=learn_sigma, eta=0.5)
    fn = _toy_model_fn(learn_sigma)
    a = sample(fn, generator=torch.Generator().manual_seed(0), **kw)
    b = sample(fn, generator=torch.Generator().manual_seed(0), **kw)
    c = sample(fn, generator=torch.Generator().manual_seed(1), **kw)
    assert a.shape == (2, 4, 4, 4) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_given_noise_is_x_T(sched):
    fn = _toy_model_fn(False)
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    kw = dict(sampler="ddim", steps=10, train_schedule=sched, shape=noise.shape, learn_sigma=False)
    a = sample(fn, noise=noise, generator=torch.Generator().manual_seed(1), **kw)
    b = sample(fn, noise=noise, generator=torch.Generator().manual_seed(2), **kw)  # eta = 0: no other noise
    assert torch.equal(a, b)
    assert torch.equal(a, sample(fn, generator=torch.Generator().manual_seed(5), **kw))


@pytest.mark.parametrize("sampler,steps", SAMPLER_CASES)
def test_oracle_recovers_the_data_point(sched, sampler, steps):
    x_star = torch.rand(1, 4, 4, 4, generator=torch.Generator().manual_seed(6)) * 2 - 1
    for learn_sigma in (False, True):
        out = sample(
            _point_oracle(sched, x_star, learn_sigma), sampler=sampler, steps=steps, train_schedule=sched,
            shape=(3, 4, 4, 4), learn_sigma=learn_sigma, generator=torch.Generator().manual_seed(7),
        )
        torch.testing.assert_close(out, x_star.expand_as(out), rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "sampler,steps,eta", [("ddpm", 250, 0.0), ("ddim", 250, 0.0), ("ddim", 250, 1.0), ("dpm++", 50, 0.0)]
)
def test_gaussian_data_is_reproduced(sched, sampler, steps, eta):
    # With the exact eps-predictor of N(mu, sd^2) data every sampler must return that distribution, up to
    # its discretisation error (at these step counts <= 3% on the std; DDIM underestimates it at few
    # steps). Feeding the network the respaced index instead of timestep_map[t] badly breaks this.
    mu, sd = 0.5, 0.5
    out = sample(
        _gaussian_oracle(sched, mu, sd), sampler=sampler, steps=steps, train_schedule=sched,
        shape=(64, 1, 16, 16), learn_sigma=False, generator=torch.Generator().manual_seed(8), eta=eta,
    )
    assert float(out.mean()) == pytest.approx(mu, abs=0.02)
    assert float(out.std()) == pytest.approx(sd, rel=0.05)


def test_samplers_feed_training_timesteps(sched):
    seen = []

    def fn(x, t):
        assert t.dtype == torch.long and t.shape == (x.shape[0],)
        seen.append(int(t[0]))
        return torch.zeros_like(x)

    ddim_sample(fn, respace(sched, space_timesteps(T, "ddim50")), (2, 1, 2, 2), False)
    assert seen == list(range(980, -1, -20))
    seen.clear()
    ddpm_sample(fn, respace(sched, space_timesteps(T, "250")), (2, 1, 2, 2), False)
    assert seen == sorted(space_timesteps(T, "250"), reverse=True)
    seen.clear()
    dpm_solver_sample(fn, sched.betas, (2, 1, 2, 2), steps=10)
    assert len(seen) == 10 and seen[0] == 999 and seen == sorted(set(seen), reverse=True)


def test_sample_rejects_unknown_sampler(sched):
    with pytest.raises(ValueError, match="ddpm.*ddim.*dpm\\+\\+"):
        sample(_toy_model_fn(False), sampler="euler", steps=10, train_schedule=sched, shape=(1, 1, 2, 2),
               learn_sigma=False)
    with pytest.raises(ValueError, match="unspaced"):
        sample(_toy_model_fn(False), sampler="dpm++", steps=10, train_schedule=respace(sched, range(0, T, 2)),
               shape=(1, 1, 2, 2), learn_sigma=False)


# -------------------------------------------------------------------------------------------- guidance

NULL = 10


class _LabelModel:
    """Output depends on channel, label and input so cond / uncond halves differ in every channel."""

    def __init__(self, out_channels: int):
        self.out_channels = out_channels
        self.batch_sizes: list[int] = []

    def __call__(self, x, t, y, scale=1.0):
        self.batch_sizes.append(x.shape[0])
        ch = torch.arange(self.out_channels, dtype=x.dtype).view(1, -1, 1, 1)
        lab = y.to(x.dtype).view(-1, 1, 1, 1)
        base = x.mean(dim=1, keepdim=True) + t.to(x.dtype).view(-1, 1, 1, 1) / 1000
        return scale * (base + (ch + 1) * torch.sin(lab + ch))


def _dit_forward_with_cfg(model, x_doubled, t_doubled, y_doubled, cfg_scale):
    """DiT's ``forward_with_cfg``, step for step: run on [half; half], guide channels :3, keep the rest."""
    half = x_doubled[: len(x_doubled) // 2]
    model_out = model(torch.cat([half, half]), t_doubled, y_doubled)
    eps, rest = model_out[:, :3], model_out[:, 3:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    return torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)


def _guidance_inputs():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64)
    t = _t([5, 500, 999])
    y = _t([1, 2, 3])
    return x, t, y


def test_cfg_scale_one_is_the_conditional_model():
    x, t, y = _guidance_inputs()
    model = _LabelModel(8)
    fn = guided_model_fn(model, y, 1.0, NULL, scale=2.0)
    torch.testing.assert_close(fn(x, t), model(x, t, y, scale=2.0))
    assert model.batch_sizes == [3, 3]  # one plain call each, no doubling


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_dit_guidance_matches_forward_with_cfg(learn_sigma):
    x, t, y = _guidance_inputs()
    model = _LabelModel(8 if learn_sigma else 4)
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, NULL))
    out = guided_model_fn(model, y, 4.0, NULL, guidance="dit")(x, t)
    assert model.batch_sizes[-1] == 6
    torch.testing.assert_close(out[:, :3], uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3]))
    assert not torch.allclose(out[:, :3], cond[:, :3])
    # channel 3 (the 4th eps channel) and the variance channels are the conditional ones
    torch.testing.assert_close(out[:, 3:], cond[:, 3:])
    # and the whole thing is the conditional half of DiT's forward_with_cfg on [x; x]
    y_doubled = torch.cat([y, torch.full_like(y, NULL)])
    ref = _dit_forward_with_cfg(model, torch.cat([x, x]), torch.cat([t, t]), y_doubled, 4.0)
    torch.testing.assert_close(out, ref[:3])


def test_dit_guidance_never_guides_variance_channels():
    # a 1-channel model with learned sigma: DiT's literal [:3] would also guide the variance channel
    x, t, y = _guidance_inputs()
    x = x[:, :1]
    model = _LabelModel(2)
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, NULL))
    out = guided_model_fn(model, y, 3.0, NULL, guidance="dit", in_channels=1)(x, t)
    torch.testing.assert_close(out[:, :1], uncond[:, :1] + 3.0 * (cond[:, :1] - uncond[:, :1]))
    torch.testing.assert_close(out[:, 1:], cond[:, 1:])


def test_all_channel_guidance():
    x, t, y = _guidance_inputs()
    model = _LabelModel(8)
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, NULL))
    out = guided_model_fn(model, y, 1.5, NULL, guidance="all", in_channels=4)(x, t)
    torch.testing.assert_close(out[:, :4], uncond[:, :4] + 1.5 * (cond[:, :4] - uncond[:, :4]))
    torch.testing.assert_close(out[:, 4:], cond[:, 4:])
    with pytest.raises(ValueError, match="in_channels"):
        guided_model_fn(model, y, 1.5, NULL, guidance="all")
    with pytest.raises(ValueError, match="dit.*all"):
        guided_model_fn(model, y, 1.5, NULL, guidance="some")


def test_guided_sampling_end_to_end(sched):
    model = _LabelModel(8)
    y = _t([0, 1])
    kw = dict(sampler="ddim", steps=10, train_schedule=sched, shape=(2, 4, 2, 2), learn_sigma=True)
    a = sample(guided_model_fn(model, y, 4.0, NULL), generator=torch.Generator().manual_seed(0), **kw)
    b = sample(guided_model_fn(model, y, 1.0, NULL), generator=torch.Generator().manual_seed(0), **kw)
    assert torch.isfinite(a).all() and not torch.allclose(a, b)


def test_schedule_tables_are_copied_to_the_device_once():
    # Gathering per step must not copy tables from the host each time (a GPU stall per step).
    import gc

    from bigdit.diffusion import gaussian

    s = make_schedule()
    cpu = torch.device("cpu")
    first = gaussian._device_table(s.sqrt_alphas_cumprod, cpu)
    assert gaussian._device_table(s.sqrt_alphas_cumprod, cpu) is first
    assert gaussian._device_table(s.log_betas, cpu) is gaussian._device_table(s.log_betas, cpu)
    key = (id(s.sqrt_alphas_cumprod), "cpu")
    del s
    gc.collect()
    assert key not in gaussian._DEVICE_TABLES  # freed with its schedule
