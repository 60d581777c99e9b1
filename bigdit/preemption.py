"""Stopping a job cleanly on a signal, at a step boundary all ranks agree on; naming the rank that hangs.

Two kinds of signals:

* a requeue signal (``USR2``: SLURM's pre-timeout ``--signal``, or a preempting scheduler's warning):
  checkpoint, then requeue the job (rank 0, ``scontrol requeue``); the new allocation resumes exactly.
* a stop signal (``TERM``: ``scancel``, ``scontrol requeue``, a preemption with ``PreemptMode=CANCEL`` or
  ``REQUEUE``, the time limit; SLURM sends ``SIGKILL`` ``KillWait`` seconds later): checkpoint, then
  exit without requeuing: the user cancelled, or SLURM requeues the job itself.

Why not checkpoint inside the signal handler (what submitit does by default): a checkpoint here is a
collective (every rank writes its shards, or rank 0 gathers), and a handler runs at an arbitrary point
of one process, possibly in the middle of another collective, and submitit only acts on rank 0 (and
ignores ``TERM``). So the handler only records that a signal came; the training loop asks
:meth:`PreemptionGuard.stop_requested` after every optimizer step, which all-reduces the flags (MAX) so
every rank takes the same decision at the same step, then writes one extra checkpoint and calls
:meth:`PreemptionGuard.stop`. Outside SLURM a requeue signal ends the run with a message saying how to
resume.

Hung ranks: a rank that hangs (rather than dies) surfaces on the others only as a collective timeout,
whose message cannot name it. So each rank keeps a :class:`Heartbeat` file in ``<run.dir>/heartbeats/``
(who it is, the last step it finished, where its main thread is now); a rank whose collective fails
marks its own file and, after a short grace for its peers to fail alike, :func:`hang_report` names the
ranks that did not: they never reached the collective.

The guard is inert (no collective, no heartbeat, no cost) unless a launcher called :func:`install` in
this process: plain ``bigdit-train``/torchrun runs behave as before.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from bigdit.fsio import write_json_atomic

_state: dict = {"installed": False, "signal": None, "terminated": False, "max_requeues": 0, "job": None,
                "log": None, "heartbeat": None}

HEARTBEAT_DIR = "heartbeats"
#: Seconds between two heartbeat writes of a rank: one small file rename per rank, 100/s for 1,000 ranks.
HEARTBEAT_EVERY_S = 10.0
#: Seconds a rank whose collective failed waits for its peers to fail alike before naming the others:
#: the healthy ranks wait in the same collective and time out within about a step of each other.
FAILURE_GRACE_S = 5.0
#: At most this many lagging ranks are named (a partition can cut off hundreds).
MAX_NAMED = 8


def _record(signum, frame) -> None:  # noqa: ARG001
    # Only set a flag: a handler may run in the middle of a collective, where nothing else is safe.
    _state["signal"] = signum


def _record_stop(signum, frame) -> None:  # noqa: ARG001
    _state["terminated"] = True


def install(signals: tuple[int, ...] = (signal.SIGUSR2,), max_requeues: int = 3, stop_signals: tuple[int, ...] = (),
            job: str | None = None, log: str | None = None) -> None:
    """Route ``signals`` (checkpoint and requeue) and ``stop_signals`` (checkpoint and exit) to the guard in
    this process, replacing submitit's handlers (requeue at once from rank 0; ignore ``TERM``).

    ``max_requeues`` bounds how many times a job requeues itself (SLURM's ``SLURM_RESTART_COUNT``
    counts allocations after the first); past it the job fails with a message instead. ``job`` names this
    allocation in the heartbeat files (records of other allocations are ignored) and ``log`` is where
    this rank's output goes, quoted when another rank reports this one as hung.
    """
    for sig in signals:
        signal.signal(sig, _record)
    for sig in stop_signals:
        signal.signal(sig, _record_stop)
    _state.update(installed=True, signal=None, terminated=False, max_requeues=int(max_requeues), job=job, log=log,
                  heartbeat=None)


def installed() -> bool:
    return bool(_state["installed"])


class PreemptedError(RuntimeError):
    """The job stopped on a signal after writing a checkpoint, and is not requeued."""


class Heartbeat:
    """This rank's ``<run_dir>/heartbeats/rank-NNNNN.json``: host, pid, log, the last step it finished, and
    where the training thread is now (``file:line function``), rewritten atomically every ``every_s`` by a
    daemon thread, so the file also tells where a stuck rank is stuck, and goes stale when it is frozen."""

    def __init__(self, run_dir: str | Path, rank: int, world_size: int, job: str | None, log: str | None,
                 every_s: float = HEARTBEAT_EVERY_S):
        self.dir = Path(run_dir) / HEARTBEAT_DIR
        self.path = self.dir / f"rank-{rank:05d}.json"
        self.every_s = every_s
        self.record = {"rank": rank, "world_size": world_size, "job": job, "host": socket.gethostname(),
                       "pid": os.getpid(), "log": log, "step": None, "step_time": None, "failed": None}
        self._thread = threading.get_ident()  # the training loop's thread, whose position is reported
        self._lock = threading.Lock()  # the beat thread and a failure mark share one temporary file name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.write()
        threading.Thread(target=self._beat, name="bigdit-heartbeat", daemon=True).start()

    def finished(self, step: int) -> None:
        """Record that ``step`` is done (in memory; the next beat writes it)."""
        self.record.update(step=step, step_time=time.time())

    def failed(self, error: str) -> None:
        """Mark this rank as failed with ``error`` at once, so peers do not take it for the hung one."""
        self.record["failed"] = error[:300]
        self.write()

    def write(self) -> None:
        """Rewrite the file now (atomically: readers never see half of it)."""
        frame = sys._current_frames().get(self._thread)
        while frame is not None and frame.f_code.co_filename == __file__:
            frame = frame.f_back  # written by the training thread itself (start, failure): where it called from
        where = f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}" if frame else None
        with self._lock:
            write_json_atomic(self.path, dict(self.record, time=time.time(), where=where))

    def _beat(self) -> None:
        while True:
            time.sleep(self.every_s)
            try:
                self.write()
            except OSError:  # a full or flaky file system must not kill training; the next beat retries
                pass

    def peers(self) -> dict[int, dict]:
        """The heartbeat records of this job's ranks (this allocation only), by rank."""
        records = {}
        for path in self.dir.glob("rank-*.json"):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):  # unreadable (a full disk, a stray file): as if that rank wrote none
                continue
            if record.get("job") == self.record["job"] and record.get("world_size") == self.record["world_size"]:
                records[record["rank"]] = record
        return records


