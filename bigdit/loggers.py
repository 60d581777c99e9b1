"""Experiment trackers beside metrics.jsonl: ``run.loggers=[jsonl,tensorboard,wandb]``.

``jsonl`` (:class:`bigdit.metrics.MetricsLog`) is always on and is the record of truth: resume, plots and the
tests read it. The trackers mirror each of its records on the main rank only:

- ``tensorboard``: torch's ``SummaryWriter`` under ``<run.dir>/tb``. On resume it purges the events past the
  restored step, as metrics.jsonl drops its records past it, so each step keeps one value.
- ``wandb``: a W&B run under ``<run.dir>/wandb`` with the keys of ``run.wandb`` (project, entity, name, tags,
  mode). The run id is stored in ``<run.dir>/wandb_id`` so a resumed run continues the same W&B run;
  ``mode=offline`` needs no network (``wandb sync`` uploads later).

A tracker that fails (no network, bad key, a full disk) warns once and is switched off: a tracker never
stops or slows down training.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

#: names accepted in ``run.loggers``
LOGGERS = ("jsonl", "tensorboard", "wandb")


def check_loggers(names: Iterable[str]) -> list[str]:
    """The trackers named in ``run.loggers`` beyond jsonl; an unknown name is an error before any work."""
    names = list(names)
    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        raise ValueError(f"run.loggers has unknown logger(s) {unknown}: choose from {list(LOGGERS)}")
    return [n for n in names if n != "jsonl"]


class TensorBoard:
    """Scalars and images as TensorBoard events in ``<run_dir>/tb``."""

    def __init__(self, run_dir: Path, config: dict[str, Any], resume_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events at or past it that an interrupted run wrote after its last checkpoint.
        self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)
        if not resume_step:
            import yaml

            self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "\n```", 0)

    def log(self, record: dict[str, Any], step: int) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_image(self, name: str, image: np.ndarray, step: int) -> None:
        self.writer.add_image(name, image, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Wandb:
    """A W&B run, resumed under the same id when the run directory is resumed."""

    def __init__(self, run_dir: Path, config: dict[str, Any], options: dict[str, Any]):
        import wandb

        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id + "\n")
        (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(id=run_id, resume="allow", dir=str(run_dir), config=config,
                              project=options.get("project"), entity=options.get("entity"),
                              name=options.get("name"), tags=list(options.get("tags") or []),
                              mode=options.get("mode", "online"))

    def log(self, record: dict[str, Any], step: int) -> None:
        self.run.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def log_image(self, name: str, image: np.ndarray, step: int) -> None:
        import wandb

        self.run.log({name: wandb.Image(image)}, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The enabled trackers of a run; every call is guarded so that a failing tracker warns once and stops."""

    def __init__(self, names: Iterable[str], run_dir: str | Path, config: dict[str, Any], resume_step: int = 0,
                 wandb_options: dict[str, Any] | None = None):
        run_dir = Path(run_dir)
        self.active: dict[str, Any] = {}
        for name in check_loggers(names):
            tracker = self._guard(name, lambda n=name: self._build(n, run_dir, config, resume_step, wandb_options or {}))
            if tracker is not None:
                self.active[name] = tracker

    @staticmethod
    def _build(name: str, run_dir: Path, config: dict[str, Any], resume_step: int, wandb_options: dict[str, Any]):
        if name == "tensorboard":
            return TensorBoard(run_dir, config, resume_step)
        return Wandb(run_dir, config, wandb_options)

    def _guard(self, name: str, call) -> Any:
        """``call()``'s result; on any failure a warning, ``name`` switched off, and None."""
        try:
            return call()
        except Exception as e:  # any tracker failure: warn once, keep training
            self.active.pop(name, None)
            warnings.warn(f"logger {name} failed and is switched off for this run ({type(e).__name__}: {e}); "
                          f"metrics.jsonl keeps every record", stacklevel=2)
            return None

    def log(self, record: dict[str, Any]) -> None:
        """Mirror one metrics.jsonl record (its ``step`` is the x axis)."""
        for name, tracker in list(self.active.items()):
            self._guard(name, lambda t=tracker: t.log(record, int(record["step"])))

    def log_image(self, name: str, image: np.ndarray, step: int) -> None:
        """An (H, W, 3) uint8 image, e.g. a sample grid or a plot."""
        for tracker_name, tracker in list(self.active.items()):
            self._guard(tracker_name, lambda t=tracker: t.log_image(name, image, step))

    def close(self) -> None:
        for name, tracker in list(self.active.items()):
            self._guard(name, tracker.close)
        self.active.clear()
