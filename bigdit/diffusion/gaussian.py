"""Discrete Gaussian diffusion (DDPM as used by ADM and DiT) as pure functions.

Everything here is independent of any network or training loop: a :class:`Schedule` holds the
precomputed float64 coefficient tables, and the functions take the model *output* (not the model), so
they can be called from any loop, under any parallelism, and tested in closed form.

Conventions follow Dhariwal & Nichol (ADM) and DiT: the network predicts epsilon; with ``learn_sigma`` it
outputs ``2C`` channels, the last ``C`` being ``v`` in [-1, 1] that interpolates the log variance between
the clipped posterior log variance and ``log(beta_t)`` ("learned range"). Without ``learn_sigma`` the
reverse-process variance is ADM's "fixed large" one.

The coefficient tables are float64 numpy arrays. They are gathered at ``t`` in float64 and only then cast
to the dtype of the tensor they multiply, so that e.g. ``1 - alphas_cumprod`` near ``t = 0`` keeps its
precision.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")


def make_betas(
    schedule: str = "linear",
    num_steps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 2e-2,
) -> np.ndarray:
    """Return the float64 array of ``num_steps`` diffusion betas for a named schedule.

    - ``"linear"``: ADM's linear schedule. ``beta_start``/``beta_end`` are given for 1000 steps and are
      multiplied by ``1000 / num_steps`` so that shorter chains reach a similar total noise level.
    - ``"scaled_linear"``: ``linspace(sqrt(beta_start), sqrt(beta_end), num_steps) ** 2`` (Stable Diffusion,
      U-ViT; normally used with ``beta_start=0.00085, beta_end=0.012``). No rescaling by ``num_steps``.
    - ``"cosine"``: ADM's cosine schedule (``squaredcos_cap_v2``), betas capped at 0.999. Ignores
      ``beta_start``/``beta_end``.

    Raises ValueError for an unknown schedule name or ``num_steps < 1``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if schedule == "linear":
        scale = 1000.0 / num_steps
        return np.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=np.float64)
    if schedule == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=np.float64) ** 2
    if schedule == "cosine":
        return _betas_for_alpha_bar(
            num_steps, lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2, max_beta=0.999
        )
    raise ValueError(f"unknown beta schedule {schedule!r}; valid: {', '.join(BETA_SCHEDULES)}")


def _betas_for_alpha_bar(num_steps: int, alpha_bar: Callable[[float], float], max_beta: float) -> np.ndarray:
    """Discretise a continuous cumulative-alpha function ``alpha_bar(u)``, ``u`` in [0, 1], into betas.

    ``beta_i = 1 - alpha_bar((i+1)/T) / alpha_bar(i/T)``, capped at ``max_beta`` because the cosine
    alpha_bar reaches 0 at ``u = 1`` and a beta of 1 would make the last step singular.
    """
    betas = [
        min(1.0 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)
    ]
    return np.asarray(betas, dtype=np.float64)


@dataclass(frozen=True)
class Schedule:
    """Precomputed coefficient tables of a discrete Gaussian diffusion (all float64 numpy arrays).

    Index ``i`` of every table is a step of *this* chain. ``timestep_map[i]`` is the training timestep the
    network must be fed at that step: the identity for the training schedule, the kept original
    timesteps for a respaced one (see :func:`respace`). Build with :meth:`from_betas` or
    :func:`make_schedule`.
    """

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    timestep_map: np.ndarray

    @property
    def num_timesteps(self) -> int:
        """Number of steps of this chain (the length of every table)."""
        return int(self.betas.shape[0])

    @cached_property
    def log_betas(self) -> np.ndarray:
        """log(beta_t): the upper end of the learned variance range."""
        return _frozen(np.log(self.betas))

    @cached_property
    def fixed_large_variance(self) -> np.ndarray:
        """ADM's fixed "large" variance: beta_t, with beta_0 replaced by the posterior variance at t = 1."""
        return _frozen(np.append(self.posterior_variance[1], self.betas[1:]))

    @cached_property
    def log_fixed_large_variance(self) -> np.ndarray:
        return _frozen(np.log(self.fixed_large_variance))

    @classmethod
    def from_betas(cls, betas: Sequence[float] | np.ndarray, timestep_map: Iterable[int] | None = None) -> Schedule:
        """Compute all tables from ``betas`` (1-D, each in (0, 1], at least 2 steps).

        ``timestep_map`` defaults to the identity ``arange(len(betas))``.
        """
        betas = np.array(betas, dtype=np.float64)  # a copy: it is made read-only below
        if betas.ndim != 1 or betas.shape[0] < 2:
            # The fixed-large variance and the clipped posterior log variance both borrow the value at
            # step 1 for step 0 (where the posterior variance is 0), so a chain needs two steps.
            raise ValueError(f"betas must be 1-D with at least 2 steps, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        n = betas.shape[0]
        if timestep_map is None:
            tmap = np.arange(n, dtype=np.int64)
        else:
            tmap = np.asarray(list(timestep_map), dtype=np.int64)
            if tmap.shape != (n,):
                raise ValueError(f"timestep_map must have {n} entries, got {tmap.shape}")

        alphas = 1.0 - betas
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
        tables = dict(
            betas=betas,
            alphas_cumprod=ac,
            alphas_cumprod_prev=ac_prev,
            sqrt_alphas_cumprod=np.sqrt(ac),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1.0),
            posterior_variance=posterior_variance,
            # The posterior variance is 0 at t = 0; its log is clipped by reusing the t = 1 value.
            posterior_log_variance_clipped=np.log(np.append(posterior_variance[1], posterior_variance[1:])),
            posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
            posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
            timestep_map=tmap,
        )
        return cls(**{name: _frozen(arr) for name, arr in tables.items()})


