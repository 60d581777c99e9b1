"""Post-hoc EMA snapshots (``ema=phema``): writing them during training, reconstructing an EMA from them offline.

Every ``ema.snapshot_every`` images the training loop calls :meth:`Snapshots.maybe_write`: every power EMA of
:class:`bigdit.ema.PowerEMA` is written in float16 to ``<run.dir>/phema/step-<step>/sigma-<sigma_rel>/`` through
the strategy's own EMA format (:meth:`bigdit.engine.base.Strategy.save_ema`: rank 0's full tensors under DDP and
ZeRO-1/2, every rank's DCP shards under FSDP2, every rank's partition file under ZeRO-3), beside
``snapshot.json`` (step, images seen, sigma_rels, exponents) and ``strategy.json`` (the layout). A snapshot
directory is written under a temporary name and renamed when whole; a rerun that resumes from an earlier
checkpoint finds the snapshots it already wrote and skips them (the resumed trajectory is the same, exactly).

Offline, the strategy that wrote a snapshot consolidates it in one process without a process group
(``Strategy.consolidate``, as ``tools/export.py`` does for checkpoints), and :func:`reconstruct` combines all
snapshots up to a step with the least-squares coefficients of :func:`bigdit.phema.solve_coefficients`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bigdit.checkpoint import STRATEGY_FILE, save_ema_subdir, step_tag, write_dir_collective
from bigdit.ema import PowerEMA
from bigdit.engine import Strategy, strategy_class
from bigdit.engine.base import full_numel
from bigdit.phema import sigma_rel_to_gamma, solve_coefficients

SNAPSHOT_ROOT = "phema"
SNAPSHOT_FILE = "snapshot.json"
SNAPSHOT_DTYPE = torch.float16


def check_snapshot_every(ema_cfg: Any, global_batch: int) -> None:
    """Refuse an ``ema.snapshot_every`` that is not a positive multiple of ``run.global_batch`` (before any work):
    snapshots are taken at step boundaries, at exactly the images named."""
    if ema_cfg.get("name", "ema") != "phema":
        return
    every = int(ema_cfg["snapshot_every"])
    if every <= 0 or every % global_batch:
        raise ValueError(f"ema.snapshot_every={every} (images) must be a positive multiple of run.global_batch="
                         f"{global_batch}, e.g. {max(1, round(every / global_batch)) * global_batch}")


@dataclass(frozen=True)
class Snapshot:
    """One snapshot directory: when it was taken and the power EMAs it holds."""

    path: Path
    step: int
    nimg: int
    sigma_rels: tuple[float, ...]
    strategy: str

    def weights(self, sigma_rel: float, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
        """The full (consolidated) weights of the power EMA ``sigma_rel``, in one process."""
        return strategy_class(self.strategy).consolidate(self.path / PowerEMA.tag(sigma_rel), shapes, "ema")


def list_snapshots(run_dir: str | Path) -> list[Snapshot]:
    """The finished snapshots of a run, by step (temporary directories of interrupted writes are skipped)."""
    root = Path(run_dir) / SNAPSHOT_ROOT
    out = []
    for path in sorted(root.glob("step-*")) if root.is_dir() else []:
        if not (path / SNAPSHOT_FILE).is_file():
            continue
        meta = json.loads((path / SNAPSHOT_FILE).read_text())
        strategy = json.loads((path / STRATEGY_FILE).read_text())["name"]
        out.append(Snapshot(path, int(meta["step"]), int(meta["nimg"]), tuple(meta["sigma_rels"]), strategy))
    return out


class Snapshots:
    """Writes the power EMAs' snapshots of a training run (collective: every rank calls :meth:`maybe_write`)."""

    def __init__(self, run_dir: str | Path, strategy: Strategy, ema: PowerEMA, every_nimg: int, global_batch: int,
                 total_steps: int):
        check_snapshot_every({"name": "phema", "snapshot_every": every_nimg}, global_batch)
        self.root = Path(run_dir) / SNAPSHOT_ROOT
        self.strategy, self.ema, self.every_nimg = strategy, ema, int(every_nimg)
        done = list_snapshots(run_dir)
        if done and list(done[-1].sigma_rels) != ema.sigma_rels:
            raise ValueError(f"{self.root} holds snapshots of sigma_rels {list(done[-1].sigma_rels)} but this run asks "
                             f"for ema.sigma_rels={ema.sigma_rels}: use the original ones or a new run.dir")
        if strategy.is_main:
            numel = sum(full_numel(p) for p in strategy.module.parameters())
            each = numel * SNAPSHOT_DTYPE.itemsize * len(ema.sigma_rels)
            count = total_steps * global_batch // self.every_nimg
            print(f"phema: {len(ema.sigma_rels)} power EMAs (sigma_rel {', '.join(map(str, ema.sigma_rels))}), a "
                  f"float16 snapshot every {self.every_nimg:,} images ({self.every_nimg // global_batch} steps): "
                  f"{each / 2**20:.1f} MiB each, {count} over the run = {count * each / 2**20:,.1f} MiB in {self.root}"
                  f" ({len(done)} there already)", flush=True)

    def maybe_write(self, step: int, nimg: int) -> Path | None:
        """Write the snapshot of ``step`` when ``nimg`` (images seen after it) is a multiple of ``snapshot_every``
        and it is not on disk yet; returns its directory when one is due."""
        if nimg % self.every_nimg:
            return None
        final = self.root / step_tag(step)
        if (final / SNAPSHOT_FILE).is_file():  # written before an interruption: the resumed run computes the same
            return final
        meta = {"step": step, "nimg": nimg, "sigma_rels": self.ema.sigma_rels, "gammas": self.ema.gammas,
                "dtype": str(SNAPSHOT_DTYPE).removeprefix("torch.")}

        def write(tmp: Path) -> None:
            for sigma_rel, state in self.ema.all_states().items():
                half = {name: t.to(SNAPSHOT_DTYPE) for name, t in state.items()}
                save_ema_subdir(self.strategy, tmp / PowerEMA.tag(sigma_rel), half)
            if self.strategy.is_main:
                (tmp / SNAPSHOT_FILE).write_text(json.dumps(meta, indent=1) + "\n")

        write_dir_collective(self.strategy, final, write)
        self.strategy.barrier()
        return final


