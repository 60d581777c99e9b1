"""Model-agnostic samplers for epsilon-predicting diffusion networks.

Every sampler takes a ``model_fn(x, t_model) -> model_out`` closure, where ``t_model`` is a LongTensor
of shape ``[N]`` holding *training* timesteps (for a respaced schedule the samplers translate through
``Schedule.timestep_map``). Classifier-free guidance is just another closure, see
:func:`guided_model_fn`. Classifier guidance (ADM-G) is a ``cond_fn(x, t_model)`` returning the scaled gradient of
``log p(y | x_t)`` (:func:`classifier_cond_fn`), which DDPM applies to the mean (:func:`condition_mean`) and DDIM to
the noise prediction (:func:`condition_score`), as ADM's samplers do; the two guidances combine.

All randomness (initial noise and per-step noise) is drawn from the given ``torch.Generator`` on that
generator's device (CPU unless the caller passes another) and then moved to the sampling device, so a
seed reproduces the same samples on any device. ``generator`` may also be a sequence of generators, one per
sample (row ``k`` of every draw comes from ``generator[k]``): then sample ``k``'s noise, initial and per-step,
does not depend on which other samples share its batch, nor on the batch size (what tools/sample.py's
distributed FID sampling relies on). A batch of one with ``[g]`` draws exactly what ``g`` alone draws.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from bigdit.diffusion.gaussian import (
    Schedule,
    _extract,
    p_mean_variance,
    predict_eps_from_x0,
    predict_x0_from_eps,
    respace,
    space_timesteps,
)

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: classifier guidance: ``cond_fn(x_t, t_model)`` -> ``scale * grad_x log p(y | x_t)`` (shape of ``x_t``)
CondFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

SAMPLERS = ("ddpm", "ddim", "dpm++")
GUIDANCE_MODES = ("dit", "all")


def guided_model_fn(
    model: Callable[..., torch.Tensor],
    y: torch.Tensor,
    cfg_scale: float,
    null: int | torch.Tensor,
    guidance: str = "dit",
    in_channels: int | None = None,
    interval: Sequence[float] | None = None,
    time_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
    **model_kwargs: Any,
) -> ModelFn:
    """Wrap a conditional ``model(x, t, y, **model_kwargs)`` into a classifier-free-guided ``model_fn``.

    ``y`` is class labels (N,) with ``null`` the null label, or text conditioning (N, T, D) with ``null`` the
    empty-prompt embedding (T, D). The returned closure runs the conditional and unconditional passes as one
    doubled batch and returns ``eps_uncond + cfg_scale * (eps_cond - eps_uncond)`` for the guided channels:

    - ``guidance="dit"``: exactly DiT's ``forward_with_cfg``. DiT splits its output as
      ``eps, rest = out[:, :3], out[:, 3:]`` and guides only ``eps``, so only channels 0-2 are guided;
      everything from channel 3 on (the 4th latent eps channel and, with learned sigma, all variance
      channels) comes from the *conditional* half, which is the half DiT keeps (it feeds both halves the
      same ``x`` and returns the first). DiT's reference FIDs were produced this way. When ``in_channels``
      is given and below 3 only the ``in_channels`` eps channels are guided: DiT (4-channel latents only)
      never met that case, and guiding a variance channel would push ``v`` outside [-1, 1].
    - ``guidance="all"``: the standard formulation; all ``in_channels`` eps channels are guided and the
      remaining (variance) channels come from the conditional half. Requires ``in_channels``.

    With ``cfg_scale == 1`` guidance is the identity, so the closure makes a single plain conditional call.
    ``cfg_scale`` is in DiT's convention; U-ViT's scale ``s`` (``(1 + s) * eps_cond - s * eps_uncond``) is
    ``cfg_scale = 1 + s`` (:func:`dit_cfg_scale`), and U-ViT guides every channel (``guidance="all"``).

    ``interval=(lo, hi)`` guides only where ``lo <= time_of(t) <= hi`` and makes the plain conditional call
    elsewhere (guidance on part of the trajectory, as REPA and LightningDiT sample). ``time_of`` maps the
    network's time input to the flow convention, 0 = pure noise and 1 = data (:func:`guidance_time`).
    """
    if guidance not in GUIDANCE_MODES:
        raise ValueError(f"unknown guidance {guidance!r}; valid: {', '.join(GUIDANCE_MODES)}")
    if guidance == "all":
        if in_channels is None:
            raise ValueError('guidance="all" needs in_channels')
        n_guided = in_channels
    else:
        n_guided = 3 if in_channels is None else min(3, in_channels)

    if interval is not None:
        lo, hi = check_guidance_interval(interval)
        if time_of is None:
            raise ValueError("a guidance interval needs time_of, the map from the network's time to [0, 1]")

    def conditional_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model(x, t, y, **model_kwargs)

    if cfg_scale == 1.0:
        return conditional_fn

    y_null = null.to(y).expand_as(y) if torch.is_tensor(null) else torch.full_like(y, null)
    y_both = torch.cat([y, y_null])

    def cfg_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if interval is not None:
            u = time_of(t)
            on = (u >= lo) & (u <= hi)
            if not bool(on.any()):  # the whole batch is outside the interval: one plain conditional pass
                return conditional_fn(x, t)
        out = model(torch.cat([x, x]), torch.cat([t, t]), y_both, **model_kwargs)
        cond, uncond = out.chunk(2, dim=0)
        guided = uncond[:, :n_guided] + cfg_scale * (cond[:, :n_guided] - uncond[:, :n_guided])
        guided = torch.cat([guided, cond[:, n_guided:]], dim=1)
        if interval is not None and not bool(on.all()):
            guided = torch.where(on.reshape(-1, *([1] * (x.ndim - 1))), guided, cond)
        return guided

    return cfg_fn


def check_guidance_interval(interval: Sequence[float]) -> tuple[float, float]:
    """``guidance_interval=[lo, hi]`` as floats, ``0 <= lo < hi <= 1``; ValueError naming the key otherwise."""
    values = list(interval)
    if len(values) != 2 or not 0.0 <= float(values[0]) < float(values[1]) <= 1.0:
        raise ValueError(f"guidance_interval={values} must be [lo, hi] with 0 <= lo < hi <= 1 (times of the flow "
                         f"convention: 0 = pure noise, 1 = data)")
    return float(values[0]), float(values[1])


def guidance_time(num_timesteps: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """For a Gaussian diffusion of ``num_timesteps`` steps: training timestep ``k`` -> ``1 - k / T``, the flow
    convention's time (0 near pure noise, 1 at the data) in which guidance intervals are given."""
    return lambda t: 1.0 - t.double() / num_timesteps


