"""Fault injection: real processes, real signals, real files (a real full disk, real damaged files, real
non-finite data). Each case records a one-line summary (``fault`` user property) that `make test` prints at the
end under "Faults survived"; README's table carries them. The two-node cases are in test_faults_nodes.py.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from bigdit.batching import BatchPlan
from bigdit.checkpoint import ABANDONED, CheckpointError, latest_checkpoint
from bigdit.data.schema import SchemaError, ShardError
from bigdit.export import consolidated_weights
from bigdit.metrics import read_metrics
from bigdit.train import train

from conftest import REPO
from test_train import TINY, assert_same_tensors, final_state, make_cfg

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def probe(point: str, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tests/fault_probe.py", point, *TINY, f"run.dir={run_dir}", *overrides],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """8 uninterrupted steps, checkpoints at 4 and 8, in a process like the faulty ones (same thread count)."""
    run_dir = tmp_path_factory.mktemp("faults") / "reference"
    proc = probe("none", run_dir, "run.steps=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("point", ["before_rename", "before_pointer", "during_prune"])
def test_kill_9_while_a_checkpoint_is_written(point, reference_run, tmp_path, record_property):
    run_dir = tmp_path / "run"
    killed = probe(point, run_dir, "run.steps=8", "run.keep_ckpts=1")
    assert killed.returncode == -9, killed.stderr[-3000:]
    latest = latest_checkpoint(run_dir / "checkpoints")
    # the pointer moves last: before it moved the previous checkpoint is the latest, complete; after, the new one
    assert latest.name == ("step-000000008" if point == "during_prune" else "step-000000004")
    again = probe("none", run_dir, "run.steps=8", "run.keep_ckpts=1")  # the same command, rerun
    assert again.returncode == 0, again.stderr[-3000:]
    a, b = final_state(reference_run), final_state(run_dir)
    assert_same_tensors(a["model"], b["model"])
    assert_same_tensors(a["ema"], b["ema"])
    record_property("fault", f"kill -9 during a checkpoint ({point}): latest={latest.name} intact, rerun resumed, "
                             f"final weights bit-identical")


def fill(directory: Path, leave_bytes: int) -> Path:
    """Fill the file system of ``directory`` until ``leave_bytes`` are free."""
    filler = directory / "filler"
    free = shutil.disk_usage(directory).free
    with open(filler, "wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(0, free - leave_bytes))
    return filler


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs of its own (root only): a disk that really fills up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_disk_full_during_a_checkpoint(small_disk, tmp_path, monkeypatch, record_property):
    run_dir = small_disk / "run"
    train(make_cfg(run_dir, "run.steps=4"))
    size = sum(json.loads((run_dir / "checkpoints" / "step-000000004" / "files.json").read_text()).values())
    filler = fill(small_disk, size // 3)
    # a disk that looks roomy at the check and fills during the write (another job writing): a real ENOSPC
    from bigdit.checkpoint import Checkpointer

    monkeypatch.setattr(Checkpointer, "_space_problem", lambda self: None)
    with pytest.raises(CheckpointError, match=rf"{run_dir / 'checkpoints'}.*filled up.*bytes needed"):
        train(make_cfg(run_dir, "run.steps=8"))
    monkeypatch.undo()
    assert latest_checkpoint(run_dir / "checkpoints").name == "step-000000004"
    assert not list((run_dir / "checkpoints").glob(".tmp-*")) and not list((run_dir / "checkpoints").glob(".latest*"))
    # the check before writing: the same disk, named with the bytes needed, before the partial write
    with pytest.raises(CheckpointError, match=rf"not enough disk space.*{run_dir / 'checkpoints'}: about {size:,}"):
        train(make_cfg(run_dir, "run.steps=8"))
    filler.unlink()
    train(make_cfg(run_dir, "run.steps=8"))  # space freed: the same command resumes and finishes
    assert final_state(run_dir)["step"] == 8
    record_property("fault", f"disk full during a checkpoint (4 MiB tmpfs): clear error with the directory and "
                             f"{size:,} bytes needed, step 4 intact, resumed after freeing space")


CONSTANT = "optim.schedule=constant"  # the lr does not depend on run.steps: 8 steps are the start of 12


@pytest.fixture(scope="module")
def straight_12(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    train(make_cfg(run_dir, "run.steps=12", CONSTANT))
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "overwritten"])
def test_damaged_latest_checkpoint_names_the_file_and_the_way_back(damage, straight_12, tmp_path, record_property):
    constant = CONSTANT
    run_dir = tmp_path / "run"
    train(make_cfg(run_dir, "run.steps=8", constant))
    state = run_dir / "checkpoints" / "step-000000008" / "state.pt"
    data = state.read_bytes()
    if damage == "truncated":
        state.write_bytes(data[: len(data) // 2])
    elif damage == "overwritten":  # same size, the start of the archive garbage (the size check cannot see it)
        state.write_bytes(b"\xff" * 4096 + data[4096:])
    with pytest.raises(CheckpointError, match=rf"(?s){state}.*run.resume_step=4"):
        train(make_cfg(run_dir, "run.steps=12", constant))
    train(make_cfg(run_dir, "run.steps=12", constant, "run.resume_step=4"))
    assert (run_dir / "checkpoints" / ABANDONED / "step-000000008").is_dir()  # moved aside, not deleted
    a, b = final_state(straight_12), final_state(run_dir)
    assert_same_tensors(a["model"], b["model"])
    assert_same_tensors(a["ema"], b["ema"])
    record_property("fault", f"{damage} state.pt in the latest checkpoint: refused naming the file and "
                             f"run.resume_step=4; resuming from step 4 equals an uninterrupted run")


class Payload:
    """Unpickling it would run code: create a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.slow
