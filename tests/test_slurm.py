"""The submitit launcher on a real single-node SLURM cluster (and submitit's local executor).

Every job is 2 CPU tasks (gloo) training the tiny demo DiT with DeepSpeed ZeRO-2 for 12 steps; the
reference is the same run started with ``launcher=local``. Interrupted jobs must end with the same
metrics and the same final weights (EMA and raw) as the reference.

The cluster comes from ``launchers/slurm_cluster.sh`` (``make test`` runs it as root). Without one the
SLURM tests skip with the reason, except under CI (``CI`` set), where they fail: CI must run them.

To interrupt a job at a known point, its first allocation reads data through :class:`SlowDigits` (a
delay per batch, nothing else changes); requeued allocations (``SLURM_RESTART_COUNT`` >= 1) run at full
speed. SLURM holds a requeued job for 2 minutes before it is eligible again (``BeginTime``); the tests
release it at once with ``scontrol update StartTime=now``, as an operator could.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from bigdit.data.digits import Digits

from conftest import REPO

TESTS = Path(__file__).resolve().parent
STEPS = 12
BASE = [
    "experiment=demo", "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "run.global_batch=16",
    "run.log_every=1", "run.ckpt_every=3", "ema.decay=0.9", "optim.warmup_steps=0", "optim.schedule=constant",
    "optim.lr=2e-3", "strategy=deepspeed", "strategy.zero_stage=2", f"run.steps={STEPS}",
]
SLURM_2_TASKS = ["launcher=slurm", "launcher.gpus_per_node=0", "launcher.tasks_per_node=2", "launcher.time_min=5"]


def slow(delay_s: float = 2.0, allocations: int = 1) -> list[str]:
    """Overrides that read the data through :class:`SlowDigits`."""
    return ["data.source._target_=test_slurm.SlowDigits", f"+data.source.delay_s={delay_s}",
            f"+data.source.slow_allocations={allocations}"]


FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE"}


class SlowDigits(Digits):
    """The digits, with ``delay_s`` seconds per batch in a job's first ``slow_allocations`` allocations (imported
    by the job's tasks through PYTHONPATH): keeps a tiny run busy long enough to be signalled, same data."""

    def __init__(self, delay_s: float = 0.0, slow_allocations: int = 1) -> None:
        super().__init__()
        self.delay_s, self.slow_allocations = delay_s, slow_allocations

    def get(self, indices):
        if int(os.environ.get("SLURM_RESTART_COUNT") or 0) < self.slow_allocations:
            time.sleep(self.delay_s)
        return super().get(indices)


class FailingDigits(Digits):
    """The digits, except that rank ``fail_rank`` raises at its ``at_call``-th batch: a rank that dies."""

    def __init__(self, fail_rank: int = 1, at_call: int = 3) -> None:
        super().__init__()
        self.fail_rank, self.at_call, self.calls = fail_rank, at_call, 0

    def get(self, indices):
        self.calls += 1
        if int(os.environ.get("RANK", 0)) == self.fail_rank and self.calls >= self.at_call:
            raise RuntimeError("injected failure")
        return super().get(indices)


