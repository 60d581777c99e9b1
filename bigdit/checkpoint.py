"""Atomic, rotating training checkpoints under ``<run.dir>/checkpoints`` with a ``latest`` pointer.

Each checkpoint is written into a temporary directory by every rank that holds state; rank 0 then records
every file's size (``files.json``), flushes the files and directories to disk (fsync, as DCP and other
trusted checkpointers do), renames the directory into place and only then switches ``latest``
(``os.replace`` of a small file, fsync'ed too). A crash or power loss at any moment leaves the previous
checkpoint and pointer intact. Before writing, the free space is checked against the last checkpoint's size;
a full disk during the write removes the partial directory and names the directory and the bytes needed.

Loading checks the recorded sizes and reads every file with ``weights_only=True``; a damaged checkpoint is
refused with the file named and the way back: ``run.resume_step=N`` resumes from an earlier checkpoint,
moving the later ones aside to ``abandoned/`` (nothing is deleted).

What a checkpoint holds is the strategy's format (see ``bigdit.engine``); beside it rank 0 writes
``strategy.json``, the strategy's :meth:`~bigdit.engine.base.Strategy.checkpoint_meta` (its ``name`` and
layout, e.g. ``{"name": "deepspeed", "world_size": 8, "precision": "bf16", "zero_stage": 3}``), so that
tools reading the checkpoint later ask the strategy that wrote it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bigdit.engine.base import Strategy, full_numel
from bigdit.fsio import fsync_tree, write_atomic, write_json_atomic

LATEST = "latest"
STRATEGY_FILE = "strategy.json"
#: every file of a checkpoint with its size in bytes, written last: a truncated or missing file is found by name
FILES = "files.json"
ABANDONED = "abandoned"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the file or directory and the fix."""

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
        self._agree(self._space_problem() if self.strategy.is_main else None)
        self.strategy.barrier()
        try:
            self.strategy.save(tmp, extra, ema)
            for name, state in (extra_emas or {}).items():
                save_ema_subdir(self.strategy, tmp / name, state)
            problem = None
        except Exception as e:
            # torch.save reports a full disk as a RuntimeError from its C++ writer ("iostream error"), not ENOSPC
            full = getattr(e, "errno", None) == errno.ENOSPC or shutil.disk_usage(self.root).free < self._bytes_needed()
            if not full:
                raise
            problem = (f"the disk holding {self.root} filled up while writing the checkpoint of step {step} "
                       f"(about {self._bytes_needed():,} bytes needed): free space there and rerun the same command "
                       f"to resume from the previous checkpoint")
        self._agree(problem, cleanup=tmp)
        self.strategy.barrier()
        if self.strategy.is_main:
            write_json_atomic(tmp / STRATEGY_FILE, self.strategy.checkpoint_meta(), indent=2)
            files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
            write_json_atomic(tmp / FILES, files, indent=1)
            fsync_tree(tmp)  # every rank's files are on disk before any name points at them
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_tree(self.root, recursive=False)
            write_atomic(self.root / LATEST, tag + "\n")
            fsync_tree(self.root, recursive=False)
            self._prune(keep_tag=tag)
        self.strategy.barrier()
        return final

    def _bytes_needed(self) -> int:
        """The size of the newest complete checkpoint, or (before the first) fp32 weights + AdamW + EMA."""
        for path in sorted(self.root.glob("step-*"), reverse=True):
            if (path / FILES).is_file():
                return sum(json.loads((path / FILES).read_text()).values())
        return 16 * sum(full_numel(p) for p in self.strategy.module.parameters())

    def _space_problem(self) -> str | None:
        needed, free = self._bytes_needed(), shutil.disk_usage(self.root).free
        if free >= needed:
            return None
        return (f"not enough disk space for a checkpoint in {self.root}: about {needed:,} bytes needed, {free:,} "
                f"free; free space there (or lower run.keep_ckpts) and rerun the same command to resume")

    def _agree(self, problem: str | None, cleanup: Path | None = None) -> None:
        """Raise on every rank when any rank (rank 0's message wins) hit ``problem``, so none waits in a
        collective for a rank that has given up; the partial ``cleanup`` directory is removed first."""
        failed = problem is not None
        if self.strategy.info.world_size > 1:
            flag = torch.tensor([float(failed)], device=self.strategy.device)
            failed = self.strategy.all_reduce_mean(flag).item() > 0
        if not failed:
            return
        if self.strategy.is_main and cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
        raise CheckpointError(problem or f"another rank could not write the checkpoint in {self.root}; see its log")

    def _prune(self, keep_tag: str) -> None:
        tags = sorted(p.name for p in self.root.glob("step-*") if p.is_dir())
        for tag in tags[: -self.keep]:
            if tag != keep_tag:
                shutil.rmtree(self.root / tag, ignore_errors=True)

    def load_latest(self, step: int | None = None) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """Restore the latest checkpoint (or the one of ``step``, ``run.resume_step``) into the strategy; return
        ``(extra, ema)``, or None if there is none. Resuming from an earlier step moves the later checkpoints
        to ``abandoned/`` and points ``latest`` at it."""
        path = latest_checkpoint(self.root) if step is None else self.root / step_tag(step)
        if path is None:
            return None
        if not path.is_dir():
            raise CheckpointError(f"run.resume_step={step}: there is no {path}; checkpoints: {self._steps()}")
        saved, now = checkpoint_strategy(path), self.strategy.checkpoint_meta()
        changed = {k: (saved.get(k), now[k]) for k in self.strategy.resume_keys if saved.get(k, now[k]) != now[k]}
        if changed:
            was = " ".join(f"{k}={old}" for k, (old, _) in changed.items())
            asked = " ".join(f"{k}={new}" for k, (_, new) in changed.items())
            raise ValueError(f"{path} was written by strategy {was} but this run asks for {asked}: a checkpoint "
                             f"resumes only under the strategy layout that wrote it; use the original strategy keys "
                             f"or a new run.dir (tools/export.py converts any checkpoint to plain weights)")
        self._check_files(path)
        try:
            restored = self.strategy.load(path)
        except Exception as e:
            culprit = _unreadable_file(path) or "a file"
            raise CheckpointError(self._damaged(path, culprit, f"cannot be read ({e})")) from e
        if step is not None and self.strategy.is_main:
            self._abandon_after(path)
        return restored

    def load_extra_emas(self, names: list[str], step: int | None = None) -> dict[str, dict[str, Any]]:
        """This rank's tensors of the further averages ``names`` that the latest checkpoint (or the one of ``step``)
        holds (resharded by the strategy); absent ones are left out, for the EMA to name."""
        path = latest_checkpoint(self.root) if step is None else self.root / step_tag(step)
        if path is None:
            return {}
        return {name: self.strategy.load_ema(path / name) for name in names if (path / name).is_dir()}

    def _steps(self) -> str:
        steps = [int(p.name.split("-")[1]) for p in sorted(self.root.glob("step-*")) if p.is_dir()]
        return ", ".join(map(str, steps)) or "none"

    def _damaged(self, path: Path, what: str, how: str) -> str:
        earlier = [p for p in sorted(self.root.glob("step-*")) if p.is_dir() and p.name < path.name]
        back = (f"resume from the previous checkpoint with run.resume_step={int(earlier[-1].name.split('-')[1])}"
                if earlier else "there is no earlier checkpoint: start again in a new run.dir")
        return f"checkpoint {path} is damaged: {what} {how}; {back} (checkpoints: {self._steps()})"

    def _check_files(self, path: Path) -> None:
        if not (path / FILES).is_file():
            return  # written before files.json existed
        for name, size in json.loads((path / FILES).read_text()).items():
            f = path / name
            if not f.is_file():
                raise CheckpointError(self._damaged(path, str(f), "is missing"))
            if f.stat().st_size != size:
                raise CheckpointError(self._damaged(path, str(f), f"has {f.stat().st_size:,} bytes, {size:,} written"))

    def _abandon_after(self, path: Path) -> None:
        later = [p for p in sorted(self.root.glob("step-*")) if p.is_dir() and p.name > path.name]
        for p in later:
            (self.root / ABANDONED).mkdir(exist_ok=True)
            os.replace(p, self.root / ABANDONED / p.name)
        write_atomic(self.root / LATEST, path.name + "\n")


def _unreadable_file(path: Path) -> str | None:
    """The first ``.pt`` file under ``path`` that torch cannot read as tensors and plain containers."""
    for f in sorted(path.rglob("*.pt")):
        try:
            torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception:
            return str(f)
    return None
