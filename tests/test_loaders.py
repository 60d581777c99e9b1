"""data=wds and data=mds: micro-batches for the training loop, exact resume (2 ranks, 2 workers), equal
batches per rank, bad-shard handling, fail-fast mismatches, and training from shards."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from bigdit.checkpoint import latest_checkpoint
from bigdit.batching import BatchPlan
from bigdit.data.mds import MdsLoader
from bigdit.data.schema import SchemaError, ShardError
from bigdit.data.wds import WdsLoader
from bigdit.train import CONFIG_DIR, check_model_matches_data, train



LOADERS = {"wds": WdsLoader, "mds": MdsLoader}


@pytest.fixture(scope="module")
def roots(digit_shards) -> dict[str, Path]:
    return digit_shards


def keys_of(loaders, steps) -> list[list[str]]:
    """Per rank, the sample keys of ``steps`` in order."""
    out = [[] for _ in loaders]
    for step in steps:
        for r, loader in enumerate(loaders):
            for raw in loader.raw_micro_batches(step):
                out[r] += raw["key"]
    return out


@pytest.mark.parametrize("fmt", ["wds", "mds"])
def test_micro_batches_feed_the_loop(roots, fmt):
    # data=mds takes its rank from the environment (StreamingDataset): one rank in this process
    plan = BatchPlan(global_batch=32, world_size=2, micro_batch=8) if fmt == "wds" else BatchPlan(16, 1, 8)
    loader = LOADERS[fmt](str(roots[fmt]), plan, rank=plan.world_size - 1, seed=0, num_workers=0)
    assert loader.sample_shape == (1, 8, 8) and loader.num_classes == 10
    batches = list(loader.micro_batches(3))
    assert len(batches) == plan.accum_steps == 2
    for b in batches:
        assert b["x"].shape == (8, 1, 8, 8) and b["x"].dtype == torch.float32
        assert b["y"].shape == (8,) and b["y"].dtype == torch.int64 and 0 <= b["y"].min() <= b["y"].max() <= 9
        assert -1.001 <= b["x"].min() <= b["x"].max() <= 1.001  # vae=none: pixels


@pytest.mark.parametrize("fmt", ["wds"])  # data=mds needs a process per rank: tests/test_mds_streaming.py
def test_resume_sees_exactly_the_uninterrupted_samples(roots, fmt):
    plan = BatchPlan(global_batch=32, world_size=2, micro_batch=8)
    make = lambda: [LOADERS[fmt](str(roots[fmt]), plan, rank=r, seed=3, num_workers=2) for r in range(2)]  # noqa: E731
    straight = make()
    # 24 shards over 2 ranks x 2 workers: 6 shards = 120 samples = 15 micro-batches per stream, 15 steps an epoch
    assert straight[0].batches_per_stream(0) == 15
    full = keys_of(straight, range(20))  # crosses the epoch boundary at step 15
    epoch0 = full[0][: 15 * 16] + full[1][: 15 * 16]
    assert len(epoch0) == len(set(epoch0)) == 480  # every sample once per epoch, equal shares per rank

    crashed = make()
    keys_of(crashed, range(7))
    state = crashed[0].state_dict()  # only rank 0's state is checkpointed
    assert state == crashed[1].state_dict()
    resumed = make()
    for loader in resumed:
        loader.load_state_dict(state)
    rest = keys_of(resumed, range(7, 20))
    assert rest == [k[7 * 16 :] for k in full]
    # latents are drawn from (seed, rank, position): identical after the resume too
    a, b = next(make()[1].micro_batches(16)), next(resumed[1].micro_batches(16))
    assert torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"])


def test_shard_order_depends_on_seed_and_epoch(roots):
    plan = BatchPlan(global_batch=16, world_size=1, micro_batch=16)
    a = WdsLoader(str(roots["wds"]), plan, 0, seed=0, num_workers=0)
    b = WdsLoader(str(roots["wds"]), plan, 0, seed=1, num_workers=0)
    per_epoch = a.batches_per_stream(0)
    (ka,), (kb,) = keys_of([a], range(per_epoch + 1)), keys_of([b], range(1))
    assert ka[:16] != kb and ka[:16] != ka[per_epoch * 16 :]
    assert sorted(ka[: per_epoch * 16]) == sorted(set(ka[: per_epoch * 16]))


@pytest.mark.parametrize("fmt", ["wds", "mds"])
def test_corrupt_shard_stops_or_is_skipped(roots, fmt, tmp_path):
    root = tmp_path / fmt
    shutil.copytree(roots[fmt], root)
    target = root / "shard-000005.tar" if fmt == "wds" else root / "shard-000005" / "shard.00000.mds"
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    plan = BatchPlan(global_batch=32, world_size=1, micro_batch=32)
    loader = LOADERS[fmt](str(root), plan, 0, seed=0, num_workers=0)
    with pytest.raises(ShardError, match=r"shard-000005.*skip_bad_samples"):
        keys_of([loader], range(15))
    skipping = LOADERS[fmt](str(root), plan, 0, seed=0, num_workers=0, skip_bad_samples=True)
    with pytest.warns(UserWarning, match="skipped"):
        (keys,) = keys_of([skipping], range(14))  # the full epoch: 480 // 32 batches
    assert len(keys) == 14 * 32 and skipping.bad_samples > 0


def test_mismatches_fail_before_compute(roots, tmp_path):
    plan = BatchPlan(global_batch=8, world_size=1, micro_batch=8)
    with pytest.raises(SchemaError, match="data=wds"):
        MdsLoader(str(roots["wds"]), plan, 0, seed=0)
    with pytest.raises(ValueError, match="at least 32"):
        WdsLoader(str(roots["wds"]), BatchPlan(64, 8, 8), 0, seed=0, num_workers=4)
    loader = WdsLoader(str(roots["wds"]), plan, 0, seed=0, num_workers=0)
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        model_cfg = compose("train", overrides=["experiment=demo", "model.in_channels=4"]).model
    with pytest.raises(ValueError, match="model.in_channels=1 model.input_size=8"):
        check_model_matches_data(model_cfg, loader)
    stale = tmp_path / "stale"
    shutil.copytree(roots["wds"], stale)
    manifest = stale / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"schema_version": 1', '"schema_version": 0'))
    with pytest.raises(SchemaError, match="schema version 0"):
        WdsLoader(str(stale), plan, 0, seed=0)


def test_training_from_shards_resumes_exactly(roots, tmp_path):
    tiny = ["experiment=demo", "data=digits_wds", f"data.root={roots['wds']}", "model.hidden_size=32", "model.depth=2",
            "model.num_heads=2", "run.global_batch=16", "run.log_every=1", "run.ckpt_every=2", "ema.decay=0.9",
            "optim.warmup_steps=0", "optim.schedule=constant", "data.flip=true"]

    def run(run_dir, steps):
        with initialize_config_dir(CONFIG_DIR, version_base=None):
            train(compose("train", overrides=[*tiny, f"run.dir={run_dir}", f"run.steps={steps}"]))
        return torch.load(latest_checkpoint(run_dir / "checkpoints") / "state.pt", weights_only=False)

    straight = run(tmp_path / "straight", 4)
    run(tmp_path / "crashed", 2)
    resumed = run(tmp_path / "crashed", 4)
    assert resumed["step"] == 4 and resumed["data"]["position"] == 4
    for k, v in straight["model"].items():
        assert torch.equal(v, resumed["model"][k]), k


@pytest.mark.parametrize("fmt", ["wds", "mds"])
def test_remote_shards_are_cached_and_read_the_same(roots, fmt, tmp_path):
    plan = BatchPlan(global_batch=16, world_size=1, micro_batch=8)
    local = LOADERS[fmt](str(roots[fmt]), plan, 0, seed=0, num_workers=2)
    cached = LOADERS[fmt](str(tmp_path / "cache"), plan, 0, seed=0, num_workers=2, remote=str(roots[fmt]))
    assert keys_of([cached], range(3)) == keys_of([local], range(3))
    assert (tmp_path / "cache" / "manifest.json").is_file()
    if fmt == "wds":
        assert 0 < len(list((tmp_path / "cache").glob("shard-*"))) < 24  # only the shards read so far
    else:  # streaming downloads ahead, and its shuffle spreads the first batches over all the tiny shards
        assert (tmp_path / "cache" / "index.json").is_file() and list((tmp_path / "cache").glob("shard-*/*.mds"))
