"""The training entry point: presets, learning, exact resume, atomic checkpoints, DDP, accumulation, tools."""

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

from bigdit.checkpoint import latest_checkpoint
from bigdit.engine.ddp import DDPStrategy
from bigdit.metrics import read_metrics
from bigdit.diffusion import timesteps_from_uniform
from bigdit.train import CONFIG_DIR, draw_samples, train

from conftest import REPO

# A demo-shaped run small enough to take a second or two on CPU.
TINY = [
    "experiment=demo", "model.hidden_size=32", "model.depth=2", "model.num_heads=2",
    "run.global_batch=16", "run.log_every=1", "run.ckpt_every=4", "ema.decay=0.9", "optim.warmup_steps=0",
]


# The same for ADM in pixel space (a tiny U-Net) and for its noisy classifier (task=classifier).
ADM_TINY = ["experiment=adm_digits", "run.global_batch=16", "run.log_every=1", "run.ckpt_every=4", "ema.decay=0.9",
            "optim.warmup_steps=0"]
ADM_CLASSIFIER_TINY = ["experiment=adm_classifier_digits", *ADM_TINY[1:]]


def make_cfg(run_dir: Path, *overrides: str, base: list[str] = TINY):
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        return compose("train", overrides=[*base, f"run.dir={run_dir}", *overrides])


def final_state(run_dir: Path) -> dict:
    return torch.load(latest_checkpoint(run_dir / "checkpoints") / "state.pt", weights_only=False)


def assert_same_tensors(a: dict, b: dict, exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("experiment", [None, "demo"])
def test_presets_compose(experiment):
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("train", overrides=[] if experiment is None else [f"experiment={experiment}"])
    for key in ("dir", "steps", "global_batch", "micro_batch", "seed", "log_every", "ckpt_every", "precision"):
        assert key in cfg.run
    assert cfg.model.name in __import__("bigdit.models", fromlist=["MODELS"]).MODELS
    if experiment == "demo":
        assert (cfg.model.in_channels, cfg.model.input_size, cfg.model.num_classes) == (1, 8, 10)
        assert cfg.run.dir == "runs/demo"


@pytest.mark.slow
def test_loss_decreases_and_run_dir_contents(tmp_path):
    train(make_cfg(tmp_path, "run.steps=40", "optim.lr=2e-3"))
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 41))
    for key in ("step", "nimg", "loss", "lr", "grad_norm", "img_per_s", "step_time_s", "tflops_per_gpu", "mfu"):
        assert key in records[0]
    assert 0 < records[-1]["mfu"] < 1
    assert records[-1]["nimg"] == 40 * 16
    first, last = np.mean([r["loss"] for r in records[:5]]), np.mean([r["loss"] for r in records[-5:]])
    assert last < 0.7 * first, (first, last)
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "loss.png").stat().st_size > 1000
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-000000040"


@pytest.mark.parametrize("base", [TINY, ADM_TINY, ADM_CLASSIFIER_TINY], ids=["dit", "adm", "adm-classifier"])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, monkeypatch, base):
    train(make_cfg(tmp_path / "straight", "run.steps=8", base=base))

    crashed = make_cfg(tmp_path / "crashed", "run.steps=8", base=base)
    real_step, calls = DDPStrategy.optimizer_step, {"n": 0}

    def crash_at_sixth(self, max_norm, skip_nonfinite=True):
        calls["n"] += 1
        if calls["n"] == 6:  # after the checkpoint at step 4, with metrics logged past it
            raise KeyboardInterrupt("simulated preemption")
        return real_step(self, max_norm, skip_nonfinite)

    monkeypatch.setattr(DDPStrategy, "optimizer_step", crash_at_sixth)
    with pytest.raises(KeyboardInterrupt):
        train(crashed)
    assert latest_checkpoint(tmp_path / "crashed" / "checkpoints").name == "step-000000004"
    monkeypatch.setattr(DDPStrategy, "optimizer_step", real_step)
    train(make_cfg(tmp_path / "crashed", "run.steps=8", base=base))  # the same command again resumes

    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "crashed")
    assert_same_tensors(a["model"], b["model"])
    assert_same_tensors(a["ema"], b["ema"])
    assert (a["step"], a["nimg"]) == (b["step"], b["nimg"]) == (8, 128)
    straight, resumed = read_metrics(tmp_path / "straight" / "metrics.jsonl"), read_metrics(tmp_path / "crashed" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 9))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    train(make_cfg(tmp_path, "run.steps=4"))
    real_save = DDPStrategy.save

    def torn_save(self, directory, extra, ema):
        (directory / "state.pt").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(DDPStrategy, "save", torn_save)
    with pytest.raises(OSError):
        train(make_cfg(tmp_path, "run.steps=8"))
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-000000004"
    monkeypatch.setattr(DDPStrategy, "save", real_save)
    train(make_cfg(tmp_path, "run.steps=8"))
    assert final_state(tmp_path)["step"] == 8
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


