"""Post-hoc EMA (ema=phema, tools/phema.py) and model.qk_norm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from bigdit.checkpoint import Checkpointer, latest_checkpoint
from bigdit.ema import PowerEMA, build_ema
from bigdit.engine.base import RankInfo
from bigdit.engine.ddp import DDPStrategy
from bigdit.export import consolidated_weights, param_shapes
from bigdit.models import build_model
from bigdit.phema import gamma_to_sigma_rel, sigma_rel_to_gamma, solve_coefficients
from bigdit.snapshots import Snapshots, list_snapshots, reconstruct
from bigdit.train import CONFIG_DIR, train

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import phema as phema_tool  # noqa: E402

SIGMAS = [0.05, 0.10]


def one_process_ddp(module: nn.Module) -> DDPStrategy:
    strategy = DDPStrategy(RankInfo(0, 1, 0, 1), torch.device("cpu"))
    strategy.setup(module, lambda params: torch.optim.SGD(params, lr=0.1))
    return strategy


def drive(run_dir: Path, steps: int, every: int, value, sigma_rels=SIGMAS, sample=0.10):
    """A PowerEMA of a 2-tensor module whose weights are ``value(step)`` after each step, snapshots every ``every``
    steps (batch 1: images = steps). Returns the EMA, the module's parameter shapes and the strategy."""
    module = nn.Linear(3, 2)
    strategy = one_process_ddp(module)
    ema = PowerEMA(strategy.ema_targets(), sigma_rels, sample)
    snaps = Snapshots(run_dir, strategy, ema, every, 1, steps)
    for step in range(1, steps + 1):
        with torch.no_grad():
            for i, p in enumerate(module.parameters()):
                p.copy_(value(step, i, p.shape))
        ema.update([t for _, t in strategy.ema_targets()], step)
        snaps.maybe_write(step, step)
    return ema, {n: p.shape for n, p in module.named_parameters()}, strategy


def random_walk(step: int, i: int, shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(1000 * i + step)).cumsum(0) * 0.1 + step * 0.01


def test_sigma_rel_and_exponent_are_inverse():
    for sigma_rel, gamma in ((0.05, 16.97), (0.10, 6.94)):  # EDM2's two tracked widths and their exponents
        assert sigma_rel_to_gamma(sigma_rel) == pytest.approx(gamma, abs=5e-3)
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-12)
    with pytest.raises(ValueError, match="sigma_rel"):
        sigma_rel_to_gamma(0.3)


def test_reconstruction_of_a_snapshots_own_width_returns_that_ema(tmp_path):
    ema, shapes, _ = drive(tmp_path, steps=60, every=10, value=random_walk)
    assert [s.step for s in list_snapshots(tmp_path)] == [10, 20, 30, 40, 50, 60]
    for sigma_rel, state in ema.all_states().items():
        rec = reconstruct(tmp_path, shapes, sigma_rel)
        big = [c for step, sr, c in rec.terms if abs(c) > 1e-6]
        assert big == [pytest.approx(1.0)] and rec.terms[-1 if sigma_rel == 0.10 else -2][2] == pytest.approx(1.0)
        for name, tensor in state.items():  # equal to the live EMA up to the float16 of the snapshot
            torch.testing.assert_close(rec.weights[name], tensor, rtol=1e-3, atol=1e-3)
    # An earlier snapshot's own width, at that step, is that snapshot
    rec = reconstruct(tmp_path, shapes, 0.05, step=30)
    assert rec.step == 30 and len(rec.terms) == 3 * len(SIGMAS)
    snap = list_snapshots(tmp_path)[2].weights(0.05, shapes)
    for name in shapes:
        torch.testing.assert_close(rec.weights[name], snap[name].float(), rtol=1e-5, atol=1e-6)


