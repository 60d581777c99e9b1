"""Faults of 2-node jobs (2 nodes x 1 task, DDP on gloo over the nodes' bridge, WebDataset shards) on the two
namespace nodes of ``launchers/slurm_cluster.sh nodes=2``:

1. ``kill -9`` of a random rank after a random step (seeded, printed), on either node: the job fails within
   seconds naming the rank and its host; resubmitting the same command resumes, and the run ends with weights
   bit-identical (fp32, CPU) to an uninterrupted run's, having seen the same sample keys at every step (none
   repeated, none skipped within the epoch).
6. A rank on the second node that hangs (SIGSTOP): the job fails within ``strategy.timeout_s`` plus seconds, and
   the log names that rank, its host and pid from its heartbeat (written on the other node's file system view:
   the same file system).
7. The second node lost mid-job (every process of it killed: its slurmd, job step and rank; the node set down),
   then back (``slurm_cluster.sh nodes=2`` again): SLURM requeues the job (``--requeue``), and the requeued
   allocation resumes exactly once the node is back.

Each case prints (``pytest -rA``) and records (JUnit ``summary`` property) one line: what was done, what the
user saw, how long it took. The uninterrupted reference is the same run as one 2-process job on one node.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from multinode import (NODES, ENCODE, STEPS, assert_same_keys, assert_same_run, heartbeats, holding_nodes, records,
                       submit, submit_two_nodes, summary, wait_logged_step)
from test_slurm import FINAL_STATES, job_info, logs, run_script, wait_job

from conftest import REPO

pytestmark = pytest.mark.slow
SEED = int(os.environ.get("BIGDIT_FAULT_SEED", "13"))


@pytest.fixture(scope="module")
def wds(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fault-shards") / "wds"
    run_script("tools/encode_latents.py", *ENCODE, f"out={out}", timeout=120)
    return out


def overrides(wds: Path) -> list[str]:
    return ["strategy=ddp", "data=wds", f"data.root={wds}"]


@pytest.fixture(scope="module")
def reference(wds, tmp_path_factory) -> Path:
    """The uninterrupted run: one job of 2 processes on one node (submitit's local executor)."""
    run = tmp_path_factory.mktemp("fault-reference")
    out = submit(run, *overrides(wds), "launcher=local", "launcher.tasks_per_node=2").stdout
    assert "finished" in out, out
    return run


def rank_pid(run: Path, rank: int, job: str) -> tuple[int, str]:
    """(pid, host) of ``rank`` in this allocation, from its heartbeat."""
    deadline = time.time() + 60
    while time.time() < deadline:
        beat = heartbeats(run).get(rank)
        if beat and beat["job"].startswith(f"{job}."):
            return beat["pid"], beat["host"]
        time.sleep(0.2)
    pytest.fail(f"rank {rank} of job {job} wrote no heartbeat")


@pytest.mark.usefixtures("nodes_in_use")
def test_kill9_random_rank_fails_fast_and_resubmit_resumes_bit_identical(wds, reference, tmp_path, record_property):
    rng = random.Random(SEED)
    rank, after = rng.randrange(2), rng.randint(2, STEPS - 3)
    print(f"[fault 1] seed {SEED}: kill -9 rank {rank} (on {NODES[rank]}) after step {after}")
    job = submit_two_nodes(tmp_path, 1, *overrides(wds))
    pid, host = rank_pid(tmp_path, rank, job)
    assert host == NODES[rank]
    wait_logged_step(tmp_path, after, job)
    os.kill(pid, signal.SIGKILL)
    t0 = time.time()
    info = wait_job(job, timeout=120)
    failed_s = time.time() - t0
    log = logs(tmp_path, job)
    assert info["JobState"] == "FAILED", (info, log[-4000:])
    assert failed_s < 45, failed_s  # srun --kill-on-bad-exit; not a collective timeout (600 s)
    # srun names the task that died and its node.
    assert re.search(rf"{NODES[rank]}: task {rank}: Killed", log), log[-4000:]
    lost = max(r["step"] for r in records(tmp_path))

    again = submit_two_nodes(tmp_path, 1, *overrides(wds))  # the same command
    info = wait_job(again, timeout=300)
    log = logs(tmp_path, again)
    assert info["JobState"] == "COMPLETED", (info, log[-4000:])
    resumed = int(re.search(r"resumed at step (\d+)", log).group(1))
    assert resumed <= lost
    assert_same_run(tmp_path, reference, exact=True)
    n = assert_same_keys(tmp_path, reference)
    summary(record_property, f"fault 1 (seed {SEED}): kill -9 rank {rank} on {host} after step {after}: job {job} "
                             f"FAILED {failed_s:.0f} s later, log names '{NODES[rank]}: task {rank}: Killed'; "
                             f"resubmitted job {again} resumed at step {resumed} (step {lost} logged): weights "
                             f"bit-identical, {n} sample keys equal, 0 repeated, 0 skipped")


@pytest.mark.usefixtures("nodes_in_use")
def test_sigstop_rank_on_second_node_fails_within_timeout_naming_it(wds, tmp_path, record_property):
    timeout_s = 15
    job = submit_two_nodes(tmp_path, 1, *overrides(wds), f"strategy.timeout_s={timeout_s}")
    pid, host = rank_pid(tmp_path, 1, job)
    assert host == NODES[1]
    wait_logged_step(tmp_path, 2, job)
    os.kill(pid, signal.SIGSTOP)
    t0 = time.time()
    try:
        info = wait_job(job, timeout=timeout_s + 120)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)  # a stopped process the job left behind
        except ProcessLookupError:
            pass
    failed_s = time.time() - t0
    log = logs(tmp_path, job)
    assert info["JobState"] == "FAILED", (info, log[-4000:])
    assert failed_s < timeout_s + 45, failed_s
    # From its heartbeat (stale: it froze), e.g. "rank 1 on bigdit-n2 (pid 8219) last finished step 2, 19 s ago,
    # in ... 18 s ago: it hangs there, or died since; see <its log>" (a pid on another node cannot be checked).
    named = re.search(rf"rank 1 on {NODES[1]} \(pid {pid}\) [^\n]*(hangs there, or died since|frozen or gone); "
                      rf"see \S+_1_log.out", log)
    assert named, log[-4000:]
    summary(record_property, f"fault 6: SIGSTOP rank 1 on {host}, strategy.timeout_s={timeout_s}: job {job} FAILED "
                             f"{failed_s:.0f} s later; rank 0 names it: '{named.group(0)[:160]}'")