CFG_CONVENTIONS = ("dit", "uvit")


def dit_cfg_scale(scale: float, convention: str = "dit") -> float:
    """A guidance scale in DiT's convention (1 = no guidance) from one in ``convention``: DiT's as is, U-ViT's
    ``s`` (0 = no guidance; its papers' 0.4 for ImageNet-256, 1.0 for MS-COCO) as ``1 + s``."""
    if convention not in CFG_CONVENTIONS:
        raise ValueError(f"unknown guidance convention {convention!r}; valid: {', '.join(CFG_CONVENTIONS)}")
    return float(scale) + (1.0 if convention == "uvit" else 0.0)


def classifier_cond_fn(classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], y: torch.Tensor,
                       scale: float) -> CondFn:
    """ADM's ``cond_fn`` for a noisy classifier ``classifier(x_t, t) -> logits``: ``scale * grad_x log p(y | x_t)``
    with ``log p`` the log-softmax of the logits at the labels ``y`` (guided-diffusion ``classifier_sample.py``).

    The gradient is taken with grad enabled inside the samplers' ``no_grad``; the logits are read in float32.
    """

    def cond_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = torch.log_softmax(classifier(x_in, t).float(), dim=-1)
            selected = log_probs[torch.arange(len(y), device=log_probs.device), y.to(log_probs.device)]
            return torch.autograd.grad(selected.sum(), x_in)[0] * scale

    return cond_fn


def condition_mean(cond_fn: CondFn, out: dict[str, torch.Tensor], x: torch.Tensor,
                   t_model: torch.Tensor) -> torch.Tensor:
    """The classifier-guided DDPM mean (ADM's ``condition_mean``, Sohl-Dickstein et al.): the reverse-process mean
    shifted by its variance times ``cond_fn``'s gradient, ``mean + variance * scale * grad log p(y | x_t)``."""
    return out["mean"] + out["variance"] * cond_fn(x, t_model).float()


def condition_score(cond_fn: CondFn, s: Schedule, out: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor,
                    t_model: torch.Tensor) -> torch.Tensor:
    """The classifier-guided predicted x0 for DDIM (ADM's ``condition_score``, Song et al.'s score conditioning):
    ``eps' = eps - sqrt(1 - abar_t) * scale * grad log p(y | x_t)``, then ``x0`` from ``eps'``. ``t`` indexes ``s``,
    ``t_model`` is what the networks are fed."""
    eps = predict_eps_from_x0(s, x, t, out["pred_x0"])
    eps = eps - torch.sqrt(1 - _extract(s.alphas_cumprod, t, x)) * cond_fn(x, t_model).float()
    return predict_x0_from_eps(s, x, t, eps)