def test_reconstruction_of_a_linear_in_time_weight_matches_the_closed_form(tmp_path):
    # w(t) = a + b t: a power profile of exponent g averages it to a + b T (g + 1) / (g + 2) (its mean time). The
    # weights after step t stand for the interval (t - 1, t] of the continuous profile: their times sit half a
    # step late, + b / 2. Values within +-0.5, where float16 snapshots are good to 1.2e-4.
    steps, a, b = 800, -0.5, 1.0 / 800

    def linear(step, i, shape):
        return torch.full(shape, a + b * step)

    _, shapes, _ = drive(tmp_path, steps=steps, every=40, value=linear)
    for sigma_rel in (0.03, 0.08, 0.15):  # narrower than, between and wider than the tracked widths
        g = sigma_rel_to_gamma(sigma_rel)
        closed = a + b * (steps * (g + 1) / (g + 2) + 0.5)
        rec = reconstruct(tmp_path, shapes, sigma_rel)
        for tensor in rec.weights.values():
            torch.testing.assert_close(tensor, torch.full_like(tensor, closed), rtol=0, atol=3e-4)
    # and it is the same as a power EMA of that width tracked all along
    tracked, _, _ = drive(tmp_path / "tracked", steps=steps, every=steps, value=linear, sigma_rels=[0.08],
                          sample=0.08)
    rec = reconstruct(tmp_path, shapes, 0.08)
    for name, tensor in tracked.state_dict().items():
        torch.testing.assert_close(rec.weights[name], tensor, rtol=0, atol=3e-4)


def test_coefficients_favour_the_nearest_profiles():
    g = [sigma_rel_to_gamma(s) for s in SIGMAS]
    x = solve_coefficients([100, 100, 200, 200], [g[0], g[1], g[0], g[1]], 200, sigma_rel_to_gamma(0.07))
    assert x.sum() == pytest.approx(1.0)
    assert abs(x[2]) + abs(x[3]) > abs(x[0]) + abs(x[1])  # the last snapshot carries most of a recent average


def test_power_ema_resumes_exactly_from_a_checkpoint(tmp_path):
    """Both averages (the sampling one in the checkpoint's EMA slot, the other in its sub-directory) come back
    bit for bit, and the continued averages equal an uninterrupted run's."""
    def run(stop: int, resume_from: Path | None):
        module = nn.Linear(3, 2)
        strategy = one_process_ddp(module)
        ckpt = Checkpointer(tmp_path / ("ckpt" if resume_from is None else "ckpt2"), strategy)
        ema = PowerEMA(strategy.ema_targets(), SIGMAS, 0.10)
        start = 0
        if resume_from is not None:
            ckpt.root = resume_from
            state = ckpt.load_latest()[1]
            ema.load_state_dict(state, ckpt.load_extra_emas(list(ema.extra_states())))
            start = 5
        for step in range(start + 1, stop + 1):
            with torch.no_grad():
                for i, p in enumerate(module.parameters()):
                    p.copy_(random_walk(step, i, p.shape))
            ema.update([t for _, t in strategy.ema_targets()], step)
        if resume_from is None:
            ckpt.save(stop, {}, ema.state_dict(), ema.extra_states())
        return ema

    run(5, None)
    assert (latest_checkpoint(tmp_path / "ckpt") / PowerEMA.tag(0.05)).is_dir()
    resumed, straight = run(12, tmp_path / "ckpt"), run(12, None)
    for sigma_rel, state in straight.all_states().items():
        for name, tensor in state.items():
            assert torch.equal(resumed.all_states()[sigma_rel][name], tensor), (sigma_rel, name)
    with pytest.raises(KeyError, match="sigma-0.050"):
        resumed.load_state_dict(resumed.state_dict(), {})


def test_bad_settings_are_refused_before_work():
    with pytest.raises(ValueError, match="sample_sigma_rel"):
        build_ema(OmegaConf.create({"name": "phema", "sigma_rels": [0.05, 0.1], "sample_sigma_rel": 0.2}), [])
    with pytest.raises(ValueError, match="unknown ema.name"):
        build_ema(OmegaConf.create({"name": "karras"}), [])
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("train", overrides=[*TINY, "run.dir=/nonexistent", "ema.snapshot_every=20"])
    with pytest.raises(ValueError, match="multiple of run.global_batch=16"):
        train(cfg)


