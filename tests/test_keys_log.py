"""``data.record_keys``: the loaders log the sample keys of every micro-batch they hand to the training loop."""

from __future__ import annotations

import json

import pytest

from bigdit.batching import BatchPlan
from bigdit.data import keys_log
from bigdit.data.wds import WdsLoader

from conftest import REPO


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """64 digits in 2 WebDataset shards, written by the real encoder in this process."""
    import sys

    from hydra import compose, initialize_config_dir

    from bigdit.train import CONFIG_DIR

    sys.path.insert(0, str(REPO / "tools"))
    import encode_latents

    out = tmp_path_factory.mktemp("keys-shards")
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("encode_latents", overrides=["input=sklearn:digits", f"out={out}", "limit=64", "shard_size=32",
                                                   "num_workers=0", "progress=false"])
    encode_latents.run(cfg)
    return str(out)


def test_wds_loader_logs_the_keys_it_yields_per_step_and_micro_batch(shards, tmp_path):
    plan = BatchPlan(16, 1, 8)  # one rank, 2 micro-batches of 8 per step
    logged = WdsLoader(shards, plan, 0, seed=0, num_workers=0, record_keys=True, keys_dir=str(tmp_path / "keys"))
    plain = WdsLoader(shards, plan, 0, seed=0, num_workers=0)
    want = [(step, micro, raw["key"]) for step in (0, 1) for micro, raw in enumerate(plain.raw_micro_batches(step))]
    for step in (0, 1):
        assert len(list(logged.micro_batches(step))) == 2
    lines = [json.loads(line) for line in (tmp_path / "keys" / "rank-00000.jsonl").read_text().splitlines()]
    assert [(r["step"], r["micro"], r["keys"]) for r in lines] == want
    assert len({k for r in lines for k in r["keys"]}) == 32  # 4 micro-batches of 8 distinct samples
    assert keys_log(False, None, 0) is None  # off by default: no log


def test_record_keys_without_a_directory_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"data.record_keys=true needs data.keys_dir"):
        keys_log(True, None, 0)
