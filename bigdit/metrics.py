"""The metrics window (device-side sums between log steps), metrics.jsonl (one JSON object per logged step),
the console status line and the loss plot."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file (empty list when it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsWindow:
    """The per-step scalars of the steps since the last log step, summed on the device.

    :meth:`add` only adds device tensors (no host sync inside a step); :meth:`read` reduces the window over
    ranks in one collective and reads it back once, at log steps. Losses are averaged over ranks (each holds
    the loss of its own samples); the gradient norm is already global; bad samples (counted on the host by
    each rank's loader, cumulative) are summed over ranks in the same collective. ``extra`` names further
    per-rank losses (e.g. REPA's ``repa_loss``), averaged like the loss and read back in the same collective.
    """

    def __init__(self, device: torch.device, reduce_mean: Callable[[torch.Tensor], torch.Tensor], world_size: int,
                 extra: tuple[str, ...] = ()):
        self.reduce_mean = reduce_mean
        self.world_size = world_size
        self.extra = tuple(extra)
        # loss, grad norm, steps, bad samples, applied steps, then the extra losses
        self.sums = torch.zeros(5 + len(self.extra), device=device)
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, applied: bool = True,
            extra: dict[str, torch.Tensor] | None = None) -> None:
        """Account one optimizer step (``extra``: a value for each name of the window's ``extra``); a skipped
        (non-finite) step counts for throughput, not for the means."""
        self.sums[2] += 1
        if applied:
            self.sums[0] += loss
            self.sums[1] += grad_norm
            self.sums[4] += 1
            for i, name in enumerate(self.extra):
                self.sums[5 + i] += extra[name]

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (e.g. an evaluation) out of the window's wall time."""
        self.start += seconds

    def read(self, bad_samples: int) -> dict[str, float]:
        """Means over the window's applied steps (``loss``, ``grad_norm``, and ``extra`` as a dict; NaN when every
        step was skipped), its ``steps`` and wall time ``seconds``, and the run's ``bad_samples`` over all ranks;
        then start a new window. Collective."""
        self.sums[3] = bad_samples
        loss, grad_norm, steps, bad, applied, *extra = self.reduce_mean(self.sums.clone()).tolist()
        now = time.perf_counter()
        applied = applied or float("nan")
        out = {"loss": loss / applied, "grad_norm": grad_norm / applied, "steps": steps,
               "seconds": now - self.start, "bad_samples": round(bad * self.world_size),
               "extra": {name: value / applied for name, value in zip(self.extra, extra)}}
        self.sums.zero_()
        self.start = now
        return out


class MetricsLog:
    """Appends records to ``metrics.jsonl``; on resume, drops records past the restored step.

    Records logged after the last checkpoint of an interrupted run describe steps that will be
    trained again, so they are removed to keep one record per step.
    """

    def __init__(self, path: Path, resume_step: int):
        self.path = Path(path)
        kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def status_line(record: dict[str, Any], total_steps: int) -> str:
    """One line: step, loss, throughput and ETA."""
    eta = (total_steps - record["step"]) * record["step_time_s"]
    return (
        f"step {record['step']}/{total_steps} | loss {record['loss']:.4f} | grad {record['grad_norm']:.3f} | "
        f"lr {record['lr']:.2e} | {record['img_per_s']:.1f} img/s | ETA {format_eta(eta)}"
    )


def print_status(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stdout, flush=True)


def plot_loss(metrics_path: Path, out_path: Path) -> Path:
    """Plot loss against step from metrics.jsonl into a PNG, with the FID curve beside it when the run evaluated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    evaluated = [r for r in records if "fid" in r]
    fig, axes = plt.subplots(1, 2 if evaluated else 1, figsize=(11 if evaluated else 6, 3.5), dpi=100, squeeze=False)
    ax = axes[0, 0]
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if evaluated:
        ax = axes[0, 1]
        ax.plot([r["step"] for r in evaluated], [r["fid"] for r in evaluated], "o-", lw=1.2)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("FID (EMA)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return Path(out_path)
