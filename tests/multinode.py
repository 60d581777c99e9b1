"""What tests/test_multinode.py and tests/test_faults_nodes.py share: the tiny run, the 2-node jobs, the checks.

The two nodes are ``bigdit-n1`` and ``bigdit-n2`` of partition ``two``, which ``launchers/slurm_cluster.sh
nodes=2`` runs as two more slurmd in their own network, UTS, mount and IPC namespaces (see that script); the
``two_nodes`` fixture (tests/conftest.py) brings them up. Every run is the tiny demo DiT for ``STEPS`` steps
from digit shards made by the real encoder, with ``data.record_keys=true`` so the sample keys every rank
consumed can be compared between runs (:func:`keys_seen`). The SLURM helpers (job state, waiting, logs,
weights) are test_slurm.py's.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from test_slurm import FINAL_STATES, job_info, logs, run_script, weights

NODES = ("bigdit-n1", "bigdit-n2")
STEPS = 8
BASE = [
    "experiment=demo", "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "run.global_batch=16",
    "run.log_every=1", "run.ckpt_every=2", "ema.decay=0.9", "optim.warmup_steps=0", "optim.schedule=constant",
    "optim.lr=2e-3", f"run.steps={STEPS}", "data.num_workers=0", "data.record_keys=true",
]
ENCODE = ["input=sklearn:digits", "vae=none", "limit=320", "shard_size=40", "progress=false"]  # 8 shards of 40


@contextlib.contextmanager
def holding_nodes(exclusive: bool = False):
    """Hold the two nodes while a test uses them: shared by tests whose jobs only run there, exclusive for a test
    that takes a node away (the two test files may run at once, in two pytest workers)."""
    with open("/tmp/bigdit-two-nodes.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield


def two_node_launcher(tasks_per_node: int) -> list[str]:
    """The launcher overrides of a job of 2 nodes x ``tasks_per_node`` CPU tasks on partition ``two``."""
    return ["launcher=slurm", "launcher.partition=two", "launcher.nodes=2", "launcher.gpus_per_node=0",
            f"launcher.tasks_per_node={tasks_per_node}", "launcher.time_min=5"]


def submit(run_dir: Path, *overrides: str, timeout: float = 400) -> subprocess.CompletedProcess:
    """``launchers/submit.py`` with the tiny run's overrides (``launcher=local`` ones wait for the job)."""
    return run_script("launchers/submit.py", *BASE, f"run.dir={run_dir}", *overrides, timeout=timeout)


def submit_two_nodes(run_dir: Path, tasks_per_node: int, *overrides: str) -> str:
    """Submit the tiny run as a 2-node job; its id."""
    out = submit(run_dir, *two_node_launcher(tasks_per_node), *overrides).stdout
    match = re.search(r"submitted SLURM job (\d+)", out)
    assert match, out
    return match.group(1)


def wait_logged_step(run_dir: Path, step: int, job: str | None = None, timeout: float = 180) -> None:
    """Until ``metrics.jsonl`` has a record of ``step`` (rank 0 writes one per step: ``run.log_every=1``)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r["step"] >= step for r in records(run_dir)):
            return
        if job is not None:
            info = job_info(job)
            assert info.get("JobState") not in FINAL_STATES, (info, logs(run_dir, job)[-3000:])
        time.sleep(0.2)
    pytest.fail(f"{run_dir} did not log step {step} within {timeout}s")


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being written
            break
    return out


def heartbeats(run_dir: Path) -> dict[int, dict]:
    """The ranks' heartbeat records (host, pid, last step), by rank."""
    beats = {}
    for path in (run_dir / "heartbeats").glob("rank-*.json"):
        record = json.loads(path.read_text())
        beats[record["rank"]] = record
    return beats


def keys_seen(run_dir: Path) -> dict[tuple[int, int, int], list[str]]:
    """``{(step, rank, micro-batch): sample keys}`` over the whole run from the loaders' keys logs; a step read
    twice (by an allocation that died before its next checkpoint, then again on resume) counts as read last."""
    seen = {}
    for path in sorted((run_dir / "keys").glob("rank-*.jsonl")):
        rank = int(path.stem.split("-")[1])
        for line in path.read_text().splitlines():
            r = json.loads(line)
            seen[(r["step"], rank, r["micro"])] = r["keys"]
    return seen


def assert_same_keys(run_dir: Path, reference: Path) -> int:
    """The same sample keys at every (step, rank, micro-batch) as ``reference``, none repeated within the
    epoch (these runs stay within one); returns how many samples were compared."""
    got, want = keys_seen(run_dir), keys_seen(reference)
    assert got == want, sorted(set(got.items()) ^ set(want.items()), key=str)[:4]
    flat = [k for keys in got.values() for k in keys]
    assert len(flat) == STEPS * 16 and len(set(flat)) == len(flat), "a sample repeated within the epoch"
    return len(flat)


def assert_same_run(run_dir: Path, reference: Path, exact: bool = False) -> None:
    """One record per step with the reference's loss, and the reference's final EMA and raw weights: to 1e-5,
    or with ``exact`` bit for bit (fp32 on CPU)."""
    got, want = records(run_dir), records(reference)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1)), [r["step"] for r in got]
    losses = np.array([r["loss"] for r in got]), np.array([r["loss"] for r in want])
    if exact:
        np.testing.assert_array_equal(*losses)
    else:
        np.testing.assert_allclose(*losses, rtol=1e-5)
    a, b = weights(run_dir), weights(reference)
    for which in a:
        assert a[which].keys() == b[which].keys()
        for k in a[which]:
            if exact:
                assert torch.equal(a[which][k], b[which][k]), f"{which} {k} differs"
            else:
                torch.testing.assert_close(a[which][k], b[which][k], rtol=1e-5, atol=1e-6, msg=f"{which} {k}")


def summary(record_property, line: str) -> None:
    """One line per checked case, in the JUnit XML (``record_property``; fault cases as ``fault``, which `make test`
    prints under "Faults survived", the others under "Two-node checks") and in ``pytest -rA``'s output."""
    record_property("fault" if line.startswith("fault") else "summary", line)
    print(f"[summary] {line}")