@dataclass
class Reconstruction:
    """A post-hoc EMA: its weights, and which snapshots went into it with what coefficients."""

    weights: dict[str, torch.Tensor]
    sigma_rel: float
    step: int
    nimg: int
    #: (snapshot step, snapshot sigma_rel, coefficient) of every input
    terms: list[tuple[int, float, float]]


def snapshots_until(run_dir: str | Path, step: int | None = None) -> list[Snapshot]:
    """The snapshots a reconstruction at ``step`` (a snapshot's step; None = the last one) combines: all up to it."""
    snaps = list_snapshots(run_dir)
    if not snaps:
        raise FileNotFoundError(f"no post-hoc EMA snapshots in {Path(run_dir) / SNAPSHOT_ROOT}: train with ema=phema")
    if step is None:
        step = snaps[-1].step
    if step not in {s.step for s in snaps}:
        raise ValueError(f"step={step} has no snapshot; snapshot steps: {[s.step for s in snaps]}")
    return [s for s in snaps if s.step <= step]


def coefficients(snaps: list[Snapshot], sigma_rel: float) -> list[tuple[Snapshot, float, float]]:
    """(snapshot, its power EMA's sigma_rel, coefficient) for the EMA of width ``sigma_rel`` at the last snapshot."""
    inputs = [(s, sr) for s in snaps for sr in s.sigma_rels]
    x = solve_coefficients([s.step for s, _ in inputs], [sigma_rel_to_gamma(sr) for _, sr in inputs],
                           snaps[-1].step, sigma_rel_to_gamma(sigma_rel))
    return [(s, sr, float(c)) for (s, sr), c in zip(inputs, x)]


def reconstruct(run_dir: str | Path, shapes: dict[str, torch.Size], sigma_rel: float,
                step: int | None = None) -> Reconstruction:
    """The EMA of relative width ``sigma_rel`` at ``step`` (None: the last snapshot's), as full fp32 weights:
    the least-squares combination of every power EMA of every snapshot up to ``step``. Reads one snapshot at
    a time (memory: two copies of the model)."""
    snaps = snapshots_until(run_dir, step)
    terms = coefficients(snaps, sigma_rel)
    weights = {n: torch.zeros(shape, dtype=torch.float32) for n, shape in shapes.items()}
    for snap, sr, c in terms:
        part = snap.weights(sr, shapes)
        for name, total in weights.items():
            total.add_(part[name].float().reshape(shapes[name]), alpha=c)
    return Reconstruction(weights, float(sigma_rel), snaps[-1].step, snaps[-1].nimg,
                          [(s.step, sr, c) for s, sr, c in terms])