@pytest.fixture
def nodes_in_use(two_nodes):
    """No test takes a node away while these run (tests/test_multinode.py holds the nodes alike)."""
    with holding_nodes():
        yield


@pytest.fixture
def nodes_alone(two_nodes):
    """The nodes to this test alone: it takes one away."""
    with holding_nodes(exclusive=True):
        yield


@pytest.mark.usefixtures("nodes_alone")
def test_lost_node_requeues_and_resumes_exactly_once_back(wds, reference, tmp_path, record_property):
    job = submit_two_nodes(tmp_path, 1, *overrides(wds))
    wait_logged_step(tmp_path, 3, job)
    # The node goes: every process in its namespace (slurmd, the job step, the rank), then SLURM marks it down.
    pids = subprocess.run(["ip", "netns", "pids", NODES[1]], capture_output=True, text=True).stdout.split()
    for pid in pids:
        os.kill(int(pid), signal.SIGKILL)
    t0 = time.time()
    subprocess.run(["scontrol", "update", f"nodename={NODES[1]}", "state=down", "reason=test: node lost"],
                   check=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # SLURM requeues the job (--requeue): pending again, one restart; or ends it
        info = job_info(job)
        if int(info.get("Restarts", 0)) >= 1 and info.get("JobState") == "PENDING":
            break
        if info.get("JobState") in FINAL_STATES:
            break
        time.sleep(0.5)
    seen = f"{info.get('JobState')} ({info.get('Reason')}, restarts {info.get('Restarts')})"
    requeued_s = time.time() - t0
    up = subprocess.run([str(REPO / "launchers" / "slurm_cluster.sh"), "nodes=2"], capture_output=True, text=True,
                        timeout=120)
    assert up.returncode == 0, up.stdout + up.stderr
    state = subprocess.run(["sinfo", "-h", "-n", NODES[1], "-o", "%T"], capture_output=True, text=True).stdout
    assert state.strip() in ("idle", "mixed", "allocated"), state  # back, and responding (no '*')
    resumed_job = job
    final = wait_job(job, timeout=300) if int(info.get("Restarts", 0)) >= 1 else None
    if final is None or final["JobState"] != "COMPLETED":  # SLURM ended it, or failed the requeued allocation too
        if final is not None:
            seen += f", requeued run {final['JobState']}"
        resumed_job = submit_two_nodes(tmp_path, 1, *overrides(wds))  # SLURM's call: the user resubmits
        final = wait_job(resumed_job, timeout=300)
    log = logs(tmp_path, resumed_job)
    assert final["JobState"] == "COMPLETED", (final, log[-4000:])
    resumed = int(re.search(r"resumed at step (\d+)", log).group(1))
    assert_same_run(tmp_path, reference, exact=True)
    n = assert_same_keys(tmp_path, reference)
    summary(record_property, f"fault 7: node {NODES[1]} lost after step 3 (its {len(pids)} processes killed, set "
                             f"down): job {job} {seen} after {requeued_s:.0f} s; node back, job {resumed_job} "
                             f"resumed at step {resumed}: weights bit-identical, {n} sample keys equal")
