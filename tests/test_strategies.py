"""Strategies on CPU/gloo with 2 ranks: same training as one process, exact resume, resharding, export."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from bigdit.checkpoint import latest_checkpoint
from bigdit.export import consolidated_weights
from bigdit.metrics import read_metrics

from conftest import REPO

pytestmark = pytest.mark.slow  # every test launches torchrun ranks

BASE = [
    "experiment=demo", "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "run.global_batch=16",
    "run.log_every=1", "run.ckpt_every=3", "ema.decay=0.9", "optim.warmup_steps=0", "optim.schedule=constant",
    "optim.lr=2e-3",
]
STRATEGIES = {
    "fsdp2": ["strategy=fsdp2"],
    "zero1": ["strategy=deepspeed", "strategy.zero_stage=1"],
    "zero2": ["strategy=deepspeed", "strategy.zero_stage=2"],
    "zero3": ["strategy=deepspeed", "strategy.zero_stage=3"],
}


def launch(run_dir: Path, ranks: int, *overrides: str, base: list[str] = BASE) -> subprocess.CompletedProcess:
    """``bigdit-train`` with ``ranks`` processes under torchrun (or a plain process for 1), ``base`` + ``overrides``."""
    args = [*base, f"run.dir={run_dir}", *overrides]
    if ranks == 1:
        cmd = [sys.executable, "-m", "bigdit.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               "-m", "bigdit.train", *args]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")]


def ema(run_dir: Path) -> dict[str, torch.Tensor]:
    cfg = OmegaConf.load(run_dir / "config.yaml")
    return consolidated_weights(latest_checkpoint(run_dir / "checkpoints"), cfg.model, "ema")


def assert_close_dicts(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One process, DDP strategy, 6 steps: what every strategy must reproduce."""
    run = tmp_path_factory.mktemp("single")
    launch(run, 1, "run.steps=6")
    return run


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_two_ranks_equal_one_process_and_resume_exactly(name, reference, tmp_path):
    # Interrupted at step 3 (a checkpoint) and resumed by the same command with the same ranks.
    launch(tmp_path, 2, *STRATEGIES[name], "run.steps=3")
    launch(tmp_path, 2, *STRATEGIES[name], "run.steps=6")
    np.testing.assert_allclose(losses(tmp_path), losses(reference), rtol=1e-5)
    assert_close_dicts(ema(tmp_path), ema(reference))


@pytest.mark.parametrize("name,option", [
    ("fsdp2", "run.micro_batch=4"), ("zero2", "run.micro_batch=4"),
    ("fsdp2", "run.activation_checkpointing=true"), ("zero3", "run.activation_checkpointing=true"),
])
def test_accumulation_and_checkpointing_under_sharding(name, option, reference, tmp_path):
    launch(tmp_path, 2, *STRATEGIES[name], "run.steps=6", option)
    np.testing.assert_allclose(losses(tmp_path), losses(reference), rtol=1e-5)


@pytest.mark.parametrize("name,before,after", [("fsdp2", 2, 1), ("zero2", 2, 1), ("zero3", 2, 1), ("zero3", 1, 2)])
def test_resume_on_another_number_of_ranks(name, before, after, reference, tmp_path):
    # DCP reshards FSDP2 state; DeepSpeed goes through its universal checkpoint format, EMA re-partitioned.
    launch(tmp_path, before, *STRATEGIES[name], "run.steps=3")
    launch(tmp_path, after, *STRATEGIES[name], "run.steps=6")
    np.testing.assert_allclose(losses(tmp_path), losses(reference), rtol=1e-5)
    assert_close_dicts(ema(tmp_path), ema(reference))


def test_export_writes_loadable_ema(reference, tmp_path):
    launch(tmp_path, 2, *STRATEGIES["zero3"], "run.steps=3")
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "tools/export.py", f"run={tmp_path}", f"out={out}", "raw=true"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    from bigdit.models import build_model, load_weights

    import json

    model = load_weights(build_model(**json.loads((out / "model_config.json").read_text())), out / "ema.safetensors")
    assert_close_dicts(model.state_dict(), ema(tmp_path))
    assert load_file(out / "model.safetensors").keys() == model.state_dict().keys()
    assert torch.load(out / "ema.pt", weights_only=True).keys() == model.state_dict().keys()


def test_per_rank_state_is_logged_and_sharded(tmp_path):
    ddp = launch(tmp_path / "ddp", 2, "run.steps=1").stdout
    zero3 = launch(tmp_path / "z3", 2, *STRATEGIES["zero3"], "run.steps=1").stdout

    def mib(out: str) -> dict[str, float]:
        line = next(s for s in out.splitlines() if "state per rank (MiB)" in s)
        return {k: float(v) for k, v in (kv.split() for kv in line.split("(MiB): ")[1].split(", "))}

    full, sharded = mib(ddp), mib(zero3)
    for key in ("params", "grads", "optimizer", "ema"):
        assert sharded[key] == pytest.approx(full[key] / 2, abs=0.15), key


def test_groups_libraries_create_get_the_strategy_timeout():
    """DeepSpeed makes its ZeRO group with ``new_group(ranks)`` and no timeout; torch would give it 30 minutes
    on gloo whatever the world group has, so a hung rank would stall the job that long."""
    code = ("import bigdit, torch.distributed as dist; from torch.distributed import distributed_c10d as c10d; "
            "from bigdit.engine import build_strategy; build_strategy('deepspeed', timeout_s=7); "
            "print(c10d._get_default_timeout(dist.Backend.GLOO).total_seconds())")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "7.0"