def cluster_answers() -> bool:
    return shutil.which("sinfo") is not None and subprocess.run(
        [str(REPO / "launchers" / "slurm_cluster.sh"), "--check"], capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def slurm():
    if not cluster_answers():
        reason = ("no SLURM cluster answers (sinfo): start one with `sudo launchers/slurm_cluster.sh` "
                  "(`make test` does it when run as root)")
        if os.environ.get("CI"):
            pytest.fail(reason + " -- CI must run the SLURM tests")
        pytest.skip(reason)


def submit(run_dir: Path, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``launchers/submit.py`` with the tiny run's overrides; the job environment can import this file."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "launchers/submit.py", *BASE, f"run.dir={run_dir}", *overrides],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def submit_slurm(run_dir: Path, *overrides: str) -> str:
    out = submit(run_dir, *SLURM_2_TASKS, *overrides).stdout
    match = re.search(r"submitted SLURM job (\d+)", out)
    assert match, out
    assert str(run_dir) in out and "tail -f" in out, out  # the launcher says where the run and its logs are
    return match.group(1)


def job_info(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def release_if_requeued(job: str, info: dict[str, str]) -> None:
    if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime" and int(info.get("Restarts", 0)):
        subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], capture_output=True)


def wait_job(job: str, timeout: float = 240) -> dict[str, str]:
    """Poll until ``job`` ends; requeued allocations are released at once instead of after SLURM's 2 minutes."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job_info(job)
        if info.get("JobState", "") in FINAL_STATES:
            return info
        release_if_requeued(job, info)
        time.sleep(1)
    subprocess.run(["scancel", job])
    pytest.fail(f"SLURM job {job} did not end within {timeout}s: {job_info(job)}")


def wait_for_step(run_dir: Path, job: str, step: int | None, restart: int = 0, timeout: float = 120) -> None:
    """Until allocation ``restart`` of the job has logged ``step`` (any step when None), so it is training."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = (run_dir / "submitit" / f"{job}_0_log.out")
        text = out.read_text(errors="replace") if out.is_file() else ""
        # Allocations append to the same log; each starts with rank 0's "[bigdit] rank 0/2 on ..." line.
        allocations = text.split("[bigdit] rank 0/2 on ")[1:]
        pattern = rf"step {step if step is not None else r'[0-9]+'}/{STEPS} "
        if len(allocations) > restart and re.search(pattern, allocations[restart]):
            return
        info = job_info(job)
        assert info.get("JobState") not in FINAL_STATES, (info, logs(run_dir, job)[-3000:])
        release_if_requeued(job, info)
        time.sleep(0.5)
    pytest.fail(f"job {job} did not reach step {step} in allocation {restart} within {timeout}s")


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def logs(run_dir: Path, job: str) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((run_dir / "submitit").glob(f"{job}_*_log.*")))


def weights(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    from bigdit.checkpoint import latest_checkpoint
    from bigdit.export import consolidated_weights

    cfg = OmegaConf.load(run_dir / "config.yaml")
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    return {which: consolidated_weights(ckpt, cfg.model, which) for which in ("ema", "model")}


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Same loss at every step (one record per step) and the same final EMA and raw weights."""
    got, want = records(run_dir), records(reference)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want], rtol=1e-5)
    a, b = weights(run_dir), weights(reference)
    for which in a:
        assert a[which].keys() == b[which].keys()
        for k in a[which]:
            torch.testing.assert_close(a[which][k], b[which][k], rtol=1e-5, atol=1e-6, msg=f"{which} {k}")


def assert_resumed(run_dir: Path, job: str, info: dict[str, str], reference: Path) -> None:
    assert info["JobState"] == "COMPLETED", (info, logs(run_dir, job)[-4000:])
    assert int(info["Restarts"]) >= 1, info
    assert "resumed at step" in logs(run_dir, job)
    assert_same_run(run_dir, reference)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run: 2 tasks through submitit's local executor (``launcher=local``)."""
    run = tmp_path_factory.mktemp("local")
    out = submit(run, "launcher=local", "launcher.tasks_per_node=2").stdout
    assert "submitted local job" in out and "finished" in out, out
    assert len(list((run / "submitit").glob("*_1_log.out"))) == 1  # per-rank logs inside the run dir
    return run


def test_dry_run_prints_sbatch_for_8_nodes_of_8_gpus(tmp_path):
    proc = submit(tmp_path / "run", "launcher=slurm", "launcher.nodes=8", "launcher.gpus_per_node=8",
                  "launcher.partition=gpu", "launcher.account=proj", "launcher.qos=high", "launcher.time_min=1440",
                  "launcher.cpus_per_task=12", "launcher.mem=0", "launcher.constraint=h100", "launcher.exclusive=true",
                  "launcher.setup=['module load cuda/12.4','export NCCL_DEBUG=WARN']",
                  "+launcher.sbatch_extra.reservation=big", "launcher.dry_run=true")
    script = proc.stdout
    lines = set(script.splitlines())
    for flag in ("--nodes=8", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu", "--account=proj",
                 "--qos=high", "--time=1440", "--cpus-per-task=12", "--mem=0", "--constraint=h100", "--exclusive",
                 "--requeue", "--reservation=big", "--signal=USR2@120", f"--output={tmp_path}/run/submitit/%j_0_log.out"):
        assert f"#SBATCH {flag}" in lines, (flag, script)
    assert "module load cuda/12.4" in lines and "export NCCL_DEBUG=WARN" in lines
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "--kill-on-bad-exit=1" in srun and "submitit.core._submit" in srun and "%j_%t_log.out" in srun
    assert not (tmp_path / "run").exists()  # nothing submitted, nothing written


def test_two_task_zero2_job_matches_local_launcher(slurm, reference, tmp_path):
    job = submit_slurm(tmp_path)
    info = wait_job(job)
    assert info["JobState"] == "COMPLETED", (info, logs(tmp_path, job)[-4000:])
    assert_same_run(tmp_path, reference)
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "launcher.yaml").is_file()
    assert {p.name for p in (tmp_path / "submitit").glob(f"{job}_*_log.out")} == {f"{job}_0_log.out", f"{job}_1_log.out"}


