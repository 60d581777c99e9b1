"""What the training loop trains (the ``task`` config group): one micro-batch's loss per task, as pure functions.

- ``diffusion`` (default): the denoiser's loss of the run's diffusion kind (:mod:`bigdit.diffusion.objective`:
  epsilon MSE plus the variational bound when the model learns sigma, ADM's hybrid objective, or SiT's flow loss).
- ``classifier``: ADM's noisy classifier for classifier guidance (guided-diffusion ``classifier_train.py`` with
  ``noised=True``): cross-entropy of the label from ``x_t = q_sample(x_0, t)`` at uniformly drawn ``t``.

Both see the same per-sample draws (time, noise, label dropout) of :func:`bigdit.train.draw_samples`, so the loop,
strategies, checkpoints and exact resume are the same for both. ``forward`` is the strategy's model under the
run's autocast; the loss itself is computed in float32.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bigdit.diffusion.objective import Objective
from bigdit.diffusion.transport import Transport
from bigdit.models.adm import EncoderUNetModel

#: (objective, forward, x0, y, t, noise, drop) -> mean loss of the micro-batch
TaskLoss = Callable[..., torch.Tensor]


def diffusion_loss(objective: Objective, forward: Callable[..., torch.Tensor], x0: torch.Tensor, y: torch.Tensor,
                   t: torch.Tensor, noise: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """The denoiser's loss on ``x_t``; the labels in ``drop`` go to the model's null label (for guidance)."""
    xt = objective.noised(x0, t, noise)
    out = forward(xt, t, y, force_drop_ids=drop)
    return objective.loss(out.float(), x0, xt, t, noise).mean()


def classifier_loss(objective: Objective, forward: Callable[..., torch.Tensor], x0: torch.Tensor, y: torch.Tensor,
                    t: torch.Tensor, noise: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """The noisy classifier's cross-entropy of ``y`` from ``forward(x_t, t)`` logits (no label dropout)."""
    logits = forward(objective.noised(x0, t, noise), t)
    return F.cross_entropy(logits.float(), y)


TASKS: dict[str, TaskLoss] = {"diffusion": diffusion_loss, "classifier": classifier_loss}


def check_task_matches_model(name: str, model: nn.Module, objective: Objective) -> None:
    """ValueError, before any step, when ``model`` cannot be trained for task ``name``: a classifier (logits from
    ``model(x_t, t)``, for Gaussian diffusion: ADM's classifier guidance) for ``classifier``, a denoiser for
    ``diffusion``."""
    if name == "classifier" and isinstance(objective.diffusion, Transport):
        raise ValueError("task=classifier trains ADM's noisy classifier for guiding a Gaussian diffusion (DDPM/DDIM); "
                         "it is not defined for diffusion=flow: use diffusion=gaussian")
    is_classifier = isinstance(model, EncoderUNetModel)
    if name == "classifier" and not is_classifier:
        raise ValueError(f"task=classifier trains a noisy classifier, but {type(model).__name__} is a denoiser: use "
                         f"model=adm_classifier (ADM-classifier-64/128/256/512) or experiment=adm_classifier_in64")
    if name == "diffusion" and is_classifier:
        raise ValueError(f"{type(model).__name__} is ADM's noisy classifier: train it with task=classifier")


def task_loss(name: str) -> TaskLoss:
    """The loss of ``task.name``; ValueError naming the valid tasks."""
    if name not in TASKS:
        raise ValueError(f"unknown task.name={name!r}; valid: {', '.join(TASKS)} (task=diffusion | task=classifier)")
    return TASKS[name]
