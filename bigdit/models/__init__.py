"""Model registry: named sizes from each model file, one builder, one checkpoint reader."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bigdit.models.adm import ADM_models
from bigdit.models.dit import DiT_models
from bigdit.models.udit import UDiT_models
from bigdit.models.uvit import UViT_models

#: Every registered backbone size, e.g. ``MODELS["DiT-XL/2"](input_size=32)``.
MODELS = {**DiT_models, **UDiT_models, **UViT_models, **ADM_models}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name``; ``kwargs`` override its constructor arguments.

    Common kwargs: ``input_size`` (latent side), ``in_channels``, ``num_classes``, ``learn_sigma``,
    ``class_dropout_prob``. Raises ``KeyError`` naming the valid sizes for an unknown ``name``.
    """
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(sorted(MODELS))}")
    try:
        return MODELS[name](**kwargs)
    except TypeError as e:
        raise TypeError(f"{name}: {e}") from e


def extract_state_dict(obj: Mapping[str, Any], prefer: str = "ema") -> dict[str, torch.Tensor]:
    """Return model weights from a plain state dict or a training checkpoint with ``model``/``ema`` entries.

    ``prefer`` picks ``"ema"`` (default, what DiT samples from) or ``"model"`` when both are present.
    """
    if prefer not in ("ema", "model"):
        raise ValueError(f"prefer must be 'ema' or 'model', got {prefer!r}")
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    for key in (prefer, "model" if prefer == "ema" else "ema"):
        if isinstance(obj.get(key), Mapping):
            return dict(obj[key])
    raise ValueError(
        f"not a model checkpoint: expected a state dict of tensors or 'model'/'ema' entries, got keys {sorted(obj)[:8]}"
    )


def load_weights(model: nn.Module, source: str | Path | Mapping[str, Any], prefer: str = "ema") -> nn.Module:
    """Load a checkpoint file (``.pt``/``.safetensors``) or mapping into ``model`` with ``strict=True``."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            source = load_file(path)
        else:
            source = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(extract_state_dict(source, prefer), strict=True)
    return model


__all__ = ["MODELS", "build_model", "extract_state_dict", "load_weights"]
