"""Checkpoints name the strategy that wrote it (strategy.json), which consolidates them offline; checkpoints
from before strategy.json still consolidate. Equality with one-process training is in test_strategies."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from bigdit.checkpoint import STRATEGY_FILE, checkpoint_strategy, latest_checkpoint
from bigdit.export import consolidated_weights

from conftest import REPO
from test_strategies import BASE, STRATEGIES, assert_close_dicts, launch

pytestmark = pytest.mark.slow  # its runs launch torchrun ranks

RUNS = {  # strategy -> (ranks, overrides, what strategy.json must say)
    "ddp": (1, [], {"name": "ddp", "world_size": 1, "precision": "fp32"}),
    "fsdp2": (2, STRATEGIES["fsdp2"], {"name": "fsdp2", "world_size": 2, "precision": "fp32", "shard_size": None}),
    "zero3": (2, STRATEGIES["zero3"], {"name": "deepspeed", "world_size": 2, "precision": "fp32", "zero_stage": 3}),
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_checkpoint_names_its_strategy_and_old_layouts_still_consolidate(name, tmp_path):
    ranks, overrides, meta = RUNS[name]
    launch(tmp_path, ranks, *overrides, "run.steps=2")
    ckpt, model_cfg = latest_checkpoint(tmp_path / "checkpoints"), OmegaConf.load(tmp_path / "config.yaml").model
    assert json.loads((ckpt / STRATEGY_FILE).read_text()) == meta
    new = {which: consolidated_weights(ckpt, model_cfg, which) for which in ("ema", "model")}
    (ckpt / STRATEGY_FILE).unlink()  # as written before strategy.json: told apart by its files
    assert checkpoint_strategy(ckpt) == {"name": meta["name"]}
    for which, weights in new.items():
        assert all(t.dtype == torch.float32 for t in weights.values())
        assert_close_dicts(consolidated_weights(ckpt, model_cfg, which), weights)
    if name == "fsdp2":  # what torch's own offline converter makes of the same DCP checkpoint
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(ckpt, tmp_path / "full.pt")
        full = torch.load(tmp_path / "full.pt", weights_only=True)
        for which, weights in new.items():
            assert_close_dicts(weights, {k: v.float() for k, v in full[which].items()})
    if name == "ddp":  # the state the run held when it saved
        state = torch.load(ckpt / "state.pt", weights_only=True)
        for which, weights in new.items():
            assert_close_dicts(weights, state[which])


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a bigdit checkpoint"):
        checkpoint_strategy(tmp_path)
    with pytest.raises(ValueError, match="which must be"):
        consolidated_weights(tmp_path, OmegaConf.create({}), "optimizer")


def test_resume_under_another_strategy_or_zero_stage_is_refused(tmp_path):
    """ZeRO-1 and ZeRO-2 write the same files: only strategy.json tells them apart, so resuming one as the
    other (or a DDP checkpoint under DeepSpeed) is refused with both layouts named, and the checkpoint stays."""
    launch(tmp_path, 1, *STRATEGIES["zero1"], "run.steps=2")
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    for overrides, was, asked in ((STRATEGIES["zero2"], "zero_stage=1", "zero_stage=2"),
                                  (["strategy=ddp"], "name=deepspeed", "name=ddp")):
        proc = subprocess.run([sys.executable, "-m", "bigdit.train", *BASE, f"run.dir={tmp_path}", *overrides,
                               "run.steps=4"], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0
        assert f"written by strategy {was} but this run asks for {asked}" in proc.stderr, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
