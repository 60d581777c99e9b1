"""What the training loop trains (the ``task`` config group): one micro-batch's loss per task, as pure functions.

- ``diffusion`` (default): the denoiser's loss, epsilon MSE plus the variational bound when the model learns
  sigma (:func:`bigdit.diffusion.training_losses`, ADM's hybrid objective).
- ``classifier``: ADM's noisy classifier for classifier guidance (guided-diffusion ``classifier_train.py`` with
  ``noised=True``): cross-entropy of the label from ``x_t = q_sample(x_0, t)`` at uniformly drawn ``t``.

Both see the same step draws (timesteps, noise, label dropout) of :class:`bigdit.train.StepDraws`, so the loop,
strategies, checkpoints and exact resume are the same for both. ``forward`` is the strategy's model under the
run's autocast; the loss itself is computed in float32.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from torch import nn

from bigdit.diffusion import Schedule, q_sample, training_losses
from bigdit.models.adm import EncoderUNetModel

#: (schedule, forward, x0, y, t, noise, drop, learn_sigma) -> mean loss of the micro-batch
TaskLoss = Callable[..., torch.Tensor]


def diffusion_loss(schedule: Schedule, forward: Callable[..., torch.Tensor], x0: torch.Tensor, y: torch.Tensor,
                   t: torch.Tensor, noise: torch.Tensor, drop: torch.Tensor, learn_sigma: bool) -> torch.Tensor:
    """The denoiser's loss on ``x_t``; the labels in ``drop`` go to the model's null label (for guidance)."""
    xt = q_sample(schedule, x0, t, noise)
    out = forward(xt, t, y, force_drop_ids=drop)
    return training_losses(schedule, out.float(), x0, xt, t, noise, learn_sigma)["loss"].mean()


def classifier_loss(schedule: Schedule, forward: Callable[..., torch.Tensor], x0: torch.Tensor, y: torch.Tensor,
                    t: torch.Tensor, noise: torch.Tensor, drop: torch.Tensor, learn_sigma: bool) -> torch.Tensor:
    """The noisy classifier's cross-entropy of ``y`` from ``forward(x_t, t)`` logits (no label dropout)."""
    logits = forward(q_sample(schedule, x0, t, noise), t)
    return F.cross_entropy(logits.float(), y)


TASKS: dict[str, TaskLoss] = {"diffusion": diffusion_loss, "classifier": classifier_loss}


def check_task_matches_model(name: str, model: nn.Module) -> None:
    """ValueError, before any step, when ``model`` cannot be trained for task ``name``: a classifier (logits from
    ``model(x_t, t)``) for ``classifier``, a denoiser for ``diffusion``."""
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
