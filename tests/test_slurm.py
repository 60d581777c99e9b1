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

The offline tools launch through the same launcher: ``tools/encode_latents.py`` as a 2-task job and as a
2-task job array, and ``tools/cache_text.py`` as a 2-task job, must write the same shards as one process.
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
ENCODE = ["input=sklearn:digits", "vae=none", "limit=300", "shard_size=40", "progress=false"]  # 8 shards
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


class HangingDigits(FailingDigits):
    """The digits, except that rank ``fail_rank`` sleeps forever at its ``at_call``-th batch: a rank that hangs."""

    def get(self, indices):
        if int(os.environ.get("RANK", 0)) == self.fail_rank and self.calls + 1 >= self.at_call:
            while True:
                time.sleep(1)
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


def run_script(script: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    """``python <script> <args>`` in the repo, which must succeed; the jobs it submits can import this file."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, script, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def submit(run_dir: Path, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``launchers/submit.py`` with the tiny run's overrides."""
    return run_script("launchers/submit.py", *BASE, f"run.dir={run_dir}", *overrides, timeout=timeout)


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


@pytest.mark.slow
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


@pytest.mark.slow
def test_cluster_daemons_do_not_hold_the_scripts_lock(slurm):
    # The daemons slurm_cluster.sh starts live on; had they inherited its lock, every later change (nodes=2) would
    # wait on it forever (what CI saw: the two-node fixture timed out after 600 s with nothing printed).
    lock = "/run/bigdit-slurm-cluster.lock"
    holders = []
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            if os.readlink(fd) == lock:
                holders.append(f"{fd.parts[2]} {Path('/proc', fd.parts[2], 'comm').read_text().strip()}")
        except OSError:  # processes and fds come and go while we look
            pass
    assert not holders, f"processes hold {lock} open: {holders}"
    proc = subprocess.run([str(REPO / "launchers" / "slurm_cluster.sh")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "nothing to do" in proc.stdout, (proc.stdout, proc.stderr)


@pytest.mark.slow
def test_two_task_zero2_job_matches_local_launcher(slurm, reference, tmp_path):
    job = submit_slurm(tmp_path)
    info = wait_job(job)
    assert info["JobState"] == "COMPLETED", (info, logs(tmp_path, job)[-4000:])
    assert_same_run(tmp_path, reference)
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "launcher.yaml").is_file()
    assert {p.name for p in (tmp_path / "submitit").glob(f"{job}_*_log.out")} == {f"{job}_0_log.out", f"{job}_1_log.out"}


@pytest.mark.slow
def test_timeout_signal_requeues_and_resumes_exactly(slurm, reference, tmp_path):
    # A 2-minute limit with the USR2 45 s before it. SLURM sends it up to ~30 s earlier still (its event
    # resolution, see `man sbatch`): 45-75 s into an allocation. The first allocation is still training then
    # (12 slow steps take ~90 s): an extra checkpoint, a self-requeue, and a resume that ends within 45 s.
    job = submit_slurm(tmp_path, *slow(6.0), "launcher.time_min=2", "launcher.signal_delay_s=45")
    info = wait_job(job)
    assert_resumed(tmp_path, job, info, reference)
    assert "signal received, checkpoint at step" in logs(tmp_path, job)


@pytest.mark.slow
def test_scontrol_requeue_then_scancel_preemption_resume_exactly(slurm, reference, tmp_path):
    # Allocation 0 is ended by `scontrol requeue` (an operator, a node failure), which sends SIGTERM: an extra
    # checkpoint at the next step boundary and an exit without self-requeue (SLURM requeues the job itself).
    # Allocation 1 gets `scancel --signal=USR2` (what a preempting scheduler sends): an extra checkpoint at the
    # next step boundary and a self-requeue. Allocation 2 finishes. One job for both keeps the test short.
    job = submit_slurm(tmp_path, *slow(2.0, allocations=2))
    wait_for_step(tmp_path, job, 4)
    subprocess.run(["scontrol", "requeue", job], check=True)
    wait_for_step(tmp_path, job, None, restart=1)  # preempt allocation 1 as soon as it trains
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    info = wait_job(job)
    assert_resumed(tmp_path, job, info, reference)
    assert int(info["Restarts"]) == 2, info
    log = logs(tmp_path, job)
    resumed = int(re.search(r"resumed at step (\d+)", log).group(1))
    # Allocation 1 resumes from the SIGTERM checkpoint, not from the periodic step-3 one.
    assert resumed == int(re.search(r"SIGTERM received, checkpoint at step (\d+)", log).group(1)) >= 4
    # The preemption checkpoint is taken at the next step boundary, between the periodic ones.
    step = int(re.search(r"signal received, checkpoint at step (\d+)", log).group(1))
    assert resumed < step < STEPS


@pytest.mark.slow
def test_scancel_checkpoints_at_next_step_and_resubmitting_resumes_exactly(slurm, reference, tmp_path):
    from bigdit.checkpoint import latest_checkpoint, step_tag

    job = submit_slurm(tmp_path, *slow(3.0))
    wait_for_step(tmp_path, job, 4)
    subprocess.run(["scancel", job], check=True)  # SIGTERM to every task, SIGKILL KillWait (30 s) later
    info = wait_job(job)
    assert info["JobState"] == "CANCELLED", info
    log = logs(tmp_path, job)
    assert "resubmit the same command" in log, log[-4000:]  # how to resume; and no self-requeue
    assert int(info["Restarts"]) == 0, info
    # The checkpoint of the step boundary after the SIGTERM (step 5 takes 3 s), between the periodic ones.
    step = int(re.search(r"SIGTERM received, checkpoint at step (\d+) written", log).group(1))
    assert step in (4, 5), step
    assert latest_checkpoint(tmp_path / "checkpoints").name == step_tag(step)
    # The same command again (only the test's data delay is off) resumes there and ends like the reference.
    job = submit_slurm(tmp_path, *slow(3.0, allocations=0))
    info = wait_job(job)
    assert info["JobState"] == "COMPLETED", (info, logs(tmp_path, job)[-4000:])
    assert f"resumed at step {step}" in logs(tmp_path, job)
    assert_same_run(tmp_path, reference)


@pytest.mark.slow
def test_dead_rank_fails_the_job_at_once_naming_rank_and_host(slurm, tmp_path):
    job = submit_slurm(tmp_path, "data.source._target_=test_slurm.FailingDigits")
    t0 = time.time()
    info = wait_job(job, timeout=120)
    assert info["JobState"] == "FAILED", info
    assert time.time() - t0 < 100  # srun --kill-on-bad-exit: rank 0 does not wait for a collective timeout
    host = socket.gethostname()
    assert f"rank 1/2 on {host} (SLURM job {job}, restart 0) failed: RuntimeError: injected failure" in logs(tmp_path, job)


@pytest.mark.slow
def test_hung_rank_fails_the_job_naming_rank_host_and_where(slurm, tmp_path):
    # Rank 1 sleeps forever in data loading at its 3rd batch; rank 0 waits in DeepSpeed's gradient reduction,
    # whose ZeRO group must time out after strategy.timeout_s too (torch's default for new groups is 30 min).
    job = submit_slurm(tmp_path, "data.source._target_=test_slurm.HangingDigits", "strategy.timeout_s=15")
    t0 = time.time()
    info = wait_job(job, timeout=150)
    assert info["JobState"] == "FAILED", info
    assert time.time() - t0 < 120  # start-up, 2 steps, the 15 s timeout, the 5 s grace: not a silent hang
    log = logs(tmp_path, job)
    # Rank 0's collective timed out; from the heartbeats it names the rank that never reached it.
    assert "rank 0/2 on" in log and "Timed out" in log, log[-4000:]
    named = (rf"rank 1 on {socket.gethostname()} \(pid \d+\) last finished step 2, \d+ s ago, now in "
             rf"{re.escape(str(TESTS / 'test_slurm.py'))}:\d+ get: it hangs; "
             rf"see {tmp_path}/submitit/{job}_1_log.out")
    assert re.search(named, log), log[-4000:]


@pytest.mark.slow
def test_encode_latents_dry_run_prints_array_sbatch(tmp_path):
    out = run_script("tools/encode_latents.py", *ENCODE, f"out={tmp_path / 'out'}", "launcher=slurm",
                     "launcher.gpus_per_node=0", "launcher.tasks_per_node=2", "launcher.array=8",
                     "launcher.array_parallelism=2", "launcher.dry_run=true", timeout=60).stdout
    lines = set(out.splitlines())
    for flag in ("--array=0-7%2", "--ntasks-per-node=2", "--requeue", "--signal=USR2@120",
                 f"--output={tmp_path}/out/submitit/%A_%a_0_log.out"):
        assert f"#SBATCH {flag}" in lines, (flag, out)
    srun = next(line for line in out.splitlines() if line.startswith("srun "))
    assert "--kill-on-bad-exit=1" in srun and "submitit.core._submit" in srun and "%A_%a_%t_log.out" in srun
    assert not (tmp_path / "out").exists()  # nothing submitted, nothing written


@pytest.fixture(scope="module")
def digit_latents(tmp_path_factory) -> Path:
    """The shards of one ``tools/encode_latents.py`` process."""
    out = tmp_path_factory.mktemp("latents")
    run_script("tools/encode_latents.py", *ENCODE, f"out={out}", timeout=120)
    return out


def encode_on_slurm(out: Path, *launcher: str) -> str:
    """``tools/encode_latents.py`` submitting itself with ``launcher`` overrides, waiting for the job; its id."""
    text = run_script("tools/encode_latents.py", *ENCODE, f"out={out}", "launcher=slurm", "launcher.gpus_per_node=0",
                      "launcher.time_min=5", "launcher.wait=true", *launcher, timeout=120).stdout
    match = re.search(r"submitted SLURM (?:array )?job (\d+): .* of encode_latents", text)
    assert match and f"finished: {out}" in text, text
    return match.group(1)


def assert_same_shards(out: Path, reference: Path) -> None:
    """The same manifest (shards, counts, stats) and, shard by shard, the same samples: keys, labels, arrays."""
    from bigdit.data.shards import shard_io

    manifest = json.loads((reference / "manifest.json").read_text())
    assert json.loads((out / "manifest.json").read_text()) == manifest
    io = shard_io(manifest["format"])
    for shard in manifest["shards"]:
        got, want = list(io.read_shard(out, shard["name"])), list(io.read_shard(reference, shard["name"]))
        assert [(s["key"], s["cls"]) for s in got] == [(s["key"], s["cls"]) for s in want]
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a["moments"], b["moments"])
            np.testing.assert_array_equal(a["moments_flip"], b["moments_flip"])


@pytest.mark.slow
def test_encode_latents_as_two_task_job_matches_one_process(slurm, digit_latents, tmp_path):
    job = encode_on_slurm(tmp_path, "launcher.tasks_per_node=2")
    assert_same_shards(tmp_path, digit_latents)
    for rank in (0, 1):  # each task encoded its own half of the 8 shards; the logs are beside the shards
        log = (tmp_path / "submitit" / f"{job}_{rank}_log.out").read_text()
        assert f"rank {rank}/2: 300 images in 8 shards, 4 shard(s)" in log, log


@pytest.mark.slow
def test_encode_latents_as_two_task_array_matches_one_process(slurm, digit_latents, tmp_path):
    job = encode_on_slurm(tmp_path, "launcher.tasks_per_node=1", "launcher.array=2")
    assert_same_shards(tmp_path, digit_latents)
    for index in (0, 1):  # array job <index> took slice <index>; logs <job>_<index>_<task>_log.out
        log = (tmp_path / "submitit" / f"{job}_{index}_0_log.out").read_text()
        assert f"rank {index}/2: 300 images in 8 shards, 4 shard(s)" in log, log


def cache_text_reference(caption_tars: Path, tiny_clip, tmp_path: Path) -> list[str]:
    """Encode the caption tars and cache their text in one process (``<tmp_path>/one``); the cache_text arguments
    a job must be given to write the same shards."""
    config, weights = tiny_clip
    run_script("tools/encode_latents.py", f"input={caption_tars}", "vae=none", "resolution=8", "flip=false",
               "shard_size=2", "num_workers=0", "progress=false", f"out={tmp_path / 'lat'}", timeout=120)
    common = [f"shards={tmp_path / 'lat'}", "clip_model=tiny-clip-test", f"pretrained={weights}",
              f"model_config={config}", "progress=false"]
    run_script("tools/cache_text.py", *common, f"out={tmp_path / 'one'}", timeout=120)
    return common


@pytest.mark.slow
def test_cache_text_as_two_task_job_matches_one_process(slurm, caption_tars, tiny_clip, tmp_path):
    common = cache_text_reference(caption_tars, tiny_clip, tmp_path)
    text = run_script("tools/cache_text.py", *common, f"out={tmp_path / 'job'}", "launcher=slurm",
                      "launcher.gpus_per_node=0", "launcher.tasks_per_node=2", "launcher.time_min=5",
                      "launcher.wait=true", timeout=180).stdout
    job = re.search(r"submitted SLURM job (\d+)", text).group(1)
    assert f"finished: {tmp_path / 'job'}" in text, text
    manifest = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert json.loads((tmp_path / "job" / "manifest.json").read_text()) == manifest
    for rank, shards in ((0, 2), (1, 2)):  # 4 shards (2 per input tar): 0 and 2 to task 0, 1 and 3 to task 1
        log = (tmp_path / "job" / "submitit" / f"{job}_{rank}_log.out").read_text()
        assert f"rank {rank}/2: {shards} of 4 shards to caption here" in log, log
    from bigdit.data.shards import shard_io

    for shard in manifest["shards"]:
        for a, b in zip(shard_io("wds").read_shard(tmp_path / "one", shard["name"]),
                        shard_io("wds").read_shard(tmp_path / "job", shard["name"])):
            assert a["key"] == b["key"]
            np.testing.assert_allclose(a["clip_tokens"].astype(np.float32), b["clip_tokens"].astype(np.float32),
                                       atol=2e-3)


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


def test_stop_signal_checkpoints_and_never_requeues(monkeypatch):
    """In one process: SIGTERM (scancel, a preemption) is seen at the next step boundary like USR2, but on
    SLURM too the guard exits with how to resume instead of requeueing (SLURM requeues by itself, or not)."""
    from types import SimpleNamespace

    from bigdit import preemption

    previous = signal.getsignal(signal.SIGTERM)
    try:
        preemption.install((signal.SIGUSR2,), max_requeues=2, stop_signals=(signal.SIGTERM,))
        guard = preemption.PreemptionGuard.for_strategy(SimpleNamespace(info=SimpleNamespace(world_size=1, rank=0)))
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.stop_requested(5) and guard.terminate
        monkeypatch.setenv("SLURM_JOB_ID", "77")
        monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
        monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
        with pytest.raises(preemption.PreemptedError, match="checkpoint at step 5 .* not requeuing"):
            guard.stop(5, "runs/x")
    finally:
        preemption._state.update(installed=False, signal=None, terminated=False)
        signal.signal(signal.SIGTERM, previous)


def test_hang_report_names_the_ranks_that_did_not_fail(tmp_path):
    """In one process: rank 0's collective failed; of its 6 peers, rank 1 failed alike, rank 2's heartbeat is
    fresh and its process runs (it hangs where it says), rank 3's stopped while its process runs (frozen), rank 4
    never wrote one in this allocation, rank 5's is fresh but its process has exited (killed), rank 6's is fresh on
    another node."""
    from bigdit import preemption

    exited = subprocess.Popen(["true"])
    exited.wait()
    host = socket.gethostname()
    try:
        preemption.install((), job="9.1", log="logs/9_0_log.out")
        preemption._state["heartbeat"] = me = preemption.Heartbeat(tmp_path, 0, 7, "9.1", "logs/9_0_log.out",
                                                                   every_s=3600)
        now = time.time()
        for rank, failed, beat, pid, node in ((1, "timeout", now, 101, host), (2, None, now, os.getpid(), host),
                                              (3, None, now - 4 * 3600, os.getppid(), host),
                                              (5, None, now, exited.pid, host), (6, None, now - 4, 106, "node-b")):
            record = dict(me.record, rank=rank, pid=pid, host=node, log=f"logs/9_{rank}_log.out", step=2,
                          step_time=now - 30, failed=failed, time=beat, where="loader.py:7 get")
            (me.dir / f"rank-{rank:05d}.json").write_text(json.dumps(record))
        (me.dir / "rank-00004.json").write_text(json.dumps(dict(me.record, rank=4, job="9.0")))  # a previous allocation
        lines = preemption.hang_report("RuntimeError: Timed out", grace_s=0)
    finally:
        preemption._state.update(installed=False, heartbeat=None)
    assert lines == [
        f"rank 2 on {host} (pid {os.getpid()}) last finished step 2, 30 s ago, now in loader.py:7 get: it hangs; "
        "see logs/9_2_log.out",
        f"rank 3 on {host} (pid {os.getppid()}) last finished step 2, 30 s ago, its heartbeat stopped 14400 s ago: "
        "the process is frozen or gone; see logs/9_3_log.out",
        "rank 4 never wrote a heartbeat in this allocation: it hangs before the training loop",
        f"rank 5 on {host} (pid {exited.pid}) last finished step 2, 30 s ago, its process no longer runs (last in "
        "loader.py:7 get): it died; see logs/9_5_log.out",
        "rank 6 on node-b (pid 106) last finished step 2, 30 s ago, in loader.py:7 get 4 s ago: it hangs there, or "
        "died since; see logs/9_6_log.out",
    ]
    assert json.loads(me.path.read_text())["failed"] == "RuntimeError: Timed out"  # rank 0 marked itself


def test_heartbeat_written_by_the_training_thread_names_its_caller(tmp_path):
    # The first beat (and a failure mark) is written by the training thread itself: it must say where training
    # was (here, this test), not the heartbeat's own write.
    from bigdit import preemption

    beat = preemption.Heartbeat(tmp_path, 0, 2, "9.1", "logs/9_0_log.out", every_s=3600)
    assert re.fullmatch(rf"{re.escape(__file__)}:\d+ test_heartbeat_written_by_the_training_thread_names_its_caller",
                        json.loads(beat.path.read_text())["where"])


def stand_in_commands(tmp_path: Path, *names: str, real: bool = False) -> tuple[dict[str, str], Path]:
    """An environment whose PATH starts with stand-ins for the SLURM commands ``names``: each records its call in
    the returned log, then runs the real command (``real``) or fails."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "slurm-calls.log"
    bin_dir.mkdir(exist_ok=True)
    for name in names:
        tail = f'exec {shutil.which(name)} "$@"' if real else "exit 1"
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {calls}\n{tail}\n')
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return env, calls


@pytest.mark.slow
def test_gpu_request_on_gpuless_partition_fails_before_sbatch_naming_the_keys(slurm, tmp_path):
    """launcher=slurm keeps its default of 8 GPUs per node; this cluster's only partition has none. The launcher
    says so, with the keys to set, before sbatch runs (sbatch would only say 'Invalid generic resource')."""
    default = next(p[:-1] for p in subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True)
                   .stdout.split() if p.endswith("*"))
    env, calls = stand_in_commands(tmp_path, "sbatch", real=True)
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "launchers/submit.py", *BASE, f"run.dir={run}", "launcher=slurm"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    err = proc.stderr
    assert f"partition '{default}' (the cluster's default) has no GPUs" in err, err
    assert "launcher.gpus_per_node=8 asks for 8 GPUs per node" in err, err
    assert "launcher.gpus_per_node=0 launcher.tasks_per_node=N" in err, err
    assert "Traceback" not in err and "submitted" not in proc.stdout, proc.stdout + err
    assert not calls.exists(), calls.read_text()  # sbatch never ran
    assert not run.exists()  # nothing written

    # The same for an offline tool's job, and an explicit partition that lacks the GPUs asked for.
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "tools/encode_latents.py", *ENCODE, f"out={out}", "launcher=slurm",
                           f"launcher.partition={default}", "launcher.gpus_per_node=1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"launcher.gpus_per_node=1 asks for 1 GPUs per node, but partition '{default}' has no GPUs" in proc.stderr
    assert not calls.exists() and not out.exists()


@pytest.mark.slow
def test_dry_run_with_default_gpus_contacts_no_cluster(tmp_path):
    """The dry run prints the sbatch script of the default request (8 GPUs per node) without asking SLURM
    anything: every SLURM command on PATH is a stand-in that would record its call."""
    env, calls = stand_in_commands(tmp_path, "sinfo", "scontrol", "sbatch", "squeue", "sacct")
    proc = subprocess.run([sys.executable, "launchers/submit.py", *BASE, f"run.dir={tmp_path / 'run'}",
                           "launcher=slurm", "launcher.dry_run=true"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "#SBATCH --gpus-per-node=8" in proc.stdout.splitlines(), proc.stdout
    assert not calls.exists(), calls.read_text()
    assert not (tmp_path / "run").exists()


def test_gpu_request_problem_reads_sinfo_gres(tmp_path, monkeypatch):
    """In one process, against a stand-in sinfo printing a mixed cluster: the default partition has no GPUs, 'gpu'
    has 8 per node on one of its nodes, 'small' 2."""
    from bigdit.launch import gpu_request_problem, gres_gpus

    assert [gres_gpus(g) for g in ("(null)", "gpu:8", "gpu:h100:8(S:0-1),mps:400", "gpu:a100:2,gpu:v100:2",
                                   "gpu:tesla:4(S:0,1)", "gpu", "mps:100")] == [0, 8, 8, 4, 4, 1, 0]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sinfo").write_text("#!/bin/sh\nprintf 'cpu*|c1|(null)|64\\ncpu*|c2|(null)|64\\n"
                                   "gpu|g1|gpu:h100:8(S:0-1)|96\\ngpu|g2|gpu:h100:4|96\\nsmall|s1|gpu:2|16\\n'\n")
    (bin_dir / "sinfo").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    launcher = OmegaConf.load(REPO / "configs" / "launcher" / "slurm.yaml")

    def problem(**keys):
        return gpu_request_problem(OmegaConf.merge(launcher, keys))

    msg = problem()
    assert msg.startswith("launcher.gpus_per_node=8 asks for 8 GPUs per node, but partition 'cpu' (the cluster's "
                          "default) has no GPUs on its 2 node(s)"), msg
    assert "launcher.gpus_per_node=0 launcher.tasks_per_node=N (N processes per node; its nodes have 64 CPUs)" in msg
    assert "launcher.partition=gpu (8 GPUs per node)" in msg and "small" not in msg
    assert problem(partition="gpu") is None and problem(partition="gpu", gpus_per_node=4) is None
    msg = problem(partition="small")
    assert "partition 'small' has at most 2 per node" in msg and "launcher.gpus_per_node=2" in msg, msg
    assert problem(gpus_per_node=0, tasks_per_node=2) is None
    assert problem(partition="elsewhere") is None  # unknown to sinfo: sbatch says so itself
    assert problem(check_resources=False) is None
    assert gpu_request_problem(OmegaConf.load(REPO / "configs" / "launcher" / "local.yaml")) is None
