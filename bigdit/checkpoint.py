"""Atomic, rotating training checkpoints under ``<run.dir>/checkpoints`` with a ``latest`` pointer.

Each checkpoint is written into a temporary directory by every rank that holds state, renamed into
place by rank 0 only when complete, and only then is ``latest`` switched (``os.replace`` of a small
file). A crash at any moment leaves the previous checkpoint and pointer intact.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from bigdit.engine.base import Strategy

LATEST = "latest"


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


class Checkpointer:
    """Saves and restores the strategy's state plus ``extra`` (EMA, counters, config), keeping the last K."""

    def __init__(self, root: Path, strategy: Strategy, keep: int = 3):
        if keep < 1:
            raise ValueError(f"run.keep_ckpts must be >= 1, got {keep}")
        self.root = Path(root)
        self.strategy = strategy
        self.keep = keep

    def save(self, step: int, extra: dict[str, Any], ema: dict[str, Any]) -> Path:
        """Collective: every rank calls it at the same step with its own EMA tensors."""
        tag = step_tag(step)
        final, tmp = self.root / tag, self.root / f".tmp-{tag}"
        if self.strategy.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save
            tmp.mkdir()
        self.strategy.barrier()
        self.strategy.save(tmp, extra, ema)
        self.strategy.barrier()
        if self.strategy.is_main:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            pointer_tmp = self.root / f".{LATEST}.tmp"
            pointer_tmp.write_text(tag + "\n")
            os.replace(pointer_tmp, self.root / LATEST)
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
        return None if path is None else self.strategy.load(path)