# ------------------------------------------------------------------------------------------ training runs

TINY = ["experiment=demo", "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "run.global_batch=16",
        "run.log_every=1", "run.ckpt_every=2", "optim.warmup_steps=0", "optim.schedule=constant", "optim.lr=2e-3",
        "ema=phema", "ema.snapshot_every=32"]


def tool_cfg(**overrides):
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        return compose("phema", overrides=[f"{k}={v}" for k, v in overrides.items()])


def train_here(run_dir: Path, *overrides: str) -> None:
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        train(compose("train", overrides=[*TINY, f"run.dir={run_dir}", *overrides]))


def snapshot_weights(run_dir: Path) -> dict[tuple[int, float], dict[str, torch.Tensor]]:
    shapes = param_shapes(OmegaConf.load(run_dir / "config.yaml").model)
    return {(s.step, sr): s.weights(sr, shapes) for s in list_snapshots(run_dir) for sr in s.sigma_rels}


def assert_close_dicts(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), msg=str(k), **tol)


@pytest.mark.slow
def test_sharded_two_ranks_equal_one_rank_and_resume_exactly(tmp_path):
    """One DDP process straight through; the same run interrupted at a checkpoint and resumed (bit-exact, no
    snapshot written twice); and FSDP2 on 2 gloo ranks, whose every rank writes its shards: the same snapshots,
    checkpoint averages and reconstruction."""
    one, resumed, two = tmp_path / "one", tmp_path / "resumed", tmp_path / "two"
    train_here(one, "run.steps=6")
    train_here(resumed, "run.steps=3")  # snapshots at 2; checkpoint at 2 and 3
    (resumed / "phema" / "step-000000002" / "snapshot.json").touch()  # a rerun must not rewrite it
    mtime = (resumed / "phema" / "step-000000002" / "snapshot.json").stat().st_mtime_ns
    train_here(resumed, "run.steps=6")
    assert (resumed / "phema" / "step-000000002" / "snapshot.json").stat().st_mtime_ns == mtime
    a, b = snapshot_weights(one), snapshot_weights(resumed)
    assert sorted(a) == [(s, sr) for s in (2, 4, 6) for sr in SIGMAS]
    for key in a:
        assert_close_dicts(a[key], b[key], rtol=0, atol=0)

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "bigdit.train",
           *TINY, f"run.dir={two}", "run.steps=6", "strategy=fsdp2"]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "float16 snapshot every 32 images" in proc.stdout
    snap = two / "phema" / "step-000000004" / PowerEMA.tag(0.05)
    assert len(list(snap.glob("*.distcp"))) == 2  # one shard file per rank
    c = snapshot_weights(two)
    assert c.keys() == a.keys()
    for key in a:  # float16 of fp32 values equal to 1e-5: at most one float16 step apart
        assert_close_dicts(a[key], c[key], rtol=2e-3, atol=1e-4)
    model_cfg = OmegaConf.load(one / "config.yaml").model
    ckpt_one, ckpt_two = latest_checkpoint(one / "checkpoints"), latest_checkpoint(two / "checkpoints")
    assert_close_dicts(consolidated_weights(ckpt_one, model_cfg), consolidated_weights(ckpt_two, model_cfg),
                       rtol=1e-5, atol=1e-6)
    shapes = param_shapes(model_cfg)
    for sigma in ("sigma-0.050",):  # the further average in its own sub-directory, sharded like the main one
        from bigdit.engine.fsdp import FSDP2Strategy

        assert_close_dicts(DDPStrategy.consolidate(ckpt_one / sigma, shapes), FSDP2Strategy.consolidate(
            ckpt_two / sigma, shapes), rtol=1e-5, atol=1e-6)

    outs = {}
    for run in (one, two):
        outs[run] = Path(phema_tool.run(tool_cfg(run=run, sigma_rel=0.08))[0.08]["export"])
        assert outs[run] == run / "export" / "phema-step-000000006" / "sigma-0.080"
        stamp = (outs[run] / "ema.safetensors").stat().st_mtime_ns
        phema_tool.run(tool_cfg(run=run, sigma_rel=0.08))  # a rerun skips the finished export
        assert (outs[run] / "ema.safetensors").stat().st_mtime_ns == stamp
    from safetensors.torch import load_file

    x, y = (load_file(outs[r] / "ema.safetensors") for r in (one, two))
    assert_close_dicts(x, y, rtol=2e-3, atol=1e-4)
    model = build_model(**json.loads((outs[one] / "model_config.json").read_text()))
    model.load_state_dict(x, strict=True)
    meta = json.loads((outs[one] / "phema.json").read_text())
    assert meta["step"] == 6 and len(meta["terms"]) == 3 * len(SIGMAS)
    assert np.isclose(sum(t["coefficient"] for t in meta["terms"]), 1.0)

    # A sweep at an earlier snapshot; the sampling width (0.10) at the last step is the checkpoint's EMA slot.
    swept = phema_tool.run(tool_cfg(run=one, sweep="[0.05,0.1]", step=4))
    assert sorted(swept) == SIGMAS and (one / "export" / "phema-step-000000004" / "sweep.json").is_file()
    last = phema_tool.run(tool_cfg(run=one, sigma_rel=0.1))
    assert_close_dicts(load_file(Path(last[0.1]["export"]) / "ema.safetensors"),
                       consolidated_weights(ckpt_one, model_cfg), rtol=2e-3, atol=1e-4)