def test_timeout_signal_requeues_and_resumes_exactly(slurm, reference, tmp_path):
    # A 2-minute limit with the USR2 45 s before it. SLURM sends it up to ~30 s earlier still (its event
    # resolution, see `man sbatch`): 45-75 s into an allocation. The first allocation is still training then
    # (12 slow steps take ~90 s): an extra checkpoint, a self-requeue, and a resume that ends within 45 s.
    job = submit_slurm(tmp_path, *slow(6.0), "launcher.time_min=2", "launcher.signal_delay_s=45")
    info = wait_job(job)
    assert_resumed(tmp_path, job, info, reference)
    assert "signal received, checkpoint at step" in logs(tmp_path, job)


def test_scontrol_requeue_then_scancel_preemption_resume_exactly(slurm, reference, tmp_path):
    # Allocation 0 is killed by `scontrol requeue` (an operator, a node failure) after the step-3 checkpoint:
    # no extra checkpoint, the next allocation resumes at step 3. Allocation 1 gets `scancel --signal=USR2`
    # (what a preempting scheduler sends): an extra checkpoint at the next step boundary and a self-requeue.
    # Allocation 2 finishes. One job for both keeps the test short.
    job = submit_slurm(tmp_path, *slow(2.0, allocations=2))
    wait_for_step(tmp_path, job, 4)
    subprocess.run(["scontrol", "requeue", job], check=True)
    # The requeue kills allocation 0 a few seconds later (KillWait), so it may reach the step-6 checkpoint
    # first: allocation 1 resumes at step 3 or 6. Preempt it as soon as it trains.
    wait_for_step(tmp_path, job, None, restart=1)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    info = wait_job(job)
    assert_resumed(tmp_path, job, info, reference)
    assert int(info["Restarts"]) == 2, info
    log = logs(tmp_path, job)
    resumed = int(re.search(r"resumed at step (\d+)", log).group(1))
    assert resumed in (3, 6), resumed  # a periodic checkpoint: scontrol requeue takes no extra one
    # The preemption checkpoint is taken at the next step boundary, between the periodic ones.
    step = int(re.search(r"signal received, checkpoint at step (\d+)", log).group(1))
    assert resumed < step < STEPS


def test_dead_rank_fails_the_job_at_once_naming_rank_and_host(slurm, tmp_path):
    job = submit_slurm(tmp_path, "data.source._target_=test_slurm.FailingDigits")
    t0 = time.time()
    info = wait_job(job, timeout=120)
    assert info["JobState"] == "FAILED", info
    assert time.time() - t0 < 100  # srun --kill-on-bad-exit: rank 0 does not wait for a collective timeout
    host = socket.gethostname()
    assert f"rank 1/2 on {host} (SLURM job {job}, restart 0) failed: RuntimeError: injected failure" in logs(tmp_path, job)


def test_guard_decides_requeue_bound_and_messages(monkeypatch):
    """In one process: the signal only sets a flag, seen at the next step boundary; past launcher.max_requeues
    (or outside SLURM) the guard fails with how to resume instead of requeueing."""
    from types import SimpleNamespace

    from bigdit import preemption

    previous = signal.getsignal(signal.SIGUSR2)
    try:
        strategy = SimpleNamespace(info=SimpleNamespace(world_size=1, rank=0))
        preemption._state["installed"] = False
        assert not preemption.PreemptionGuard.for_strategy(strategy).stop_requested()  # inert: plain bigdit-train
        preemption.install((signal.SIGUSR2,), max_requeues=2)
        guard = preemption.PreemptionGuard.for_strategy(strategy)
        assert not guard.stop_requested()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert guard.stop_requested()

        monkeypatch.delenv("SLURM_JOB_ID", raising=False)
        with pytest.raises(preemption.PreemptedError, match="rerun the same command"):
            guard.stop(5, "runs/x")
        monkeypatch.setenv("SLURM_JOB_ID", "77")
        monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
        monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
        with pytest.raises(preemption.PreemptedError, match=r"requeued 2 times \(launcher.max_requeues=2\)"):
            guard.stop(5, "runs/x")
    finally:
        preemption._state.update(installed=False, signal=None)
        signal.signal(signal.SIGUSR2, previous)