def make_schedule(
    schedule: str = "linear",
    num_steps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 2e-2,
) -> Schedule:
    """Shorthand for ``Schedule.from_betas(make_betas(schedule, num_steps, beta_start, beta_end))``."""
    return Schedule.from_betas(make_betas(schedule, num_steps, beta_start, beta_end))


def _frozen(arr: np.ndarray) -> np.ndarray:
    """Make a table immutable (the Schedule is frozen), which also makes its device copy cacheable."""
    arr.setflags(write=False)
    return arr


# Device copies of immutable schedule tables, so gathering per step copies nothing from the host (a
# host-to-device copy from pageable memory would stall the host on the GPU stream every step). An entry
# leaves the cache when its numpy table is garbage collected.
_DEVICE_TABLES: dict[tuple[int, str], torch.Tensor] = {}


def _device_table(arr: np.ndarray, device: torch.device) -> torch.Tensor:
    if arr.flags.writeable:  # not a schedule table: it may change, so it is not cached
        return torch.tensor(arr, device=device)
    key = (id(arr), str(device))
    table = _DEVICE_TABLES.get(key)
    if table is None:
        table = _DEVICE_TABLES[key] = torch.tensor(arr, device=device)
        weakref.finalize(arr, _DEVICE_TABLES.pop, key, None)
    return table


