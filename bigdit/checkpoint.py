"""Atomic, rotating training checkpoints under ``<run.dir>/checkpoints`` with a ``latest`` pointer.

Each checkpoint is written into a temporary directory by every rank that holds state, renamed into
place by rank 0 only when complete, and only then is ``latest`` switched (``os.replace`` of a small
file). A crash at any moment leaves the previous checkpoint and pointer intact.

What a checkpoint holds is the strategy's format (see ``bigdit.engine``); beside it rank 0 writes
``strategy.json``, the strategy's :meth:`~bigdit.engine.base.Strategy.checkpoint_meta` (its ``name`` and
layout, e.g. ``{"name": "deepspeed", "world_size": 8, "precision": "bf16", "zero_stage": 3}``), so that
tools reading the checkpoint later ask the strategy that wrote it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bigdit.engine.base import Strategy
from bigdit.fsio import write_atomic, write_json_atomic

LATEST = "latest"
STRATEGY_FILE = "strategy.json"

# Checkpoints written before strategy.json: the file or folder that tells each strategy's layout apart.
_LEGACY_MARKERS = (("state.pt", "ddp"), (".metadata", "fsdp2"), ("deepspeed", "deepspeed"))


def step_tag(step: int) -> str:
    """Directory name of the checkpoint taken after ``step`` optimizer steps."""
    return f"step-{step:09d}"


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint ``latest`` points to, or None when there is none yet."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    if not path.is_dir():
        raise FileNotFoundError(f"{pointer} points to {path.name}, which does not exist; fix or delete {pointer}")
    return path


def checkpoint_strategy(path: Path) -> dict[str, Any]:
    """What checkpoint directory ``path`` records about the strategy that wrote it (``strategy.json``);
    for checkpoints older than that file, just the ``name``, told from the files it holds."""
    path = Path(path)
    if (path / STRATEGY_FILE).is_file():
        return json.loads((path / STRATEGY_FILE).read_text())
    for marker, name in _LEGACY_MARKERS:
        if (path / marker).exists():
            return {"name": name}
    raise FileNotFoundError(f"{path} is not a bigdit checkpoint (no {STRATEGY_FILE}, state.pt, DCP .metadata "
                            f"or deepspeed/)")


def write_dir_collective(strategy: Strategy, final: Path, write: Callable[[Path], None]) -> None:
    """Collective: every rank calls ``write(tmp)`` into a fresh temporary directory beside ``final``; when all are
    done, rank 0 adds ``strategy.json`` and renames it to ``final`` (replacing an older one). A crash at any moment
    leaves ``final`` whole or absent. The caller synchronises afterwards. (The post-hoc EMA snapshots'; a
    :class:`Checkpointer` does the same with its ``latest`` pointer and rotation.)"""
    tmp = final.parent / f".tmp-{final.name}"
    if strategy.is_main:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save
        tmp.mkdir()
    strategy.barrier()
    write(tmp)
    strategy.barrier()
    if strategy.is_main:
        write_json_atomic(tmp / STRATEGY_FILE, strategy.checkpoint_meta(), indent=2)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)


def save_ema_subdir(strategy: Strategy, directory: Path, ema: dict[str, Any]) -> None:
    """Collective: ``strategy.save_ema`` into the new sub-directory ``directory`` (made by rank 0)."""
    if strategy.is_main:
        directory.mkdir()
    strategy.barrier()
    strategy.save_ema(directory, ema)


class Checkpointer:
    """Saves and restores the strategy's state plus ``extra`` (EMA, counters, config), keeping the last K."""

    def __init__(self, root: Path, strategy: Strategy, keep: int = 3):
        if keep < 1:
            raise ValueError(f"run.keep_ckpts must be >= 1, got {keep}")
        self.root = Path(root)
        self.strategy = strategy
        self.keep = keep

    def save(self, step: int, extra: dict[str, Any], ema: dict[str, Any],
             extra_emas: dict[str, dict[str, Any]] | None = None) -> Path:
        """Collective: every rank calls it at the same step with its own EMA tensors (and those of the further
        averages, ``EMA.extra_states``, each written by the strategy into the sub-directory of its name)."""
        tag = step_tag(step)
        final, tmp = self.root / tag, self.root / f".tmp-{tag}"
        if self.strategy.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save
            tmp.mkdir()
        self.strategy.barrier()
        self.strategy.save(tmp, extra, ema)
        for name, state in (extra_emas or {}).items():
            save_ema_subdir(self.strategy, tmp / name, state)
        self.strategy.barrier()
        if self.strategy.is_main:
            write_json_atomic(tmp / STRATEGY_FILE, self.strategy.checkpoint_meta(), indent=2)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_atomic(self.root / LATEST, tag + "\n")
            self._prune(keep_tag=tag)
        self.strategy.barrier()
        return final

    def _prune(self, keep_tag: str) -> None:
        tags = sorted(p.name for p in self.root.glob("step-*") if p.is_dir())
        for tag in tags[: -self.keep]:
            if tag != keep_tag:
                shutil.rmtree(self.root / tag, ignore_errors=True)

    def load_latest(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """Restore the latest checkpoint into the strategy; return ``(extra, ema)``, or None if there is none."""
        path = latest_checkpoint(self.root)
        if path is None:
            return None
        saved, now = checkpoint_strategy(path), self.strategy.checkpoint_meta()
        changed = {k: (saved.get(k), now[k]) for k in self.strategy.resume_keys if saved.get(k, now[k]) != now[k]}
        if changed:
            was = " ".join(f"{k}={old}" for k, (old, _) in changed.items())
            asked = " ".join(f"{k}={new}" for k, (_, new) in changed.items())
            raise ValueError(f"{path} was written by strategy {was} but this run asks for {asked}: a checkpoint "
                             f"resumes only under the strategy layout that wrote it; use the original strategy keys "
                             f"or a new run.dir (tools/export.py converts any checkpoint to plain weights)")
        return self.strategy.load(path)

    def load_extra_emas(self, names: list[str]) -> dict[str, dict[str, Any]]:
        """This rank's tensors of the further averages ``names`` that the latest checkpoint holds (resharded by
        the strategy); absent ones are left out, for the EMA to name."""
        path = latest_checkpoint(self.root)
        if path is None:
            return {}
        return {name: self.strategy.load_ema(path / name) for name in names if (path / name).is_dir()}