#: one generator for the whole batch, or one per sample (row)
Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(shape: Sequence[int], generator: Generators, device: torch.device) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device, then moved to ``device``; with one generator per
    sample, row ``k`` is drawn from ``generator[k]`` alone."""
    if generator is not None and not isinstance(generator, torch.Generator):
        gens = list(generator)
        if len(gens) != shape[0]:
            raise ValueError(f"{len(gens)} generators for a batch of {shape[0]}: give one per sample")
        rows = [torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=torch.float32) for g in gens]
        return torch.stack(rows).to(device)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=torch.float32).to(device)


def initial_noise(
    shape: Sequence[int],
    noise: torch.Tensor | None,
    generator: Generators,
    device: torch.device | str | None,
) -> torch.Tensor:
    """``x_T``: the given ``noise`` (moved to ``device`` if one is given) or fresh noise from ``generator``."""
    if noise is not None:
        if tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise shape {tuple(noise.shape)} != shape {tuple(shape)}")
        return noise.to(device) if device is not None else noise
    return randn(shape, generator, torch.device(device if device is not None else "cpu"))


def progress_steps(steps: Iterable[int], progress: bool) -> Iterable[int]:
    """``steps``, wrapped in a tqdm bar when ``progress``."""
    if not progress:
        return steps
    from tqdm.auto import tqdm

    return tqdm(list(steps))


@torch.no_grad()
def ddpm_sample(
    model_fn: ModelFn,
    s: Schedule,
    shape: Sequence[int],
    learn_sigma: bool,
    generator: Generators = None,
    noise: torch.Tensor | None = None,
    clip_denoised: bool = False,
    device: torch.device | str | None = None,
    progress: bool = False,
    cond_fn: CondFn | None = None,
) -> torch.Tensor:
    """Ancestral sampling ``x_{T-1} -> ... -> x_0`` over ``s`` (possibly respaced), as ADM's ``p_sample_loop``.

    At step ``i`` the network sees ``s.timestep_map[i]``; ``x = mean + sigma * z`` except at ``i == 0``
    where the mean is returned. ``noise`` is ``x_T`` (drawn from ``generator`` if omitted); ``device``
    defaults to ``noise``'s device, else CPU. ``cond_fn`` (classifier guidance) shifts every step's mean
    (:func:`condition_mean`).
    """
    x = initial_noise(shape, noise, generator, device)
    tmap = torch.tensor(s.timestep_map, device=x.device)
    for i in progress_steps(range(s.num_timesteps - 1, -1, -1), progress):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        out = p_mean_variance(s, model_fn(x, tmap[t]), x, t, learn_sigma, clip_denoised=clip_denoised)
        if cond_fn is not None:
            out["mean"] = condition_mean(cond_fn, out, x, tmap[t])
        if i > 0:
            x = out["mean"] + torch.exp(0.5 * out["log_variance"]) * randn(x.shape, generator, x.device)
        else:
            x = out["mean"]
    return x


@torch.no_grad()
def ddim_sample(
    model_fn: ModelFn,
    s: Schedule,
    shape: Sequence[int],
    learn_sigma: bool,
    eta: float = 0.0,
    generator: Generators = None,
    noise: torch.Tensor | None = None,
    clip_denoised: bool = False,
    device: torch.device | str | None = None,
    progress: bool = False,
    cond_fn: CondFn | None = None,
) -> torch.Tensor:
    """DDIM sampling over ``s`` (normally respaced), as ADM's ``ddim_sample_loop``.

    ``x_prev = sqrt(abar_prev) x0_pred + sqrt(1 - abar_prev - sigma^2) eps + sigma z`` with
    ``sigma = eta * sqrt((1 - abar_prev) / (1 - abar)) * sqrt(1 - abar / abar_prev)``; ``eta = 0`` is
    deterministic given ``x_T``, ``eta = 1`` matches DDPM's posterior variance. ``eps`` is recomputed
    from the (possibly clipped) ``x0_pred`` so the update stays consistent with it. A learned variance,
    if any, is ignored. ``cond_fn`` (classifier guidance) corrects ``eps`` and ``x0_pred`` first
    (:func:`condition_score`).
    """
    x = initial_noise(shape, noise, generator, device)
    tmap = torch.tensor(s.timestep_map, device=x.device)
    for i in progress_steps(range(s.num_timesteps - 1, -1, -1), progress):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        out = p_mean_variance(s, model_fn(x, tmap[t]), x, t, learn_sigma, clip_denoised=clip_denoised)
        x0 = out["pred_x0"] if cond_fn is None else condition_score(cond_fn, s, out, x, t, tmap[t])
        eps = predict_eps_from_x0(s, x, t, x0)
        abar = _extract(s.alphas_cumprod, t, x)
        abar_prev = _extract(s.alphas_cumprod_prev, t, x)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        x = torch.sqrt(abar_prev) * x0 + torch.sqrt(1 - abar_prev - sigma**2) * eps
        if i > 0 and eta > 0:
            x = x + sigma * randn(x.shape, generator, x.device)
    return x


@torch.no_grad()
def dpm_solver_sample(
    model_fn: ModelFn,
    betas: np.ndarray,
    shape: Sequence[int],
    steps: int = 50,
    order: int = 2,
    generator: Generators = None,
    noise: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Multistep DPM-Solver++ (data prediction) in ``steps`` network calls, via diffusers.

    ``betas`` must be the full training betas: they are handed to diffusers as ``trained_betas`` so its
    noise schedule is exactly the training one, and the network is fed diffusers' (training-scale)
    timesteps. When the output has ``2C`` channels only the eps half is used. Deterministic given ``x_T``.
    """
    # Imported here: diffusers is heavy and only this sampler needs it.
    from diffusers import DPMSolverMultistepScheduler

    betas = np.asarray(betas, dtype=np.float64)
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=len(betas),
        trained_betas=betas,
        algorithm_type="dpmsolver++",
        solver_order=order,
        prediction_type="epsilon",
    )
    x = initial_noise(shape, noise, generator, device)
    scheduler.set_timesteps(steps, device=x.device)
    x = x * scheduler.init_noise_sigma
    c = x.shape[1]
    for t in progress_steps(scheduler.timesteps, progress):
        t_model = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        out = model_fn(x, t_model)
        if out.shape[1] == 2 * c:
            out = out[:, :c]
        elif out.shape[1] != c:
            raise ValueError(f"model output has {out.shape[1]} channels, expected {c} or {2 * c}")
        x = scheduler.step(out, t, x).prev_sample
    return x