def _extract(arr: np.ndarray, t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Gather ``arr[t]`` (one value per sample) and broadcast it to ``ref``'s shape, dtype and device.

    The gather happens in float64 and the cast to ``ref.dtype`` last, so low-precision inputs only lose
    precision once. The result is materialised (contiguous), not a stride-0 view: elementwise ops such as
    ``exp``/``sqrt`` on expanded views can be far slower on CPU.
    """
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"timesteps must be an integer tensor, got {t.dtype}")
    values = _device_table(arr, t.device)[t.long()]
    values = values.to(device=ref.device, dtype=ref.dtype)
    return values.reshape(-1, *([1] * (ref.ndim - 1))).expand(ref.shape).contiguous()


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def timesteps_from_uniform(u: torch.Tensor, num_timesteps: int) -> torch.Tensor:
    """Integer timesteps uniform over ``[0, num_timesteps)`` from uniforms ``u`` in ``[0, 1)`` (the loop's draws)."""
    return (u * num_timesteps).long().clamp_(max=num_timesteps - 1)


def q_sample(s: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Sample ``x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)`` using the given ``noise``."""
    return _extract(s.sqrt_alphas_cumprod, t, x0) * x0 + _extract(s.sqrt_one_minus_alphas_cumprod, t, x0) * noise


def q_posterior_mean_variance(
    s: Schedule, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, variance and clipped log variance of the forward posterior ``q(x_{t-1} | x_t, x_0)``."""
    mean = _extract(s.posterior_mean_coef1, t, xt) * x0 + _extract(s.posterior_mean_coef2, t, xt) * xt
    var = _extract(s.posterior_variance, t, xt)
    log_var_clipped = _extract(s.posterior_log_variance_clipped, t, xt)
    return mean, var, log_var_clipped


def predict_x0_from_eps(s: Schedule, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Invert ``q_sample``: ``x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``."""
    return _extract(s.sqrt_recip_alphas_cumprod, t, xt) * xt - _extract(s.sqrt_recipm1_alphas_cumprod, t, xt) * eps


def predict_eps_from_x0(s: Schedule, xt: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The noise that takes ``x_0`` to ``x_t`` at step ``t`` (inverse of :func:`predict_x0_from_eps`)."""
    return (_extract(s.sqrt_recip_alphas_cumprod, t, xt) * xt - x0) / _extract(s.sqrt_recipm1_alphas_cumprod, t, xt)


def _split_model_output(
    model_out: torch.Tensor, xt: torch.Tensor, learn_sigma: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split a network output into (eps, v) with v None when the variance is not learned."""
    c = xt.shape[1]
    expected = 2 * c if learn_sigma else c
    if model_out.shape[0] != xt.shape[0] or model_out.shape[1] != expected or model_out.shape[2:] != xt.shape[2:]:
        raise ValueError(
            f"model output shape {tuple(model_out.shape)} does not match x shape {tuple(xt.shape)} "
            f"with learn_sigma={learn_sigma} (expected {expected} channels)"
        )
    if learn_sigma:
        eps, v = torch.split(model_out, c, dim=1)
        return eps, v
    return model_out, None


def p_mean_variance(
    s: Schedule,
    model_out: torch.Tensor,
    xt: torch.Tensor,
    t: torch.Tensor,
    learn_sigma: bool,
    clip_denoised: bool = False,
    denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Reverse-process Gaussian ``p(x_{t-1} | x_t)`` from an epsilon-predicting network output.

    ``t`` indexes ``s`` (for a respaced schedule, the network was fed ``s.timestep_map[t]``).
    With ``learn_sigma`` the output's last ``C`` channels are ``v`` in [-1, 1] and
    ``log_var = (v+1)/2 * log(beta_t) + (1-(v+1)/2) * posterior_log_variance_clipped_t`` (ADM learned range);
    otherwise the variance is ADM's fixed large one, ``beta_t`` (with ``beta_0`` replaced by the posterior
    variance at step 1 so the decoder likelihood at t = 0 is not needlessly wide).
    The predicted x_0 goes through ``denoised_fn`` and then, with ``clip_denoised``, is clamped to [-1, 1]
    before forming the posterior mean.

    Returns a dict with ``mean``, ``variance``, ``log_variance``, ``pred_x0`` and ``eps``.
    """
    eps, v = _split_model_output(model_out, xt, learn_sigma)
    if v is not None:
        min_log = _extract(s.posterior_log_variance_clipped, t, xt)
        max_log = _extract(s.log_betas, t, xt)
        frac = (v + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        variance = torch.exp(log_variance)
    else:
        variance = _extract(s.fixed_large_variance, t, xt)
        log_variance = _extract(s.log_fixed_large_variance, t, xt)

    pred_x0 = predict_x0_from_eps(s, xt, t, eps)
    if denoised_fn is not None:
        pred_x0 = denoised_fn(pred_x0)
    if clip_denoised:
        pred_x0 = pred_x0.clamp(-1, 1)
    mean, _, _ = q_posterior_mean_variance(s, pred_x0, xt, t)
    return dict(mean=mean, variance=variance, log_variance=log_variance, pred_x0=pred_x0, eps=eps)


def normal_kl(
    mean1: torch.Tensor | float,
    logvar1: torch.Tensor | float,
    mean2: torch.Tensor | float,
    logvar2: torch.Tensor | float,
) -> torch.Tensor:
    """Elementwise ``KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)))`` in nats.

    At least one argument must be a tensor; scalars are broadcast against it.
    """
    ref = next((a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, torch.Tensor)), None)
    if ref is None:
        raise TypeError("normal_kl needs at least one tensor argument")
    mean1, logvar1, mean2, logvar2 = (
        a if isinstance(a, torch.Tensor) else torch.as_tensor(a, dtype=ref.dtype, device=ref.device)
        for a in (mean1, logvar1, mean2, logvar2)
    )
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Fast tanh approximation of the standard normal CDF (the one ADM uses; abs error < 2e-4)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Elementwise log-likelihood of data ``x`` in [-1, 1] quantised to 256 levels (bin width 2/255).

    Each value owns the Gaussian mass within ``±1/255`` of it; the two extreme levels also own the tails,
    so the probabilities of the 256 levels sum to one. ``log_scales`` is the log standard deviation.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    # Clamping keeps the logs finite where the approximated mass underflows.
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def vb_terms_bpd(
    s: Schedule,
    model_out: torch.Tensor,
    x0: torch.Tensor,
    xt: torch.Tensor,
    t: torch.Tensor,
    learn_sigma: bool,
) -> torch.Tensor:
    """Per-sample variational-bound term in bits per dimension (shape ``[N]``).

    ``KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))`` for ``t > 0`` and the discretised decoder NLL
    ``-log p(x_0 | x_1)`` for ``t == 0``, both averaged over non-batch dimensions. No denoised clipping,
    as in ADM/DiT training.
    """
    true_mean, _, true_log_var = q_posterior_mean_variance(s, x0, xt, t)
    out = p_mean_variance(s, model_out, xt, t, learn_sigma)
    kl = _mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
    decoder_nll = -discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])
    decoder_nll = _mean_flat(decoder_nll) / math.log(2.0)
    return torch.where(t == 0, decoder_nll, kl)


def training_losses(
    s: Schedule,
    model_out: torch.Tensor,
    x0: torch.Tensor,
    xt: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    learn_sigma: bool,
) -> dict[str, torch.Tensor]:
    """DiT/ADM training loss for an epsilon-predicting network, from its output on ``xt = q_sample(x0, t, noise)``.

    Returns per-sample (shape ``[N]``) tensors:

    - ``mse``: mean over non-batch dims of ``(noise - eps_pred) ** 2``.
    - ``vb``: with ``learn_sigma``, :func:`vb_terms_bpd` evaluated on the output with its eps half
      *detached*, so the bound only trains the variance channels while the mean is trained by ``mse``
      (ADM's hybrid objective, as DiT uses it). Unlike ADM's RESCALED_MSE, ``vb`` is not multiplied by
      ``num_timesteps / 1000``: DiT uses plain MSE (and 1000 steps, where the factor would be 1 anyway).
      Without ``learn_sigma`` there is no variance to train and ``vb`` is all zeros, so callers can log
      the same keys in both cases.
    - ``loss``: ``mse + vb``.

    The caller runs the network, so this works from any training loop.
    """
    eps, v = _split_model_output(model_out, xt, learn_sigma)
    mse = _mean_flat((noise - eps) ** 2)
    if v is not None:
        frozen = torch.cat([eps.detach(), v], dim=1)
        vb = vb_terms_bpd(s, frozen, x0, xt, t, learn_sigma=True)
    else:
        vb = torch.zeros_like(mse)
    return dict(loss=mse + vb, mse=mse, vb=vb)


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> set[int]:
    """Timesteps to keep when shortening a ``num_timesteps`` chain, exactly as ADM.

    ``section_counts`` is either ``"ddimN"`` (the stride ``k`` with ``len(range(0, T, k)) == N``, as in
    the DDIM paper; ValueError if no such stride exists) or a list / comma-separated string of counts:
    the chain is cut into that many equal sections (earlier sections get the remainder) and each section
    keeps its count of evenly spaced steps, rounded, including both of its ends. E.g. ``"250"`` keeps 250
    steps from 0 to T-1 and ``"10,15,20"`` keeps 10, 15 and 20 steps from the three thirds.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride from {num_timesteps}")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start = 0
    kept: list[int] = []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide section of {size} steps into {count}")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        # Accumulate the fractional index (rather than i * stride) so the rounding matches ADM bit for bit.
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += stride
        start += size
    return set(kept)


def respace(s_or_betas: Schedule | np.ndarray, use_timesteps: Iterable[int]) -> Schedule:
    """Shorter chain that visits only ``use_timesteps`` (indices of ``s_or_betas``'s steps).

    The new betas ``1 - abar[i] / abar[previous kept]`` make the new chain's cumulative alphas equal the
    original's at the kept steps, so a network trained on the original chain is valid on it as long as it
    is fed the original timestep: ``timestep_map`` holds those (composed with the input schedule's own
    map, so respacing a respaced schedule still points at training timesteps).
    """
    s = s_or_betas if isinstance(s_or_betas, Schedule) else Schedule.from_betas(s_or_betas)
    keep = sorted(set(int(i) for i in use_timesteps))
    if not keep or keep[0] < 0 or keep[-1] >= s.num_timesteps:
        raise ValueError(f"use_timesteps must be non-empty indices in [0, {s.num_timesteps})")
    ac = s.alphas_cumprod[keep]
    ac_prev = np.append(1.0, ac[:-1])
    return Schedule.from_betas(1.0 - ac / ac_prev, timestep_map=s.timestep_map[keep])
