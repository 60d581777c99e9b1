"""REPA, representation alignment (Yu et al., 2025): the projector, the hidden-state tap and the alignment loss.

A projector MLP (REPA's ``build_mlp``: Linear -> SiLU -> Linear -> SiLU -> Linear, width ``repa.projector_dim``)
maps the hidden state after block ``repa.depth`` (8 of 28 for XL) to the encoder's feature width; the loss is
the negative cosine similarity per patch to the stored encoder features (:mod:`bigdit.repa_features`), averaged
over patches and samples, added to the diffusion loss with weight ``repa.coeff`` (0.5) until ``repa.stop_step``.

The projector is a submodule of the trained model (:data:`PROJECTOR`), so every strategy shards, optimizes,
averages and checkpoints it with the rest; :func:`bigdit.export.consolidated_weights` drops it, so exports and
sampling see the bare model. The hidden state comes from a forward hook registered here on the model's block
(:class:`HiddenTap`), which also runs the projector inside the model's forward: no second forward, no change
to the model file, and the projector runs where every strategy has the model's parameters gathered.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bigdit.models.dit import DiT

#: the attribute (and state-dict prefix) of the projector in the trained model
PROJECTOR = "repa_projector"


def build_projector(hidden_size: int, projector_dim: int, feature_dim: int) -> nn.Sequential:
    """REPA's projector: three linear layers with SiLU between them, initialised as REPA's (xavier-uniform
    weights, zero biases, from the SiT initialisation that covers it)."""
    mlp = nn.Sequential(nn.Linear(hidden_size, projector_dim), nn.SiLU(), nn.Linear(projector_dim, projector_dim),
                        nn.SiLU(), nn.Linear(projector_dim, feature_dim))
    for layer in mlp:
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
    return mlp


def alignment_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """REPA's loss per sample: minus the cosine similarity of each patch's projected hidden state (N, P, D) to
    its encoder feature (N, P, D), averaged over the P patches; -1 where they are aligned, 0 when orthogonal."""
    if projected.shape != target.shape:
        raise ValueError(f"projected hidden states {tuple(projected.shape)} and encoder features "
                         f"{tuple(target.shape)} differ in shape")
    return -(F.normalize(projected, dim=-1) * F.normalize(target, dim=-1)).sum(-1).mean(-1)


def alignment_weight(step: int, coeff: float, stop_step: int | None) -> float:
    """The weight of the alignment loss at optimizer step ``step``: ``coeff`` before ``stop_step``, 0 from it."""
    return float(coeff) if stop_step is None or step < int(stop_step) else 0.0


def repa_enabled(cfg: Any) -> bool:
    """Whether a training config (its ``repa`` section, absent in runs from before REPA) asks for REPA."""
    return bool(cfg.get("repa", {}).get("enabled", False))


def check_repa_model(model: nn.Module, depth: int) -> None:
    """Refuse a model REPA cannot tap: only DiT's plain token sequence is aligned patch for patch."""
    if not isinstance(model, DiT):
        raise ValueError(f"REPA supports DiT (one token per latent patch through every block); "
                         f"{type(model).__name__} (U-DiT's downsampled stages, U-ViT's extra tokens and skips) is "
                         f"not supported: use model=dit or repa=none")
    if not 1 <= depth <= len(model.blocks):
        raise ValueError(f"repa.depth={depth} must name one of the model's blocks 1..{len(model.blocks)}")


def check_repa_data(repa_cfg: Any, record: dict[str, Any] | None, model: nn.Module, data_name: str) -> None:
    """Fail before any compute when the shards' REPA features (``record``, from their manifest) cannot be the
    targets of this run: missing, from another encoder, of another width, or on another token grid."""
    if record is None:
        raise ValueError(f"REPA needs its features in the shards, but {data_name} has none: encode the images "
                         f"with tools/encode_latents.py repa_encoder={repa_cfg.encoder} and train with data=wds "
                         f"or data=mds on its output (or repa=none)")
    if str(record["encoder"]) != str(repa_cfg.encoder):
        raise ValueError(f"the shards hold features of repa_encoder={record['encoder']} but repa.encoder="
                         f"{repa_cfg.encoder}: set repa.encoder={record['encoder']} or re-encode with "
                         f"repa_encoder={repa_cfg.encoder}")
    if int(record["dim"]) != int(repa_cfg.feature_dim):
        raise ValueError(f"the shards hold {record['dim']}-d REPA features but repa.feature_dim="
                         f"{repa_cfg.feature_dim}: set repa.feature_dim={record['dim']}")
    tokens = (model.input_size // model.patch_size) ** 2
    if int(record["tokens"]) != tokens:
        raise ValueError(f"the shards hold {record['tokens']} REPA feature patches per image but the model has "
                         f"{tokens} tokens ({model.input_size}/{model.patch_size} squared): re-encode with a "
                         f"repa_input_size of {int(tokens ** 0.5)} encoder patches a side")


def attach_projector(model: nn.Module, repa_cfg: Any) -> nn.Module:
    """Add REPA's projector to ``model`` as :data:`PROJECTOR` (before any strategy wraps it); returns ``model``."""
    check_repa_model(model, int(repa_cfg.depth))
    model.add_module(PROJECTOR, build_projector(model.hidden_size, int(repa_cfg.projector_dim),
                                                int(repa_cfg.feature_dim)))
    return model


class HiddenTap:
    """The projected hidden state after block ``depth`` of a model carrying :data:`PROJECTOR`, captured by a
    forward hook inside the model's forward, while :meth:`capture` is open (not while sampling or evaluating).

    The hook sits on the block module (outside its forward), so activation checkpointing's recomputation in
    backward does not run it again.
    """

    def __init__(self, model: nn.Module, depth: int):
        self.projector = getattr(model, PROJECTOR)
        self.projected: torch.Tensor | None = None
        self._capturing = False
        model.repeated_blocks()[depth - 1].register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        if self._capturing:
            self.projected = self.projector(output)

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Capture during the forwards of this block."""
        self._capturing, self.projected = True, None
        try:
            yield
        finally:
            self._capturing = False

    def take(self) -> torch.Tensor:
        """The projected hidden state (N, tokens, feature_dim) of the last captured forward."""
        if self.projected is None:
            raise RuntimeError("no hidden state was captured: call the model inside HiddenTap.capture()")
        out, self.projected = self.projected, None
        return out