def sample(
    model_fn: ModelFn,
    *,
    sampler: str,
    steps: int,
    train_schedule: Schedule | np.ndarray,
    shape: Sequence[int],
    learn_sigma: bool,
    generator: Generators = None,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    clip_denoised: bool = False,
    device: torch.device | str | None = None,
    progress: bool = False,
    cond_fn: CondFn | None = None,
) -> torch.Tensor:
    """Draw samples with one of ``"ddpm"``, ``"ddim"`` or ``"dpm++"`` in ``steps`` network calls.

    ``train_schedule`` is the schedule the network was trained on (or its betas). DDPM respaces it with
    ADM's even spacing ``str(steps)`` and DDIM with ``"ddim{steps}"`` (a fixed stride, as DiT/ADM do; it
    raises ValueError when no integer stride gives exactly ``steps`` steps). ``eta`` is DDIM's;
    ``clip_denoised`` and ``cond_fn`` (classifier guidance, :func:`classifier_cond_fn`) apply to DDPM/DDIM only.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
    s = train_schedule if isinstance(train_schedule, Schedule) else Schedule.from_betas(train_schedule)
    if sampler == "dpm++":
        if cond_fn is not None:
            raise ValueError("classifier guidance works with sampler=ddpm or ddim (ADM's samplers), not dpm++")
        if not np.array_equal(s.timestep_map, np.arange(s.num_timesteps)):
            raise ValueError("dpm++ needs the unspaced training schedule (identity timestep_map)")
        return dpm_solver_sample(
            model_fn, s.betas, shape, steps=steps, generator=generator, noise=noise, device=device, progress=progress
        )
    if sampler == "ddpm":
        spaced = respace(s, space_timesteps(s.num_timesteps, str(steps)))
        return ddpm_sample(
            model_fn, spaced, shape, learn_sigma, generator=generator, noise=noise,
            clip_denoised=clip_denoised, device=device, progress=progress, cond_fn=cond_fn,
        )
    spaced = respace(s, space_timesteps(s.num_timesteps, f"ddim{steps}"))
    return ddim_sample(
        model_fn, spaced, shape, learn_sigma, eta=eta, generator=generator, noise=noise,
        clip_denoised=clip_denoised, device=device, progress=progress, cond_fn=cond_fn,
    )
