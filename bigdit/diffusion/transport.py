"""Flow matching / stochastic interpolants (SiT, Ma et al. 2024) as pure functions.

Convention (SiT's, the only one used here): **data at t = 1, noise at t = 0**. A path couples a data point
``x1`` and Gaussian noise ``eps`` as ``x_t = alpha_t x1 + sigma_t eps``:

- ``path="linear"``: ``alpha_t = t``, ``sigma_t = 1 - t`` (rectified flow / SiT's "Linear");
- ``path="gvp"``: ``alpha_t = sin(pi t / 2)``, ``sigma_t = cos(pi t / 2)`` (SiT's "GVP": variance preserving).

The network sees ``t`` itself, a float in [0, 1], in the timestep embedder DiT uses for its integer steps (what
SiT does: no rescaling to 1000). It predicts one of (``prediction``):

- ``velocity``: ``v = d x_t / dt = alpha'_t x1 + sigma'_t eps`` (SiT's default);
- ``noise``: ``eps``;
- ``score``: ``grad log p_t(x_t) = -eps / sigma_t``.

All three determine each other given ``(x_t, t)``: with ``D_t = alpha'_t sigma_t - alpha_t sigma'_t`` (1 for the
linear path, pi/2 for GVP: never 0), ``eps = (alpha'_t x_t - alpha_t v) / D_t`` and ``v = (alpha'_t x_t - D_t eps) /
alpha_t``. The second is singular at t = 0 (noise carries no information about the data there), which is why SiT
keeps noise and score models ``train_eps``/``sample_eps`` = 1e-3 away from the ends; velocity models use [0, 1].

Nothing here touches a network or a loop: functions take the model *output*. The settings live in a frozen
:class:`Transport` built from ``configs/diffusion/flow.yaml``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

PATHS = ("linear", "gvp")
PREDICTIONS = ("velocity", "noise", "score")
T_SAMPLINGS = ("uniform", "logit_normal")
LOSS_WEIGHTS = ("none", "velocity", "likelihood")
#: SiT's default distance from the ends of [0, 1] for noise and score models (velocity models: 0)
DEFAULT_EPS = 1e-3


@dataclass(frozen=True)
class Transport:
    """The settings of a flow-matching objective (``diffusion=flow``); see the module docstring.

    ``loss_weight`` is SiT's weighting of noise/score losses (``velocity``: ``(D_t / alpha_t)^2``, which makes
    the loss the velocity error; ``likelihood``: ``D_t / (alpha_t sigma_t)``); a velocity model has none.
    ``t_sampling``: training times uniform on [train_eps, 1 - train_eps] (SiT) or logit-normal (``logit(t) ~
    N(t_mean, t_std^2)``, SD3's; mind that SD3 puts data at t = 0, so its mean ``m`` is ``t_mean = -m`` here),
    mapped into the same interval. ``train_eps``/``sample_eps`` null: SiT's defaults (0 for velocity, 1e-3 else).
    """

    kind: str = "flow"
    path: str = "linear"
    prediction: str = "velocity"
    loss_weight: str = "none"
    t_sampling: str = "uniform"
    t_mean: float = 0.0
    t_std: float = 1.0
    train_eps: float | None = None
    sample_eps: float | None = None

    def __post_init__(self) -> None:
        for key, valid in (("kind", ("flow",)), ("path", PATHS), ("prediction", PREDICTIONS),
                           ("t_sampling", T_SAMPLINGS), ("loss_weight", LOSS_WEIGHTS)):
            if getattr(self, key) not in valid:
                raise ValueError(f"unknown diffusion.{key}={getattr(self, key)!r}; valid: {', '.join(valid)}")
        if self.prediction == "velocity" and self.loss_weight != "none":
            raise ValueError(f"diffusion.loss_weight={self.loss_weight} weights noise or score losses (SiT); a velocity "
                             f"model has none: set diffusion.loss_weight=none or diffusion.prediction=noise|score")
        if self.t_std <= 0:
            raise ValueError(f"diffusion.t_std={self.t_std} must be positive")
        default = 0.0 if self.prediction == "velocity" else DEFAULT_EPS
        object.__setattr__(self, "train_eps", default if self.train_eps is None else float(self.train_eps))
        object.__setattr__(self, "sample_eps", default if self.sample_eps is None else float(self.sample_eps))
        for key in ("train_eps", "sample_eps"):
            if not 0.0 <= getattr(self, key) < 0.5:
                raise ValueError(f"diffusion.{key}={getattr(self, key)} must lie in [0, 0.5)")
        if self.prediction != "velocity" and self.train_eps == 0:
            raise ValueError(f"a {self.prediction} model's loss is singular at t = 0: set diffusion.train_eps > 0 "
                             f"(SiT: {DEFAULT_EPS})")

    @classmethod
    def from_config(cls, cfg) -> Transport:
        """From ``cfg.diffusion`` (a mapping); an unknown key is named with the valid ones."""
        cfg = dict(cfg)
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - valid)
        if unknown:
            raise ValueError(f"unknown diffusion keys {unknown} for diffusion=flow (valid: {', '.join(sorted(valid))}); "
                             f"keys a preset sets for the Gaussian diffusion are removed with "
                             f"{' '.join('~diffusion.' + k for k in unknown)}")
        return cls(**cfg)


def _expand(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample ``t`` (N,) as (N, 1, ..., 1) in ``x``'s dtype, to broadcast against ``x``."""
    return t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def path_coefficients(path: str, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(alpha_t, d alpha_t / dt, sigma_t, d sigma_t / dt)`` of ``path`` at ``t`` (any shape)."""
    if path == "linear":
        return t, torch.ones_like(t), 1 - t, -torch.ones_like(t)
    if path == "gvp":
        half_pi = math.pi / 2
        return (torch.sin(half_pi * t), half_pi * torch.cos(half_pi * t),
                torch.cos(half_pi * t), -half_pi * torch.sin(half_pi * t))
    raise ValueError(f"unknown path {path!r}; valid: {', '.join(PATHS)}")


def _coefficients(path: str, t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """:func:`path_coefficients` broadcast against ``x``, plus ``D_t = alpha' sigma - alpha sigma'``."""
    a, da, s, ds = path_coefficients(path, _expand(t, x))
    return a, da, s, ds, da * s - a * ds


def interpolate(path: str, x1: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = alpha_t x1 + sigma_t noise``: the noised input at time ``t`` (N,) (data at t = 1)."""
    a, _, s, _ = path_coefficients(path, _expand(t, x1))
    return a * x1 + s * noise


def target_velocity(path: str, x1: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The conditional velocity ``alpha'_t x1 + sigma'_t noise`` a velocity model regresses onto."""
    _, da, _, ds = path_coefficients(path, _expand(t, x1))
    return da * x1 + ds * noise


def velocity_from_prediction(path: str, prediction: str, out: torch.Tensor, xt: torch.Tensor,
                             t: torch.Tensor) -> torch.Tensor:
    """The velocity a network output means: ``out`` itself, or from noise (``(alpha' x - D eps) / alpha``, singular
    at t = 0) or score (``eps = -sigma score``, then the same)."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")
    if prediction == "velocity":
        return out
    a, da, s, _, d = _coefficients(path, t, xt)
    eps = out if prediction == "noise" else -s * out
    return (da * xt - d * eps) / a


def prediction_from_velocity(path: str, prediction: str, v: torch.Tensor, xt: torch.Tensor,
                             t: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`velocity_from_prediction`: ``eps = (alpha' x - alpha v) / D`` (defined for every t), score
    ``= -eps / sigma`` (singular at t = 1)."""
    if prediction == "velocity":
        return v
    a, da, s, _, d = _coefficients(path, t, xt)
    eps = (da * xt - a * v) / d
    if prediction == "noise":
        return eps
    if prediction == "score":
        return -eps / s
    raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")


def score_from_prediction(path: str, prediction: str, out: torch.Tensor, xt: torch.Tensor,
                          t: torch.Tensor) -> torch.Tensor:
    """``grad log p_t(x_t)`` from a network output (what the SDE sampler adds to the drift)."""
    if prediction == "score":
        return out
    v = velocity_from_prediction(path, prediction, out, xt, t)
    return prediction_from_velocity(path, "score", v, xt, t)


def time_from_uniform(tr: Transport, u: torch.Tensor) -> torch.Tensor:
    """Training times from uniforms ``u`` in [0, 1) (N,): uniform or logit-normal (through the normal quantile
    ``ndtri(u)``, so a given ``u`` always gives the same ``t``), mapped into [train_eps, 1 - train_eps]."""
    u = u.double()
    if tr.t_sampling == "logit_normal":
        u = torch.sigmoid(tr.t_mean + tr.t_std * torch.special.ndtri(u))  # ndtri(0) = -inf -> sigmoid 0
    lo, hi = tr.train_eps, 1.0 - tr.train_eps
    return (lo + (hi - lo) * u).float()


def loss_weight(tr: Transport, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor | float:
    """SiT's weight of a noise/score loss term (1 without weighting); singular at t = 0, hence ``train_eps``."""
    if tr.loss_weight == "none":
        return 1.0
    a, _, s, _, d = _coefficients(tr.path, t, xt)
    return (d / a) ** 2 if tr.loss_weight == "velocity" else d / (a * s)


def training_losses(tr: Transport, out: torch.Tensor, x1: torch.Tensor, noise: torch.Tensor,
                    t: torch.Tensor) -> torch.Tensor:
    """Per-sample (N,) flow-matching loss of a network output on ``x_t = interpolate(path, x1, noise, t)``, as SiT's
    ``Transport.training_losses``: velocity ``|out - v_target|^2``; noise ``w |out - eps|^2``; score ``w |sigma out +
    eps|^2`` (means over non-batch dimensions)."""
    if out.shape != x1.shape:
        raise ValueError(f"flow model output {tuple(out.shape)} must match the input {tuple(x1.shape)} (flow models "
                         f"predict one value per input channel: model.learn_sigma=false)")
    if tr.prediction == "velocity":
        err = out - target_velocity(tr.path, x1, noise, t)
    elif tr.prediction == "noise":
        err = out - noise
    else:
        _, _, s, _ = path_coefficients(tr.path, _expand(t, x1))
        err = s * out + noise
    sq = loss_weight(tr, x1, t) * err**2
    return sq.mean(dim=tuple(range(1, sq.ndim)))
