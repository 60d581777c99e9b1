"""Moving averages of the weights, kept in fp32 next to whatever tensors the strategy owns.

An EMA tracks the tensors handed to it (the full parameters under DDP; a rank's own shard under
sharding strategies), so it never needs the full model gathered to be updated. Two kinds, one interface
(``update``, ``swapped_into``, ``state_dict``/``load_state_dict``, ``extra_states``), picked by ``ema.name``
(:func:`build_ema`): ``ema``, the classic constant-decay EMA, and ``phema``, EDM2's power-function EMAs whose
snapshots :mod:`bigdit.snapshots` writes for post-hoc reconstruction (``tools/phema.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from bigdit.phema import power_beta, sigma_rel_to_gamma


class EMA:
    """fp32 shadow copies of named tensors, updated as ``ema <- decay * ema + (1 - decay) * value``."""

    def __init__(self, named_tensors: list[tuple[str, torch.Tensor]], decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema.decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.names = [name for name, _ in named_tensors]
        # Starts equal to the weights (DiT copies the model into the EMA before training).
        self.shadow = [t.detach().float().clone() for _, t in named_tensors]

    @torch.no_grad()
    def update(self, tensors: list[torch.Tensor], steps_done: int | None = None) -> None:
        """One EMA step towards ``tensors`` (same order as at construction); ``steps_done`` (the optimizer steps
        taken, this one included) is for the interface: a constant decay does not depend on it."""
        values = [t.detach().float() for t in tensors]
        torch._foreach_lerp_(self.shadow, values, 1.0 - self.decay)

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_into(self, tensors: list[torch.Tensor]) -> Iterator[None]:
        """Within the block the live ``tensors`` (same order as at construction: the strategy's own shards,
        which its forward uses) hold the EMA weights; afterwards they hold exactly what they held before.

        Same-dtype tensors (fp32 weights, the default) are swapped with the shadows one tensor at a time, so
        no copy of the model is made; bf16 compute weights keep a bf16 backup instead (a swap through bf16 would
        round the fp32 EMA). Exact both ways: evaluation never changes the training trajectory.
        """
        def swap(t: torch.Tensor, e: torch.Tensor) -> None:
            tmp = t.clone()
            t.copy_(e)
            e.copy_(tmp)

        backups = []
        for t, e in zip(tensors, self.shadow):
            backups.append(None if t.dtype == e.dtype else t.clone())
            if backups[-1] is None:
                swap(t, e)
            else:
                t.copy_(e)
        try:
            yield
        finally:
            for t, e, backup in zip(tensors, self.shadow, backups):
                if backup is None:
                    swap(t, e)
                else:
                    t.copy_(backup)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadows by parameter name (the strategy's own tensors: shards where it shards)."""
        return dict(zip(self.names, self.shadow))

    def extra_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """Further averages a checkpoint must keep beside :meth:`state_dict` for an exact resume: none here."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor],
                        extra: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
        """Restore :meth:`state_dict` (and :meth:`extra_states`, which is empty for this kind)."""
        missing = set(self.names) ^ set(state)
        if missing:
            raise KeyError(f"EMA state does not match the model; differing keys: {sorted(missing)[:8]}")
        for name, shadow in zip(self.names, self.shadow):
            shadow.copy_(state[name])


class PowerEMA:
    """EDM2's power-function EMAs, one per ``sigma_rel`` (fp32 shadows of the same tensors as :class:`EMA`).

    The EMA of width ``sample_sigma_rel`` is the one the run samples, evaluates and exports with
    (:meth:`state_dict` and :meth:`swapped_into`: what a checkpoint's EMA slot holds, so every tool reads it
    unchanged); the others are :meth:`extra_states`, kept in the checkpoint too, so a resume is exact.
    """

    def __init__(self, named_tensors: list[tuple[str, torch.Tensor]], sigma_rels: Sequence[float],
                 sample_sigma_rel: float):
        self.sigma_rels = [float(s) for s in sigma_rels]
        if not self.sigma_rels or len(set(self.sigma_rels)) != len(self.sigma_rels):
            raise ValueError(f"ema.sigma_rels={list(sigma_rels)} must be distinct, at least one (EDM2: [0.05, 0.10])")
        if float(sample_sigma_rel) not in self.sigma_rels:
            raise ValueError(f"ema.sample_sigma_rel={sample_sigma_rel} must be one of ema.sigma_rels={self.sigma_rels}")
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.sample_index = self.sigma_rels.index(float(sample_sigma_rel))
        # Each average is a constant-decay EMA whose decay is set before every update: one swap and state code.
        self.averages = [EMA(named_tensors, 0.0) for _ in self.sigma_rels]

    @staticmethod
    def tag(sigma_rel: float) -> str:
        """The directory name of one average in checkpoints and snapshots, e.g. ``sigma-0.050``."""
        return f"sigma-{sigma_rel:.3f}"

    @torch.no_grad()
    def update(self, tensors: list[torch.Tensor], steps_done: int | None = None) -> None:
        """Update every average after optimizer step ``steps_done`` (1-based: the steps taken, this one included)."""
        if steps_done is None:
            raise ValueError("PowerEMA.update needs steps_done (the power profile depends on the time)")
        for gamma, average in zip(self.gammas, self.averages):
            average.decay = power_beta(gamma, steps_done)
            average.update(tensors)

    def swapped_into(self, tensors: list[torch.Tensor]) -> contextlib.AbstractContextManager[None]:
        """The sampling average swapped into the live ``tensors`` (see :meth:`EMA.swapped_into`)."""
        return self.averages[self.sample_index].swapped_into(tensors)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The sampling average by parameter name."""
        return self.averages[self.sample_index].state_dict()

    def extra_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """The other averages, by :meth:`tag`."""
        return {self.tag(s): a.state_dict() for i, (s, a) in enumerate(zip(self.sigma_rels, self.averages))
                if i != self.sample_index}

    def all_states(self) -> dict[float, dict[str, torch.Tensor]]:
        """Every average by its sigma_rel (what a snapshot holds)."""
        return {s: a.state_dict() for s, a in zip(self.sigma_rels, self.averages)}

    def load_state_dict(self, state: dict[str, torch.Tensor],
                        extra: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
        """Restore the sampling average from ``state`` and the others from ``extra`` (by :meth:`tag`)."""
        extra = extra or {}
        for i, (sigma_rel, average) in enumerate(zip(self.sigma_rels, self.averages)):
            if i == self.sample_index:
                average.load_state_dict(state)
            elif self.tag(sigma_rel) in extra:
                average.load_state_dict(extra[self.tag(sigma_rel)])
            else:
                raise KeyError(f"the checkpoint holds no power EMA {self.tag(sigma_rel)} (it has {sorted(extra)}): "
                               f"it was trained with other ema settings; resume with those or use a new run.dir")


def build_ema(ema_cfg: Any, named_tensors: list[tuple[str, torch.Tensor]]) -> EMA | PowerEMA:
    """The EMA ``ema_cfg`` (the ``ema`` config group) names: ``ema`` (``decay``) or ``phema`` (``sigma_rels``,
    ``sample_sigma_rel``)."""
    name = ema_cfg.get("name", "ema")
    if name == "ema":
        return EMA(named_tensors, float(ema_cfg.decay))
    if name == "phema":
        return PowerEMA(named_tensors, list(ema_cfg.sigma_rels), float(ema_cfg.sample_sigma_rel))
    raise ValueError(f"unknown ema.name={name!r}; valid: ema, phema (ema=ema | ema=phema)")
