"""Stopping a job cleanly on a preemption / pre-timeout signal, at a step boundary all ranks agree on.

Why not checkpoint inside the signal handler (what submitit does by default): a checkpoint here is a
collective (every rank writes its shards, or rank 0 gathers), and a handler runs at an arbitrary point
of one process, possibly in the middle of another collective, and submitit only acts on rank 0. So the
handler only records that a signal came; the training loop asks :meth:`PreemptionGuard.stop_requested`
after every optimizer step, which all-reduces the flags (MAX) so every rank takes the same decision at
the same step, then writes one extra checkpoint and calls :meth:`PreemptionGuard.stop`, which requeues
the SLURM job (rank 0, ``scontrol requeue``) or, outside SLURM, ends with a message saying how to resume.
The new allocation reruns the same task, which resumes from ``checkpoints/latest`` exactly.

The guard is inert (no collective, no cost) unless a launcher called :func:`install` in this process:
plain ``bigdit-train``/torchrun runs behave as before.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

_state: dict = {"installed": False, "signal": None, "max_requeues": 0}


def _record(signum, frame) -> None:  # noqa: ARG001
    # Only set a flag: a handler may run in the middle of a collective, where nothing else is safe.
    _state["signal"] = signum


def install(signals: tuple[int, ...] = (signal.SIGUSR2,), max_requeues: int = 3) -> None:
    """Route ``signals`` to the guard in this process (replaces submitit's requeue-now handler).

    ``max_requeues`` bounds how many times a job requeues itself (SLURM's ``SLURM_RESTART_COUNT``
    counts allocations after the first); past it the job fails with a message instead.
    """
    for sig in signals:
        signal.signal(sig, _record)
    _state.update(installed=True, signal=None, max_requeues=int(max_requeues))


def installed() -> bool:
    return bool(_state["installed"])


class PreemptedError(RuntimeError):
    """The job stopped on a signal after writing a checkpoint, and is not requeued."""


@dataclass
class PreemptionGuard:
    """What the training loop consults at each step boundary (see the module docstring)."""

    world_size: int
    rank: int
    group: object = None
    active: bool = False

    @classmethod
    def for_strategy(cls, strategy) -> PreemptionGuard:
        """A guard for this process's strategy; inert unless :func:`install` was called."""
        info = strategy.info
        guard = cls(info.world_size, info.rank, active=installed())
        if guard.active and info.world_size > 1 and dist.is_initialized():
            # The flags travel as a CPU tensor: on nccl jobs a side gloo group avoids a device sync per step.
            guard.group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        return guard

    def stop_requested(self) -> bool:
        """Whether any rank got a preemption/timeout signal; the same answer on every rank (collective)."""
        if not self.active:
            return False
        flag = torch.tensor([0 if _state["signal"] is None else int(_state["signal"])], dtype=torch.int32)
        if self.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    def stop(self, step: int, run_dir: str) -> None:
        """End this allocation after the step-``step`` checkpoint: requeue on SLURM, else raise. Never returns."""
        host = socket.gethostname()
        job = os.environ.get("SLURM_JOB_ID")
        on_slurm = job is not None and os.environ.get("SUBMITIT_EXECUTOR") == "slurm"
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        limit = _state["max_requeues"]
        if not on_slurm:
            raise PreemptedError(f"stopped on a signal after the step-{step} checkpoint in {run_dir}; rerun the same "
                                 f"command to resume from it")
        if restarts >= limit:
            raise PreemptedError(
                f"SLURM job {job} was preempted/timed out at step {step} (checkpoint written) but it was already "
                f"requeued {restarts} times (launcher.max_requeues={limit}): not requeuing again. Resubmit the same "
                f"command to resume from {run_dir}/checkpoints/latest, or raise launcher.max_requeues / "
                f"launcher.time_min")
        if self.rank == 0:
            print(f"[bigdit] rank 0 on {host}: signal received, checkpoint at step {step} written; requeuing SLURM "
                  f"job {job} (requeue {restarts + 1}/{limit})", file=sys.stderr, flush=True)
            proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if proc.returncode:
                raise PreemptedError(f"scontrol requeue {job} failed ({proc.stderr.strip()}); the checkpoint at step "
                                     f"{step} is in {run_dir}: resubmit the same command to resume")
        if self.world_size > 1:
            dist.barrier(group=self.group)  # nobody exits (and fails the step) before rank 0 has requeued
        # SLURM now kills this allocation; wait for it rather than racing it with an exit status.
        time.sleep(120)
        sys.exit(-1)