def _exited(pid: int) -> bool:
    """Whether process ``pid`` of this host is known to have exited; a zombie (killed, not yet reaped by its
    launcher) counts as exited."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
    except (OSError, IndexError):  # no /proc (not Linux) or unreadable: unknown, so not known to have exited
        return False


def describe_lagging(records: dict[int, dict], world_size: int, every_s: float, now: float) -> list[str]:
    """One line per rank that did not report a failure: those hang (or are frozen, or never started)."""
    lines = []
    for rank in range(world_size):
        r = records.get(rank)
        if r is None:
            lines.append(f"rank {rank} never wrote a heartbeat in this allocation: it hangs before the training loop")
            continue
        if r["failed"] is not None:
            continue
        done = ("has not finished a step in this allocation" if r["step"] is None else
                f"last finished step {r['step']}, {now - r['step_time']:.0f} s ago")
        silent = now - r["time"]
        local = r["host"] == socket.gethostname()  # a pid can be checked on its own host only
        if local and _exited(r["pid"]):
            state = f"its process no longer runs (last in {r['where']}): it died"
        elif silent > 3 * every_s:
            state = f"its heartbeat stopped {silent:.0f} s ago: the process is frozen or gone"
        elif local:
            state = f"now in {r['where']}: it hangs"
        else:  # another node: alive as of its last beat, which a rank killed since then also left
            state = f"in {r['where']} {silent:.0f} s ago: it hangs there, or died since"
        lines.append(f"rank {rank} on {r['host']} (pid {r['pid']}) {done}, {state}; see {r['log']}")
    if len(lines) > MAX_NAMED:
        lines = lines[:MAX_NAMED] + [f"... and {len(lines) - MAX_NAMED} more ranks"]
    return lines


def hang_report(error: str, grace_s: float = FAILURE_GRACE_S) -> list[str]:
    """After a collective failed on this rank with ``error``: mark it in this rank's heartbeat, wait ``grace_s``
    for the peers to fail alike, and describe the ranks that did not (empty without heartbeats)."""
    heartbeat = _state["heartbeat"]
    if heartbeat is None:
        return []
    heartbeat.failed(error)
    time.sleep(grace_s)
    return describe_lagging(heartbeat.peers(), heartbeat.record["world_size"], heartbeat.every_s, time.time())


@dataclass
class PreemptionGuard:
    """What the training loop consults at each step boundary (see the module docstring)."""

    world_size: int
    rank: int
    group: object = None
    active: bool = False
    terminate: bool = False  # the agreed stop came from a stop signal (TERM): checkpoint and exit, no requeue
    heartbeat: Heartbeat | None = None

    @classmethod
    def for_strategy(cls, strategy, run_dir: str | None = None) -> PreemptionGuard:
        """A guard for this process's strategy; inert unless :func:`install` was called. With ``run_dir``
        and more than one rank it also starts this rank's heartbeat there."""
        info = strategy.info
        guard = cls(info.world_size, info.rank, active=installed())
        if guard.active and info.world_size > 1 and dist.is_initialized():
            # The flags travel as a CPU tensor: on nccl jobs a side gloo group avoids a device sync per step.
            guard.group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        if guard.active and run_dir is not None and info.world_size > 1:
            guard.heartbeat = _state["heartbeat"] = Heartbeat(run_dir, info.rank, info.world_size, _state["job"],
                                                              _state["log"])
        return guard

    def stop_requested(self, step: int = 0) -> bool:
        """Whether any rank got a requeue or stop signal; the same answer on every rank (collective).
        ``step`` is the optimizer step just finished (recorded in the heartbeat)."""
        if not self.active:
            return False
        if self.heartbeat is not None:
            self.heartbeat.finished(step)
        flags = torch.tensor([_state["signal"] is not None, _state["terminated"]], dtype=torch.int32)
        if self.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        self.terminate = bool(flags[1])
        return bool(flags.any())

    def stop(self, step: int, run_dir: str) -> None:
        """End this allocation after the step-``step`` checkpoint: requeue on SLURM, else raise. Never returns."""
        host = socket.gethostname()
        job = os.environ.get("SLURM_JOB_ID")
        on_slurm = job is not None and os.environ.get("SUBMITIT_EXECUTOR") == "slurm"
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        limit = _state["max_requeues"]
        if self.terminate:
            raise PreemptedError(f"SIGTERM received, checkpoint at step {step} written in {run_dir}; not requeuing: "
                                 f"a job SLURM requeues (PreemptMode=REQUEUE, scontrol requeue) resumes from it by "
                                 f"itself, a cancelled one when you resubmit the same command")
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
        # SLURM now ends this allocation with SIGTERM (SIGKILL KillWait later). Exit on that SIGTERM, not
        # before: an exit status racing the requeue could fail the job.
        deadline = time.time() + 120
        while not _state["terminated"] and time.time() < deadline:
            time.sleep(0.2)
        sys.exit(-1)