def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, record_property):
    train(make_cfg(tmp_path, "run.steps=4"))
    state = latest_checkpoint(tmp_path / "checkpoints") / "state.pt"
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    good = torch.load(state, weights_only=True)
    torch.save({**good, "extra": Payload(marker)}, state, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    (state.parent / "files.json").unlink()  # as if written by hand, sizes unknown
    with pytest.raises(CheckpointError, match=rf"(?s){state}.*cannot be read"):
        train(make_cfg(tmp_path, "run.steps=8"))
    assert not marker.exists()
    record_property("fault", "a checkpoint carrying a pickled callable: refused (weights_only), no code run")


def with_inf_sample(src: Path, dst: Path) -> str:
    """Copy shard directory ``src`` to ``dst`` with the first sample of shard 0 all inf; return its key."""
    shutil.copytree(src, dst)
    shard = dst / "shard-000000.tar"
    with tarfile.open(shard) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    key = members[0][0].name.split(".")[0]
    with tarfile.open(shard, "w") as t:
        for m, data in members:
            if m.name == f"{key}.moments.npy":
                a = np.load(io.BytesIO(data))
                buf = io.BytesIO()
                np.save(buf, np.full_like(a, np.inf))
                data = buf.getvalue()
                m.size = len(data)
            t.addfile(m, io.BytesIO(data))
    return key


@pytest.fixture
def inf_shards(digit_shards, tmp_path) -> Path:
    root = tmp_path / "inf"
    with_inf_sample(digit_shards["wds"], root)
    return root


def shard_run(root: Path, *overrides: str) -> list[str]:
    return ["data=wds", f"data.root={root}", "data.num_workers=0", "data.flip=false", *overrides]


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_and_counted(inf_shards, tmp_path, record_property):
    # 480 samples, 16 per step: 30 steps are one epoch, which meets the inf sample exactly once
    train(make_cfg(tmp_path / "skip", *shard_run(inf_shards), "run.steps=30", "run.ckpt_every=100"))
    records = read_metrics(tmp_path / "skip" / "metrics.jsonl")
    nan_step = next(r["step"] for r in records if r["skipped_steps"] == 1)
    assert records[-1]["skipped_steps"] == 1 and records[-1]["step"] == 30
    # logged every step: the skipped step's record has no applied step to average (NaN), every other is finite
    assert [r["step"] for r in records if not np.isfinite(r["loss"])] == [nan_step]
    state = final_state(tmp_path / "skip")
    assert all(torch.isfinite(v).all() for v in [*state["model"].values(), *state["ema"].values()])

    with pytest.raises(SystemExit, match=rf"step {nan_step}: 1 consecutive.*run.nonfinite=stop"):
        train(make_cfg(tmp_path / "stop", *shard_run(inf_shards), "run.steps=30", "run.nonfinite=stop"))
    stopped = final_state(tmp_path / "stop")
    assert stopped["step"] == nan_step and all(torch.isfinite(v).all() for v in stopped["model"].values())
    record_property("fault", f"an inf latent in a shard: step {nan_step} skipped on every rank (skipped_steps=1), "
                             f"weights finite; run.nonfinite=stop stops there with the good state checkpointed")


@pytest.mark.slow
def test_an_exploding_lr_stops_after_max_skipped_with_the_last_good_state(tmp_path, record_property):
    with pytest.raises(SystemExit, match=r"3 consecutive step\(s\).*run.max_skipped=3.*run.resume_step"):
        train(make_cfg(tmp_path, "run.steps=200", "optim.lr=1e6", "run.max_skipped=3", "run.ckpt_every=1",
                       "run.keep_ckpts=200"))
    records = read_metrics(tmp_path / "metrics.jsonl")
    state = final_state(tmp_path)
    assert records[-1]["skipped_steps"] >= 3 and state["step"] == records[-1]["step"] < 200
    assert all(torch.isfinite(v).all() for v in state["model"].values())  # no NaN weights over the good ones
    record_property("fault", f"optim.lr=1e6: {records[-1]['skipped_steps']} non-finite steps skipped, stopped at "
                             f"step {state['step']} after run.max_skipped=3 in a row, finite weights kept")


@pytest.mark.slow
def test_skips_keep_ranks_in_step_under_zero2(inf_shards, tmp_path, record_property):
    # The inf sample lands in one rank's share only; every rank must skip that step (DeepSpeed's own overflow
    # check reads the global norm) and the ranks end with the same, finite weights.
    overrides = [*TINY, f"run.dir={tmp_path}", *shard_run(inf_shards), "run.steps=30", "run.ckpt_every=100",
                 "strategy=deepspeed", "strategy.zero_stage=2"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "bigdit.train", *overrides], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert records[-1]["skipped_steps"] == 1 and records[-1]["step"] == 30
    ema = consolidated_weights(latest_checkpoint(tmp_path / "checkpoints"),
                               OmegaConf.load(tmp_path / "config.yaml").model)
    assert all(torch.isfinite(v).all() for v in ema.values())
    record_property("fault", "an inf latent on one of 2 ZeRO-2 ranks: the step skipped on both, no hang, "
                             "skipped_steps=1, finite EMA")


@pytest.mark.slow
def test_data_faults_are_named(digit_shards, tmp_path, record_property):
    plan_overrides = ["run.steps=30", "run.ckpt_every=100"]
    missing = tmp_path / "missing"
    shutil.copytree(digit_shards["wds"], missing)
    (missing / "shard-000007.tar").unlink()
    with pytest.raises((ShardError, FileNotFoundError), match="shard-000007"):
        train(make_cfg(tmp_path / "r1", *shard_run(missing), *plan_overrides))

    garbled = tmp_path / "garbled"
    key = with_inf_sample(digit_shards["wds"], garbled)
    shard = garbled / "shard-000000.tar"
    with tarfile.open(shard) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    with tarfile.open(shard, "w") as t:
        for m, data in members:
            garbage = m.name == f"{key}.moments.npy"
            t.addfile(m, io.BytesIO(b"\x93NUMPY garbage" + data[14:] if garbage else data))
    with pytest.raises(ShardError, match=rf"shard-000000.*{key}"):
        train(make_cfg(tmp_path / "r2", *shard_run(garbled), *plan_overrides))

    changed = tmp_path / "changed"
    shutil.copytree(digit_shards["wds"], changed)
    train(make_cfg(tmp_path / "r3", *shard_run(changed), "run.steps=4"))
    shutil.rmtree(changed)
    shutil.copytree(digit_shards["wds"], changed)
    manifest = changed / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"count": 20', '"count":20', 1))  # re-encoded: other bytes
    with pytest.raises(SchemaError, match=r"changed since the checkpoint.*new run.dir"):
        train(make_cfg(tmp_path / "r3", *shard_run(changed), "run.steps=8"))
    record_property("fault", "missing shard, garbled member, shards changed under a run: each named before "
                             "compute or at the sample (shard and key)")


@pytest.mark.parametrize("overrides,error,message", [
    (["model.name=DiT-XXL/2"], KeyError, "unknown model 'DiT-XXL/2'; registered models"),
    (["run.nonfinite=ignore"], ValueError, "run.nonfinite must be one of skip, stop, off"),
    (["run.resume_step=3"], CheckpointError, "run.resume_step=3: there is no"),
])
def test_bad_configuration_is_refused_before_compute(overrides, error, message, tmp_path):
    if "run.resume_step=3" in overrides:
        train(make_cfg(tmp_path, "run.steps=4"))
    with pytest.raises(error, match=message):
        train(make_cfg(tmp_path, "run.steps=8", *overrides))


def test_unwritable_run_dir_and_indivisible_batch_are_refused(tmp_path, record_property):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ValueError, match=rf"run.dir={blocker / 'run'} cannot be written: {blocker} is not a directory"):
        train(make_cfg(blocker / "run", "run.steps=2"))
    with pytest.raises(ValueError, match="run.global_batch=15 is not divisible by 2 ranks"):
        BatchPlan.from_config(15, None, 2)
    record_property("fault", "bad configuration (unknown model, run.dir not writable, batch not divisible, "
                             "resume step missing, bad run.nonfinite): refused before compute with the fix")
