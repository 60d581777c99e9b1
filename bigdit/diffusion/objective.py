"""The training objective of a diffusion kind (``cfg.diffusion``), as the training loop uses it.

One object per kind answers the loop's three questions for a micro-batch: the network's time input from a
uniform draw ``u`` in [0, 1) per sample (:meth:`time`), the noised input (:meth:`noised`) and the per-sample
loss of the network's output (:meth:`loss`). ``diffusion`` is what the samplers need (a :class:`Schedule` or a
:class:`Transport`). ``diffusion.kind`` picks the kind: ``flow`` (configs/diffusion/flow.yaml), else Gaussian
(configs/diffusion/gaussian.yaml, which has no ``kind`` key, like every run written before flow existed).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from bigdit.diffusion import transport
from bigdit.diffusion.gaussian import Schedule, make_schedule, q_sample, timesteps_from_uniform, training_losses
from bigdit.diffusion.transport import Transport

DIFFUSION_KINDS = ("gaussian", "flow")


def diffusion_kind(diffusion_cfg: Mapping | None) -> str:
    """``gaussian`` or ``flow`` from a run's ``diffusion`` section (no ``kind`` key, or none at all: gaussian)."""
    kind = (diffusion_cfg or {}).get("kind", "gaussian")
    if kind not in DIFFUSION_KINDS:
        raise ValueError(f"unknown diffusion.kind={kind!r}; valid: {', '.join(DIFFUSION_KINDS)}")
    return kind


def build_diffusion(diffusion_cfg: Mapping | None) -> Schedule | Transport:
    """The sampling-side description of ``cfg.diffusion``: a Gaussian :class:`Schedule` or a flow :class:`Transport`
    (``None``: DiT's default schedule)."""
    cfg = dict(diffusion_cfg or {})
    if diffusion_kind(cfg) == "flow":
        return Transport.from_config(cfg)
    cfg.pop("kind", None)
    return make_schedule(**cfg)


class Objective(Protocol):
    """What the training loop needs from a diffusion kind (see the module docstring)."""

    diffusion: Schedule | Transport

    def time(self, u: torch.Tensor) -> torch.Tensor: ...

    def noised(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor: ...

    def loss(self, out: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
             noise: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class GaussianObjective:
    """DDPM (ADM/DiT): integer ``t = floor(u T)``, ``q_sample``, epsilon MSE (+ the VB term with learned sigma)."""

    diffusion: Schedule
    learn_sigma: bool

    def time(self, u: torch.Tensor) -> torch.Tensor:
        return timesteps_from_uniform(u, self.diffusion.num_timesteps)

    def noised(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return q_sample(self.diffusion, x0, t, noise)

    def loss(self, out, x0, xt, t, noise) -> torch.Tensor:
        return training_losses(self.diffusion, out, x0, xt, t, noise, self.learn_sigma)["loss"]


@dataclass(frozen=True)
class FlowObjective:
    """Flow matching (SiT): float ``t`` in [0, 1] (data at 1), ``x_t = alpha_t x0 + sigma_t noise``, SiT's loss."""

    diffusion: Transport

    def time(self, u: torch.Tensor) -> torch.Tensor:
        return transport.time_from_uniform(self.diffusion, u)

    def noised(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return transport.interpolate(self.diffusion.path, x0, noise, t)

    def loss(self, out, x0, xt, t, noise) -> torch.Tensor:
        return transport.training_losses(self.diffusion, out, x0, noise, t)


def build_objective(diffusion_cfg: Mapping, learn_sigma: bool) -> GaussianObjective | FlowObjective:
    """The objective of ``cfg.diffusion`` for a model with ``learn_sigma``; a flow model that learns sigma is refused
    (before any compute: nothing would train its variance channels)."""
    diffusion = build_diffusion(diffusion_cfg)
    if isinstance(diffusion, Transport):
        if learn_sigma:
            raise ValueError("diffusion=flow trains a model without a learned variance: set model.learn_sigma=false")
        return FlowObjective(diffusion)
    return GaussianObjective(diffusion, bool(learn_sigma))