# ------------------------------------------------------------------------------------------ qk_norm

QK_MODELS = {
    "DiT-S/2": {"depth": 2, "hidden_size": 64, "num_heads": 2, "input_size": 8},
    "U-DiT-S": {"depth": [1, 1, 1, 1, 1], "hidden_size": 16, "num_heads": 2, "input_size": 8},
    "U-ViT-S/2": {"depth": 2, "hidden_size": 64, "num_heads": 2, "input_size": 8},
}


@pytest.fixture
def one_thread():
    """Tensors this small gain nothing from a second thread, and on a busy CPU two threads' synchronisation
    makes U-DiT's small convolutions 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", sorted(QK_MODELS))
@pytest.mark.parametrize("text", [False, True])
def test_qk_norm(name, text, one_thread):
    kw = {**QK_MODELS[name], **({"context_dim": 16, "context_tokens": 3, "num_classes": 0} if text else {})}
    torch.manual_seed(0)
    plain = build_model(name, **kw)
    assert build_model(name, **kw, qk_norm=False).state_dict().keys() == plain.state_dict().keys()
    assert not any("q_norm" in k or "k_norm" in k for k in plain.state_dict())
    normed = build_model(name, **kw, qk_norm=True)
    added = set(normed.state_dict()) - set(plain.state_dict())
    assert set(plain.state_dict()) <= set(normed.state_dict()) and added
    assert all(k.endswith(("q_norm.weight", "k_norm.weight")) for k in added)
    attentions = [m for m in normed.modules() if hasattr(m, "q_norm")]
    assert all(m.q_norm is not None for m in attentions)  # every attention, cross-attention included
    assert len(added) == 2 * len(attentions)
    size = kw["input_size"]
    x, t = torch.randn(2, 4, size, size) * 50, torch.tensor([3, 900])  # large inputs: logits would be huge
    y = torch.randn(2, 3, 16) if text else torch.tensor([1, 2])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = normed(x, t, y)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    normed(x, t, y).square().mean().backward()  # fp32: bf16 convolution backward is very slow on CPUs
    assert all(torch.isfinite(normed.get_parameter(k).grad).all() for k in added)
