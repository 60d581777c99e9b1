"""Samplers for flow-matching networks (:mod:`bigdit.diffusion.transport`), from noise at t = 0 to data at t = 1.

Each takes a ``model_fn(x, t) -> network output`` closure with float times ``t`` (N,) (guidance, with or without an
interval, is such a closure: :func:`bigdit.diffusion.sampling.guided_model_fn`); the output is turned into a
velocity (or a score, for the SDE) by the transport's conversions, so velocity, noise and score models all sample.

- ``euler``, ``heun``: the probability-flow ODE ``dx/dt = v(x, t)`` on ``steps`` equal intervals of
  [t0, t1] (``steps`` and ``2 * steps`` network calls);
- ``dopri5``: the same ODE with torchdiffeq's adaptive Dormand-Prince solver (``atol``, ``rtol``; SiT's ODE
  sampler, whose ``steps`` only sets where its solution is reported: the solve is the same);
- ``sde``: SiT's Euler-Maruyama on ``dx = [v + w_t score] dt + sqrt(2 w_t) dW`` with ``steps - 1`` steps over
  [t0, 1 - last_step_size] and a last step to t = 1 (``steps`` network calls; SiT's FID-50K 2.06 setting is
  ``diffusion_form=sigma``, ``last_step=mean``, ``last_step_size=0.04``, 250 steps).

[t0, t1] is SiT's: [0, 1] for velocity models, [sample_eps, 1 - sample_eps] for noise and score models (whose
velocity is singular at t = 0). Randomness (x_0 and the SDE's increments) comes from the generator(s) as in
:mod:`bigdit.diffusion.sampling`: with one generator per sample, sample k's draws depend on nothing else.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from bigdit.diffusion.sampling import Generators, ModelFn, initial_noise, progress_steps, randn
from bigdit.diffusion.transport import (
    Transport,
    path_coefficients,
    score_from_prediction,
    velocity_from_prediction,
)

FLOW_SAMPLERS = ("euler", "heun", "dopri5", "sde")
DIFFUSION_FORMS = ("sigma", "constant", "sbdm", "linear", "decreasing", "increasing_decreasing")
LAST_STEPS = ("mean", "euler", "tweedie", "none")


def ode_interval(tr: Transport) -> tuple[float, float]:
    """[t0, t1] of the ODE samplers: [0, 1] for a velocity model, ``sample_eps`` away from both ends otherwise."""
    eps = tr.sample_eps if tr.prediction != "velocity" else 0.0
    return eps, 1.0 - eps


def sde_interval(tr: Transport, diffusion_form: str, last_step: str, last_step_size: float) -> tuple[float, float]:
    """[t0, t1] of the SDE's Euler-Maruyama steps (SiT's ``check_interval``): t0 = ``sample_eps`` for noise/score
    models and for ``sbdm`` (singular at t = 0), else 0; t1 = 1 - ``last_step_size`` (``1 - sample_eps`` without a
    last step)."""
    t0 = tr.sample_eps if (diffusion_form == "sbdm" or tr.prediction != "velocity") else 0.0
    if diffusion_form == "sbdm" and t0 == 0:
        raise ValueError("diffusion_form=sbdm is singular at t = 0: set diffusion.sample_eps > 0 (e.g. 1e-3)")
    t1 = 1.0 - (tr.sample_eps if last_step == "none" else last_step_size)
    if not t0 < t1:
        raise ValueError(f"the SDE interval [{t0}, {t1}] is empty: last_step_size={last_step_size} must be < 1")
    return t0, t1


def diffusion_coefficient(tr: Transport, form: str, norm: float, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """SiT's diffusion coefficient ``w_t`` (``compute_diffusion``) broadcast against ``x``: ``sigma`` (norm
    sigma_t), ``constant`` (norm), ``sbdm`` (norm (alpha'/alpha) sigma^2 - sigma sigma', the score-based diffusion
    model's), ``linear`` (norm (1 - t)), ``decreasing`` ((norm cos(pi t) + 1)^2 / 4), ``increasing_decreasing``
    (norm sin(pi t)^2)."""
    t = t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    if form == "sigma":
        return norm * path_coefficients(tr.path, t)[2]
    if form == "constant":
        return torch.full_like(t, norm)
    if form == "sbdm":
        a, da, s, ds = path_coefficients(tr.path, t)
        return norm * (da / a * s**2 - s * ds)
    if form == "linear":
        return norm * (1 - t)
    if form == "decreasing":
        return 0.25 * (norm * torch.cos(math.pi * t) + 1) ** 2
    if form == "increasing_decreasing":
        return norm * torch.sin(math.pi * t) ** 2
    raise ValueError(f"unknown diffusion_form {form!r}; valid: {', '.join(DIFFUSION_FORMS)}")


def _times(x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """A time for every sample of ``x`` (N,), float32 on its device."""
    return torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float32)


def _output(model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The network output at (x, t) in float32, checked: a flow model predicts one value per input channel."""
    out = model_fn(x, t).float()
    if out.shape != x.shape:
        raise ValueError(f"flow model output {tuple(out.shape)} must match x {tuple(x.shape)} "
                         f"(model.learn_sigma=false)")
    return out


def _velocity(model_fn: ModelFn, tr: Transport, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    tt = _times(x, t)
    return velocity_from_prediction(tr.path, tr.prediction, _output(model_fn, x, tt), x, tt)


@torch.no_grad()
def euler_sample(model_fn: ModelFn, tr: Transport, x: torch.Tensor, steps: int, progress: bool = False) -> torch.Tensor:
    """Euler on the probability-flow ODE from ``x`` (noise at t0) over ``steps`` equal steps."""
    t0, t1 = ode_interval(tr)
    ts = torch.linspace(t0, t1, steps + 1, dtype=torch.float64).tolist()
    for i in progress_steps(range(steps), progress):
        x = x + (ts[i + 1] - ts[i]) * _velocity(model_fn, tr, x, ts[i])
    return x


@torch.no_grad()
def heun_sample(model_fn: ModelFn, tr: Transport, x: torch.Tensor, steps: int, progress: bool = False) -> torch.Tensor:
    """Heun (explicit trapezoid, 2nd order) on the probability-flow ODE over ``steps`` equal steps."""
    t0, t1 = ode_interval(tr)
    ts = torch.linspace(t0, t1, steps + 1, dtype=torch.float64).tolist()
    for i in progress_steps(range(steps), progress):
        h = ts[i + 1] - ts[i]
        v = _velocity(model_fn, tr, x, ts[i])
        v_next = _velocity(model_fn, tr, x + h * v, ts[i + 1])
        x = x + 0.5 * h * (v + v_next)
    return x


@torch.no_grad()
def dopri5_sample(model_fn: ModelFn, tr: Transport, x: torch.Tensor, atol: float = 1e-6,
                  rtol: float = 1e-3) -> torch.Tensor:
    """The probability-flow ODE solved by torchdiffeq's adaptive ``dopri5`` (SiT's defaults: atol 1e-6, rtol 1e-3)."""
    from torchdiffeq import odeint  # only this sampler needs it

    t0, t1 = ode_interval(tr)
    span = torch.tensor([t0, t1], dtype=torch.float32, device=x.device)
    return odeint(lambda t, z: _velocity(model_fn, tr, z, t), x, span, method="dopri5", atol=atol, rtol=rtol)[-1]


@torch.no_grad()
def sde_sample(model_fn: ModelFn, tr: Transport, x: torch.Tensor, steps: int, generator: Generators = None,
               diffusion_form: str = "sigma", diffusion_norm: float = 1.0, last_step: str = "mean",
               last_step_size: float = 0.04, progress: bool = False) -> torch.Tensor:
    """SiT's SDE sampler: ``steps - 1`` Euler-Maruyama steps of ``dx = [v + w score] dt + sqrt(2 w) dW`` on
    [t0, t1] (:func:`sde_interval`), then the last step at t1: ``mean`` (the drift alone, no noise), ``euler``
    (the ODE's velocity), ``tweedie`` (``(x + sigma^2 score) / alpha``) or ``none`` (x as it is)."""
    if last_step not in LAST_STEPS:
        raise ValueError(f"unknown last_step {last_step!r}; valid: {', '.join(LAST_STEPS)}")
    if steps < 2:
        raise ValueError(f"the sde sampler needs steps >= 2 (steps - 1 stochastic steps and a last one), got {steps}")
    t0, t1 = sde_interval(tr, diffusion_form, last_step, last_step_size)
    ts = torch.linspace(t0, t1, steps, dtype=torch.float64).tolist()
    dt = ts[1] - ts[0]

    def drift_and_score(z: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tt = _times(z, t)
        out = _output(model_fn, z, tt)
        v = velocity_from_prediction(tr.path, tr.prediction, out, z, tt)
        score = score_from_prediction(tr.path, tr.prediction, out, z, tt)
        w = diffusion_coefficient(tr, diffusion_form, diffusion_norm, tt, z)
        return v + w * score, v, score

    for i in progress_steps(range(steps - 1), progress):
        drift, _, _ = drift_and_score(x, ts[i])
        w = diffusion_coefficient(tr, diffusion_form, diffusion_norm, _times(x, ts[i]), x)
        x = x + drift * dt + torch.sqrt(2 * w * dt) * randn(x.shape, generator, x.device)
    if last_step == "none":
        return x
    drift, v, score = drift_and_score(x, t1)
    if last_step == "mean":
        return x + drift * last_step_size
    if last_step == "euler":
        return x + v * last_step_size
    a, _, s, _ = path_coefficients(tr.path, torch.tensor(t1, dtype=x.dtype))
    return (x + s**2 * score) / a


def flow_sample(
    model_fn: ModelFn,
    tr: Transport,
    *,
    sampler: str,
    steps: int,
    shape: Sequence[int],
    generator: Generators = None,
    noise: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    atol: float = 1e-6,
    rtol: float = 1e-3,
    diffusion_form: str = "sigma",
    diffusion_norm: float = 1.0,
    last_step: str = "mean",
    last_step_size: float = 0.04,
    progress: bool = False,
) -> torch.Tensor:
    """Draw samples of a flow model with ``sampler`` (one of :data:`FLOW_SAMPLERS`) from ``noise`` (x at t = 0;
    drawn from ``generator`` if omitted). ``atol``/``rtol`` are dopri5's, ``diffusion_form``, ``diffusion_norm``,
    ``last_step`` and ``last_step_size`` the SDE's."""
    if sampler not in FLOW_SAMPLERS:
        raise ValueError(f"unknown flow sampler {sampler!r}; valid: {', '.join(FLOW_SAMPLERS)}")
    if steps < 1:
        raise ValueError(f"steps={steps} must be positive")
    if diffusion_form not in DIFFUSION_FORMS:
        raise ValueError(f"unknown diffusion_form {diffusion_form!r}; valid: {', '.join(DIFFUSION_FORMS)}")
    x = initial_noise(shape, noise, generator, device)
    if sampler == "euler":
        return euler_sample(model_fn, tr, x, steps, progress)
    if sampler == "heun":
        return heun_sample(model_fn, tr, x, steps, progress)
    if sampler == "dopri5":
        return dopri5_sample(model_fn, tr, x, atol, rtol)
    return sde_sample(model_fn, tr, x, steps, generator, diffusion_form, diffusion_norm, last_step, last_step_size,
                      progress)
