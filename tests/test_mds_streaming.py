"""data=mds through MosaicML Streaming: in real ranks (torchrun, 2 ranks x 2 workers) a run interrupted
mid-epoch and resumed from rank 0's saved state sees exactly the sample keys of an uninterrupted run,
every rank reads the same number of micro-batches, and stale shared memory is cleaned at start; a resume
saved at an epoch's end goes on with the next epoch; a corrupt shard read in a worker names shard and key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


from conftest import REPO


# Run by every rank. 480 samples, 2 ranks x 2 workers x micro-batch 7: an epoch is 476 samples (17 x 28),
# 34 micro-batches = 17 steps of 2 per rank; the runs cross into epoch 1.
RANK_SCRIPT = r'''
import json, os, sys
from multiprocessing import resource_tracker, shared_memory

import bigdit  # noqa: F401
import torch
import torch.distributed as dist
from bigdit.batching import BatchPlan
from bigdit.data.mds import MdsLoader

root, out, steps, crash = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group("gloo")
from streaming.base.constant import LOCALS
from streaming.base.shared.prefix import _get_path

stale = _get_path(0, LOCALS)
if rank == 0:  # what a crashed streaming run leaves behind
    shm = shared_memory.SharedMemory(stale, create=True, size=64)
    shm.buf[:5] = b"STALE"
    resource_tracker.unregister(shm._name, "shared_memory")
    shm.close()
dist.barrier()
plan = BatchPlan(global_batch=world * 14, world_size=world, micro_batch=7)
make = lambda: MdsLoader(root, plan, rank, seed=5, num_workers=2)

def read(loader, steps):
    keys, epochs, xs = [], [], []
    for step in steps:
        for raw in loader.raw_micro_batches(step):
            assert len(raw["key"]) == 7 and raw["x"].shape == (7, 1, 8, 8)
            keys.append(raw["key"])
            epochs.append(raw["epoch"])
            xs.append(raw["x"].double().sum().item())
    return {"keys": keys, "epochs": epochs, "x": xs}

straight = make()
result = {}
if rank == 0:
    try:
        shm = shared_memory.SharedMemory(stale)
        result["stale_left"] = bytes(shm.buf[:5]) == b"STALE"
        shm.close()
    except FileNotFoundError:
        result["stale_left"] = False
result["straight"] = read(straight, range(steps))
straight.close()
del straight
crashed = make()
result["crashed"] = read(crashed, range(crash))
state = crashed.state_dict()
crashed.close()
del crashed
states = [None] * world
dist.all_gather_object(states, state)
result["states"] = states
resumed = make()
resumed.load_state_dict(states[0])  # only rank 0's state is in the checkpoint
result["resumed"] = read(resumed, range(crash, steps))
result["resumed_state"] = resumed.state_dict()
resumed.close()
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump(result, f)
dist.barrier()
dist.destroy_process_group()
'''


@pytest.fixture(scope="module")
def mds_root(digit_shards) -> Path:
    return digit_shards["mds"]


@pytest.mark.slow
def test_two_ranks_two_workers_resume_exactly_with_equal_batches(mds_root, tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    steps, crash = 22, 9  # an epoch is 17 steps
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(mds_root), str(tmp_path), str(steps), str(crash)]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["stale_left"] is False  # the stale block was removed before streaming started

    # equal micro-batches on every rank: 34 in epoch 0, then epoch 1 on all ranks at the same step
    for r in ranks:
        assert r["straight"]["epochs"] == [0] * 34 + [1] * (2 * steps - 34)
    epoch0 = [k for r in ranks for batch in r["straight"]["keys"][:34] for k in batch]
    assert len(epoch0) == len(set(epoch0)) == 476  # each sample at most once per epoch, 476 of 480
    assert ranks[0]["straight"]["keys"][34:] != ranks[0]["straight"]["keys"][:2 * steps - 34]  # reshuffled

    # the interrupted run read the first steps; the state is the same on every rank (global progress)
    assert ranks[0]["states"][0] == ranks[0]["states"][1]
    assert ranks[0]["states"][0]["streaming"]["sample_in_epoch"] == crash * 28
    for r in ranks:
        assert r["crashed"]["keys"] == r["straight"]["keys"][: 2 * crash]
        # resumed from rank 0's state: exactly the rest of the uninterrupted run, latents included
        assert r["resumed"]["keys"] == r["straight"]["keys"][2 * crash :]
        assert r["resumed"]["x"] == r["straight"]["x"][2 * crash :]
    assert ranks[0]["resumed_state"]["streaming"]["epoch"] == 1
    assert ranks[0]["resumed_state"]["step"] == steps


def keys_of(loader, steps) -> list[str]:
    return [k for step in steps for raw in loader.raw_micro_batches(step) for k in raw["key"]]


def test_resume_saved_at_the_end_of_an_epoch(mds_root):
    from bigdit.batching import BatchPlan
    from bigdit.data.mds import MdsLoader

    plan = BatchPlan(global_batch=32, world_size=1, micro_batch=16)
    make = lambda: MdsLoader(str(mds_root), plan, 0, seed=1, num_workers=2)  # noqa: E731
    straight = make()
    full = keys_of(straight, range(17))  # an epoch is 480 samples = 15 steps
    straight.close()
    assert sorted(full[:480]) == sorted(set(full[:480])) and full[480:] != full[:64]
    crashed = make()
    keys_of(crashed, range(15))
    state = crashed.state_dict()
    crashed.close()
    assert state["streaming"]["epoch"] == 0 and state["streaming"]["sample_in_epoch"] == 480
    resumed = make()
    resumed.load_state_dict(state)
    with pytest.raises(ValueError, match="saved before step 15"):
        next(resumed.micro_batches(14))
    assert keys_of(resumed, range(15, 17)) == full[480:]
    resumed.close()


def test_corrupt_shard_in_a_worker_names_shard_and_key(mds_root, tmp_path):
    import shutil

    from bigdit.batching import BatchPlan
    from bigdit.data.mds import MdsLoader
    from bigdit.data.schema import ShardError

    root = tmp_path / "bad"
    shutil.copytree(mds_root, root)
    target = root / "shard-000007" / "shard.00000.mds"
    target.write_bytes(target.read_bytes()[:-300])  # the last samples cut off
    loader = MdsLoader(str(root), BatchPlan(16, 1, 16), 0, seed=0, num_workers=2)
    with pytest.raises(ShardError, match=r"shard-000007/shard.00000.mds: sample 1\d, key .*'digit00\d+'.*"
                                         r"skip_bad_samples"):
        keys_of(loader, range(30))
    loader.close()
