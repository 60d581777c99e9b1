"""Jobs over two real SLURM nodes (``launchers/slurm_cluster.sh nodes=2``: two slurmd in their own network, UTS,
mount and IPC namespaces on a bridge), gloo across the bridge, against the same runs on one node.

- 2 nodes x 1 task, DeepSpeed ZeRO-3, from MDS shards (streaming coordinates the ranks of each node through
  that node's own shared memory, LOCAL_WORLD_SIZE=1), preempted (``scancel --signal=USR2``) mid-run: it
  checkpoints, requeues itself and resumes; losses, final EMA and raw weights and every sample key equal a
  2-process run on one node.
- 2 nodes x 2 tasks, FSDP2 hybrid sharding (``strategy.shard_size=2``: shards within a node, replicas across),
  from WebDataset shards: equal to a 4-process run on one node.
- ``tools/encode_latents.py`` and ``tools/cache_text.py`` as 2-node jobs write the shards one process writes.

Both check where the launcher put every rank: MASTER_ADDR is the first node, LOCAL_RANK/LOCAL_WORLD_SIZE are
per node. Skipped (with the reason) only without root; the nodes are left up for the rest of the session.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from bigdit.data.shards import shard_io

from multinode import (NODES, ENCODE, assert_same_keys, assert_same_run, holding_nodes, submit, submit_two_nodes,
                       summary, wait_logged_step)
from test_slurm import assert_same_shards, cache_text_reference, logs, run_script, wait_job

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def nodes_in_use(two_nodes):
    """No test of tests/test_faults_nodes.py takes a node away while these run."""
    with holding_nodes():
        yield


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    """320 digits in 8 shards written by one encoder process (WebDataset), and the same as MDS."""
    base = tmp_path_factory.mktemp("node-shards")
    run_script("tools/encode_latents.py", *ENCODE, f"out={base / 'wds'}", timeout=120)
    run_script("tools/shards.py", "convert", str(base / "wds"), str(base / "mds"), timeout=120)
    return {"wds": base / "wds", "mds": base / "mds"}


def zero3_mds(shards) -> list[str]:
    # Fixed canonical nodes: streaming's default (the node count) would give 1 and 2 nodes other batches.
    return ["strategy=deepspeed", "strategy.zero_stage=3", "data=mds", f"data.root={shards['mds']}",
            "data.num_canonical_nodes=2"]


def hsdp_wds(shards) -> list[str]:
    return ["strategy=fsdp2", "strategy.shard_size=2", "data=wds", f"data.root={shards['wds']}"]


def one_node(run_dir: Path, tasks: int, *overrides: str) -> Path:
    out = submit(run_dir, "launcher=local", f"launcher.tasks_per_node={tasks}", *overrides).stdout
    assert "finished" in out, out
    return run_dir


def assert_placement(log: str, job: str, tasks_per_node: int) -> None:
    """Every rank says where it runs: rank r on node r // tasks_per_node, local rank r % tasks_per_node, all
    with the first node as MASTER_ADDR."""
    world = 2 * tasks_per_node
    for rank in range(world):
        line = (rf"\[bigdit\] rank {rank}/{world} on {NODES[rank // tasks_per_node]} \(SLURM job {job}, restart 0\): "
                rf"MASTER_ADDR={NODES[0]} MASTER_PORT=\d+ LOCAL_RANK={rank % tasks_per_node} "
                rf"LOCAL_WORLD_SIZE={tasks_per_node}")
        assert re.search(line, log), (line, log[-3000:])


def test_two_nodes_idle_and_srun_runs_on_both(two_nodes, record_property):
    state = subprocess.run(["sinfo", "-h", "-N", "-p", "two", "-o", "%N %T"], capture_output=True, text=True).stdout
    states = dict(line.split() for line in state.splitlines())
    assert sorted(states) == list(NODES) and all(s in ("idle", "mixed", "allocated") for s in states.values()), state
    names = subprocess.run(["srun", "-p", "two", "-N2", "-n2", "hostname"], capture_output=True, text=True,
                           timeout=60).stdout.split()
    assert sorted(names) == list(NODES), names
    summary(record_property, f"sinfo: {' '.join(state.split())}; srun -N2 hostname: {' '.join(sorted(names))}")


def test_2x1_zero3_mds_preempted_resumes_and_equals_one_node(two_nodes, shards, tmp_path, record_property):
    reference = one_node(tmp_path / "one-node", 2, *zero3_mds(shards))
    run = tmp_path / "two-nodes"
    job = submit_two_nodes(run, 1, *zero3_mds(shards))
    wait_logged_step(run, 3, job)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)  # what a preempting scheduler sends
    info = wait_job(job, timeout=300)
    log = logs(run, job)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == 1, (info, log[-4000:])
    step = int(re.search(r"signal received, checkpoint at step (\d+)", log).group(1))
    assert f"resumed at step {step}" in log, log[-4000:]
    assert_placement(log, job, 1)
    assert_same_run(run, reference)
    n = assert_same_keys(run, reference)
    summary(record_property, f"2x1 ZeRO-3 MDS job {job}: preempted at step {step}, requeued, resumed; losses, "
                             f"EMA/raw weights and {n} sample keys equal a 1-node 2-process run")


def test_2x2_fsdp2_hybrid_wds_equals_one_node(two_nodes, shards, tmp_path, record_property):
    reference = one_node(tmp_path / "one-node", 4, *hsdp_wds(shards))
    run = tmp_path / "two-nodes"
    job = submit_two_nodes(run, 2, *hsdp_wds(shards))
    info = wait_job(job, timeout=300)
    log = logs(run, job)
    assert info["JobState"] == "COMPLETED", (info, log[-4000:])
    assert_placement(log, job, 2)
    assert_same_run(run, reference)
    n = assert_same_keys(run, reference)
    summary(record_property, f"2x2 FSDP2 shard_size=2 WDS job {job}: losses, EMA/raw weights and {n} sample keys "
                             f"equal a 1-node 4-process run")


def test_offline_tools_as_two_node_jobs_equal_one_process(two_nodes, shards, caption_tars, tiny_clip, tmp_path,
                                                          record_property):
    job_launcher = ["launcher=slurm", "launcher.partition=two", "launcher.nodes=2", "launcher.gpus_per_node=0",
                    "launcher.tasks_per_node=1", "launcher.time_min=5", "launcher.wait=true"]
    out = tmp_path / "encoded"
    text = run_script("tools/encode_latents.py", *ENCODE, f"out={out}", *job_launcher, timeout=400).stdout
    job = re.search(r"submitted SLURM job (\d+)", text).group(1)
    assert_same_shards(out, shards["wds"])
    for rank in (0, 1):  # slice r of 2 on node r
        log = (out / "submitit" / f"{job}_{rank}_log.out").read_text()
        assert f"encode_latents slice {rank}/2 on {NODES[rank]}" in log, log[-2000:]
        assert f"rank {rank}/2: 320 images in 8 shards, 4 shard(s)" in log, log[-2000:]

    common = cache_text_reference(caption_tars, tiny_clip, tmp_path)
    text = run_script("tools/cache_text.py", *common, f"out={tmp_path / 'job'}", *job_launcher, timeout=400).stdout
    text_job = re.search(r"submitted SLURM job (\d+)", text).group(1)
    manifest = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert json.loads((tmp_path / "job" / "manifest.json").read_text()) == manifest
    for shard in manifest["shards"]:
        a, b = (list(shard_io("wds").read_shard(tmp_path / d, shard["name"])) for d in ("one", "job"))
        assert [s["key"] for s in a] == [s["key"] for s in b]
        for x, y in zip(a, b):  # float16 tokens from two processes' CLIP forwards
            np.testing.assert_allclose(x["clip_tokens"].astype(np.float32), y["clip_tokens"].astype(np.float32),
                                       atol=2e-3)
    for rank in (0, 1):
        log = (tmp_path / "job" / "submitit" / f"{text_job}_{rank}_log.out").read_text()
        assert f"cache_text slice {rank}/2 on {NODES[rank]}" in log, log[-2000:]
    summary(record_property, f"encode_latents job {job} and cache_text job {text_job} on 2 nodes: the same shards "
                             f"as one process")