@pytest.mark.slow
def test_gradient_accumulation_matches_full_batch(tmp_path):
    train(make_cfg(tmp_path / "full", "run.steps=3"))
    train(make_cfg(tmp_path / "accum", "run.steps=3", "run.micro_batch=4"))
    full, accum = read_metrics(tmp_path / "full" / "metrics.jsonl"), read_metrics(tmp_path / "accum" / "metrics.jsonl")
    np.testing.assert_allclose([r["loss"] for r in accum], [r["loss"] for r in full], rtol=1e-5)
    assert_same_tensors(final_state(tmp_path / "full")["model"], final_state(tmp_path / "accum")["model"], exact=False)


@pytest.mark.slow
def test_two_process_ddp_on_gloo_matches_single_process(tmp_path):
    train(make_cfg(tmp_path / "single", "run.steps=4"))
    overrides = [*TINY, f"run.dir={tmp_path / 'ddp'}", "run.steps=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "bigdit.train", *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 rank(s)" in proc.stdout and proc.stdout.count("step 4/4") == 1  # only rank 0 prints
    single, ddp = read_metrics(tmp_path / "single" / "metrics.jsonl"), read_metrics(tmp_path / "ddp" / "metrics.jsonl")
    np.testing.assert_allclose([r["loss"] for r in ddp], [r["loss"] for r in single], rtol=1e-5)
    assert_same_tensors(final_state(tmp_path / "single")["ema"], final_state(tmp_path / "ddp")["ema"], exact=False)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["run.micro_batch=5"], "run.micro_batch=5 must divide the per-rank batch 16"),
        (["model.in_channels=4"], "set model.in_channels=1 model.input_size=8"),
        (["run.precision=fp16"], "run.precision must be fp32 or bf16"),
    ],
)
def test_bad_configs_fail_fast_with_the_fix(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train(make_cfg(tmp_path, "run.steps=2", *overrides))
    assert not (tmp_path / "checkpoints").exists()


def test_resume_with_another_model_is_refused(tmp_path):
    train(make_cfg(tmp_path, "run.steps=2"))
    with pytest.raises(ValueError, match="use a new run.dir"):
        train(make_cfg(tmp_path, "run.steps=4", "model.depth=3"))


@pytest.mark.slow
def test_sample_tool_writes_grid_and_adm_npz(tmp_path):
    train(make_cfg(tmp_path, "run.steps=2"))
    cmd = [sys.executable, "tools/sample.py", f"run={tmp_path}", "per_class=3", "steps=5", "classes=[1,4]", "sampler=ddim"]
    out1 = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out1.returncode == 0, out1.stderr[-2000:]
    data = np.load(tmp_path / "samples" / "samples.npz")
    assert data["arr_0"].shape == (6, 8, 8, 1) and data["arr_0"].dtype == np.uint8
    assert data["arr_1"].tolist() == [1, 1, 1, 4, 4, 4]
    assert (tmp_path / "samples" / "grid.png").is_file()
    first = data["arr_0"].copy()
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=120)
    assert np.array_equal(np.load(tmp_path / "samples" / "samples.npz")["arr_0"], first)  # same seed, same samples

    bad = subprocess.run([sys.executable, "tools/sample.py", f"run={tmp_path}", "classes=[12]"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "outside 0..9" in bad.stderr


@pytest.mark.slow
def test_make_demo_runs_the_whole_job(tmp_path):
    """`make demo`'s wiring (2-process training, 2-rank sampling, scoring on both axes) on a few steps."""
    demo_dir = tmp_path / "demo"
    proc = subprocess.run(
        ["make", "--no-print-directory", "demo", f"DEMO_DIR={demo_dir}", f"DEMO_DATA={tmp_path / 'shards'}",
         "DEMO_ARGS=run.steps=3 model.depth=1 model.hidden_size=32 model.num_heads=2",
         "SAMPLE_ARGS=num_samples=20 labels=balanced batch_size=10 steps=4"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("digits accuracy: ")
    assert proc.stdout.strip().splitlines()[-2].startswith("digits FD: ")
    for name in ("samples/grid.png", "samples/samples.npz", "metrics.jsonl", "loss.png", "eval.json"):
        assert (demo_dir / name).is_file(), name
    scores = json.loads((demo_dir / "eval.json").read_text())
    assert scores["samples"] == 20 and scores["digits_fd"] > 0 and 0 < scores["digits_fd_real_vs_real"] < 1
    assert (tmp_path / "shards" / "manifest.json").is_file()  # trained from the encoded shards


@pytest.mark.parametrize("option", ["run.activation_checkpointing=true", "run.compile=true"])
def test_block_options_keep_the_training_and_the_checkpoint_layout(tmp_path, option):
    train(make_cfg(tmp_path / "plain", "run.steps=2"))
    train(make_cfg(tmp_path / "opt", "run.steps=2", option))
    plain, opt = read_metrics(tmp_path / "plain" / "metrics.jsonl"), read_metrics(tmp_path / "opt" / "metrics.jsonl")
    np.testing.assert_allclose([r["loss"] for r in opt], [r["loss"] for r in plain], rtol=1e-5)
    assert_same_tensors(final_state(tmp_path / "plain")["model"], final_state(tmp_path / "opt")["model"], exact=False)


@pytest.mark.parametrize("fmt", ["wds", "mds"])
def test_training_from_encoded_shards_counts_skipped_bad_samples(tmp_path, fmt):
    """encode -> (convert) -> corrupt one shard -> train with data.skip_bad_samples=true on either format."""
    sys.path.insert(0, str(REPO / "tools"))
    import encode_latents
    import shards

    wds_root = tmp_path / "wds"
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        encode_latents.run(compose("encode_latents", overrides=[
            "input=sklearn:digits", f"out={wds_root}", "limit=160", "shard_size=20", "num_workers=0",
            "progress=false", "flip=false"]))
    root = wds_root
    if fmt == "mds":
        root = tmp_path / "mds"
        shards.convert(str(wds_root), str(root), progress=False)
    victim = root / "shard-000003.tar" if fmt == "wds" else next((root / "shard-000003").glob("*.mds"))
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    cfg = make_cfg(tmp_path / "run", "run.steps=12", f"data={fmt}", f"data.root={root}", "data.num_workers=0",
                   "data.skip_bad_samples=true", "data.flip=false")
    with pytest.warns(UserWarning, match="skipped"):
        train(cfg)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(records) == 12 and records[-1]["bad_samples"] > 0


@pytest.mark.parametrize("model", [
    ["model=udit", "model.name=U-DiT-S", "++model.hidden_size=16", "++model.num_heads=2", "++model.depth=[1,1,1,1,1]"],
    ["model=uvit", "model.name=U-ViT-S/2", "++model.hidden_size=32", "++model.num_heads=2", "++model.depth=2",
     "model.learn_sigma=false"],
])
@pytest.mark.slow
def test_every_backbone_trains_and_samples(tmp_path, model):
    common = ["model.input_size=8", "model.in_channels=1", "model.num_classes=10"]
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("train", overrides=[*TINY, f"run.dir={tmp_path}", "run.steps=3", *model, *common])
    train(cfg)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert len(records) == 3 and all(np.isfinite(r["loss"]) and r["mfu"] > 0 for r in records)
    out = subprocess.run([sys.executable, "tools/sample.py", f"run={tmp_path}", "per_class=1", "steps=4",
                          "classes=[0,1]"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert np.load(tmp_path / "samples" / "samples.npz")["arr_0"].shape == (2, 8, 8, 1)


def test_each_sample_draws_from_its_own_stream():
    # Sample i's draws depend on (seed, step, i) only: drawing the span 3:5 alone gives rows 3-4 of the span 0:8,
    # so a rank's draws are its own share, whatever the split; another step or seed gives other draws.
    whole = draw_samples(0, 7, slice(0, 8), (2, 3), 0.5, torch.device("cpu"))
    part = draw_samples(0, 7, slice(3, 5), (2, 3), 0.5, torch.device("cpu"))
    for field in ("u", "noise", "drop"):
        assert torch.equal(getattr(whole, field)[3:5], getattr(part, field))
    assert whole.noise.shape == (8, 2, 3) and whole.u.min() >= 0 and whole.u.max() < 1
    assert not torch.equal(draw_samples(0, 8, slice(3, 5), (2, 3), 0.5, torch.device("cpu")).noise, part.noise)
    assert not torch.equal(draw_samples(1, 7, slice(3, 5), (2, 3), 0.5, torch.device("cpu")).noise, part.noise)
    t = timesteps_from_uniform(torch.tensor([0.0, 0.4999, 0.5, 1 - 2**-24]), 1000)
    assert t.tolist() == [0, 499, 500, 999]


def test_every_rank_starts_without_the_libraries_it_may_not_use():
    """Each rank of every run imports bigdit.train: FSDP2's checkpoint/tensor modules, DeepSpeed and scikit-learn
    (the digits are read from its data file) load only where used -- together ~5 s per process otherwise. The lazy
    strategy registry still gives every strategy its own class."""
    from bigdit.engine import STRATEGIES, strategy_class

    assert {name: strategy_class(name).name for name in STRATEGIES} == {name: name for name in STRATEGIES}
    code = ("import sys, bigdit.train; print(sorted(m for m in ('deepspeed', 'sklearn', 'torch.distributed.checkpoint', "
            "'torch.distributed.tensor', 'torch.distributed.fsdp') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
