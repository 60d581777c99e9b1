"""tools/sample.py's evaluation sets (FID-50K): per-sample noise, chunks dealt to ranks, byte-identical .npz for any
number of ranks, resume, balanced/uniform labels, samples.json, ADM's format, the checks before any compute."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from bigdit.batching import stream_seed
from bigdit.diffusion import make_schedule, sample
from bigdit.inference import generate, to_uint8_images
from bigdit.models import build_model
from bigdit.train import CONFIG_DIR, train

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import sample as sample_tool  # noqa: E402  (tools/ is no package)

MODEL = {"name": "DiT-S/2", "input_size": 8, "in_channels": 1, "num_classes": 10, "hidden_size": 32, "depth": 2,
         "num_heads": 2, "learn_sigma": True}
MODEL_ARG = ("model={name: DiT-S/2, input_size: 8, in_channels: 1, num_classes: 10, hidden_size: 32, depth: 2, "
             "num_heads: 2, learn_sigma: true}")
FEW = ["num_samples=40", "batch_size=8", "steps=5"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny DiT with random weights everywhere (DiT zero-initialises its output layer: a fresh model predicts 0,
    which would make every comparison trivial), saved as a plain state dict."""
    torch.manual_seed(0)
    model = build_model(**MODEL)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A bigdit run of 2 training steps of a tiny demo DiT (checkpoint step-000000002)."""
    run = tmp_path_factory.mktemp("run")
    tiny = ["experiment=demo", "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "run.global_batch=16",
            "run.log_every=1", "run.ckpt_every=4", "ema.decay=0.9", "optim.warmup_steps=0"]
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        train(compose("train", overrides=[*tiny, f"run.dir={run}", "run.steps=2"]))
    return run


def tool_cfg(*overrides: str):
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        return compose("sample", overrides=list(overrides))


def sample_set(ckpt: Path, out: Path, *overrides: str) -> dict | None:
    """tools/sample.py's ``run`` in this process on the random tiny checkpoint."""
    return sample_tool.run(tool_cfg(f"ckpt={ckpt}", MODEL_ARG, f"out={out}", *FEW, *overrides))


def load(out: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(out / "samples.npz") as data:
        return data["arr_0"], data["arr_1"]


# ------------------------------------------------------------------------------------------- per-sample noise


def test_per_sample_generators_make_a_sample_independent_of_its_batch():
    """With one generator per sample, sample k's DDPM noise (x_T and every step's) is its own generator's: the same
    alone or next to others; a batch of one with [g] draws what g alone draws."""
    sched = make_schedule("linear", 100)

    def fn(x, t):  # deterministic, per-sample, learned-sigma-shaped output
        return torch.cat([0.1 * x, torch.zeros_like(x)], dim=1)

    kw = dict(sampler="ddpm", steps=10, train_schedule=sched, learn_sigma=True)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    batch = sample(fn, shape=(3, 1, 4, 4), generator=gens([5, 6, 7]), **kw)
    alone = sample(fn, shape=(1, 1, 4, 4), generator=gens([6]), **kw)
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=1e-6)
    single = sample(fn, shape=(1, 1, 4, 4), generator=torch.Generator().manual_seed(6), **kw)
    assert torch.equal(alone, single)
    with pytest.raises(ValueError, match="one per sample"):
        sample(fn, shape=(2, 1, 4, 4), generator=gens([1]), **kw)


def test_generate_draws_sample_i_from_seed_and_i_at_any_batch_size(ckpt):
    model = build_model(**MODEL)
    model.load_state_dict(torch.load(ckpt, weights_only=True))
    sched = make_schedule()
    y = torch.arange(6) % 10
    kw = dict(sampler="ddpm", steps=5, cfg_scale=4.0, seed=3)
    whole = generate(model, sched, y, batch_size=6, **kw)
    torch.testing.assert_close(generate(model, sched, y, batch_size=4, **kw), whole, rtol=1e-4, atol=1e-5)
    # samples 2..4 drawn on their own, by index: the same samples
    part = generate(model, sched, y[2:5], indices=torch.arange(2, 5), batch_size=2, **kw)
    torch.testing.assert_close(part, whole[2:5], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(generate(model, sched, y, batch_size=6, **{**kw, "seed": 4}), whole)


def test_uint8_decoding_is_dits():
    x = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.999, 1.0, 2.0]).view(1, 1, 1, -1)
    got = to_uint8_images(x)
    want = np.clip(127.5 * x.numpy() + 128, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    assert got.dtype == np.uint8 and np.array_equal(got, want)
    assert got.ravel().tolist() == [0, 0, 64, 128, 255, 255, 255]


# ------------------------------------------------------------------------------------------- the sample set


def test_adm_format_balanced_labels_and_samples_json(ckpt, tmp_path):
    meta = sample_set(ckpt, tmp_path)
    images, labels = load(tmp_path)
    with zipfile.ZipFile(tmp_path / "samples.npz") as zf:
        assert zf.namelist() == ["arr_0.npy", "arr_1.npy"]
    assert images.shape == (40, 8, 8, 1) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and labels.tolist() == [i % 10 for i in range(40)]
    assert np.bincount(labels).tolist() == [4] * 10
    assert len(np.unique(images)) > 50  # real images, not a constant
    on_disk = json.loads((tmp_path / "samples.json").read_text())
    assert on_disk == meta
    assert meta["count"] == 40 and meta["image_shape"] == [8, 8, 1] and meta["chunks"] == 5
    assert meta["label_counts"] == {str(c): 4 for c in range(10)}
    assert "127.5 * x + 128" in meta["decode"]
    s = meta["settings"]
    assert s["checkpoint"] == str(ckpt.resolve()) and s["step"] is None and s["model"] == MODEL
    assert (s["sampler"], s["steps"], s["cfg_scale"], s["guidance"]) == ("ddpm", 5, 4.0, "dit")
    assert (s["num_samples"], s["labels"], s["batch_size"], s["seed"], s["precision"]) == (40, "balanced", 8, 0, "fp32")
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == \
        [f"chunk-{c:06d}.npz" for c in range(5)] + ["settings.json"]
    assert json.loads((tmp_path / "parts" / "settings.json").read_text()) == s


def test_balanced_over_chosen_classes(ckpt, tmp_path):
    meta = sample_set(ckpt, tmp_path, "classes=[3,7]")
    _, labels = load(tmp_path)
    assert labels.tolist() == [3, 7] * 20 and meta["label_counts"] == {"3": 20, "7": 20}


def test_uniform_labels_come_from_seed_and_index(ckpt, tmp_path):
    sample_set(ckpt, tmp_path / "a", "labels=uniform")
    sample_set(ckpt, tmp_path / "b", "labels=uniform", "batch_size=16")
    (ia, la), (ib, lb) = load(tmp_path / "a"), load(tmp_path / "b")
    want = [int(torch.randint(10, (), generator=torch.Generator().manual_seed(stream_seed(0, i, 1))))
            for i in range(40)]
    assert la.tolist() == want and lb.tolist() == want
    assert len(set(want)) > 5 and want != [i % 10 for i in range(40)]
    assert np.abs(ia.astype(int) - ib.astype(int)).max() <= 1
    sample_set(ckpt, tmp_path / "c", "labels=uniform", "seed=1")
    assert load(tmp_path / "c")[1].tolist() != want


def test_ranks_in_turn_write_the_same_bytes_as_one(ckpt, tmp_path):
    """Chunk c is rank c % W's: of 3 ranks run one after another (chunks 0 3 | 1 4 | 2), only the last finds every
    chunk and writes samples.npz and samples.json, byte for byte the one-rank files."""
    sample_set(ckpt, tmp_path / "one")
    assert sample_set(ckpt, tmp_path / "three", "rank=0", "world_size=3") is None
    assert not (tmp_path / "three" / "samples.npz").exists()
    assert sorted(p.name for p in (tmp_path / "three" / "parts").glob("chunk-*")) == ["chunk-000000.npz",
                                                                                         "chunk-000003.npz"]
    assert sample_set(ckpt, tmp_path / "three", "rank=2", "world_size=3") is None
    assert sample_set(ckpt, tmp_path / "three", "rank=1", "world_size=3") is not None
    for name in ("samples.npz", "samples.json"):
        assert (tmp_path / "three" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


@pytest.mark.slow
def test_another_batch_size_gives_the_same_samples_up_to_rounding(ckpt, tmp_path):
    sample_set(ckpt, tmp_path / "b8")
    sample_set(ckpt, tmp_path / "b5", "batch_size=5")
    (a, la), (b, lb) = load(tmp_path / "b8"), load(tmp_path / "b5")
    assert np.array_equal(la, lb)
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


@pytest.mark.slow
def test_resume_samples_only_missing_chunks(ckpt, tmp_path):
    sample_set(ckpt, tmp_path)
    first = (tmp_path / "samples.npz").read_bytes()
    parts = tmp_path / "parts"
    mtimes = {p.name: p.stat().st_mtime_ns for p in parts.glob("chunk-*")}
    # a rerun of a finished set does nothing
    sample_set(ckpt, tmp_path)
    assert {p.name: p.stat().st_mtime_ns for p in parts.glob("chunk-*")} == mtimes
    # killed while sampling chunk 2: no chunk-000002.npz (a temporary file, maybe) and no samples.npz yet
    (parts / "chunk-000002.npz").unlink()
    (tmp_path / "samples.npz").unlink()
    (parts / f".chunk-000002.npz.{os.getpid() + 1}.tmp").write_bytes(b"partial")
    sample_set(ckpt, tmp_path)
    now = {p.name: p.stat().st_mtime_ns for p in parts.glob("chunk-*")}
    assert now.keys() == mtimes.keys()
    assert [n for n in now if now[n] != mtimes[n]] == ["chunk-000002.npz"]
    assert (tmp_path / "samples.npz").read_bytes() == first
    assert not list(parts.glob(".*.tmp"))
    # a deleted chunk under a complete samples.npz is sampled again too
    (parts / "chunk-000004.npz").unlink()
    sample_set(ckpt, tmp_path)
    assert (parts / "chunk-000004.npz").is_file() and (tmp_path / "samples.npz").read_bytes() == first


@pytest.mark.parametrize(("overrides", "keys"), [
    (["steps=4"], "steps"),
    (["batch_size=5"], "batch_size"),
    (["labels=uniform", "seed=2"], "labels, seed"),
])
def test_resume_with_other_settings_is_refused_naming_them(ckpt, tmp_path, overrides, keys):
    sample_set(ckpt, tmp_path, "rank=0", "world_size=2")
    with pytest.raises(ValueError, match=f"other settings \\({keys} differ: "):
        sample_set(ckpt, tmp_path, *overrides)


def test_bf16_runs_under_autocast_and_is_recorded(ckpt, tmp_path):
    meta = sample_set(ckpt, tmp_path / "bf16", "precision=bf16", "num_samples=10", "batch_size=10")
    sample_set(ckpt, tmp_path / "fp32", "num_samples=10", "batch_size=10")
    a, b = load(tmp_path / "bf16")[0].astype(int), load(tmp_path / "fp32")[0].astype(int)
    assert meta["settings"]["precision"] == "bf16"
    assert np.abs(a - b).mean() < 8 and not np.array_equal(a, b)  # close to fp32, but another computation


def test_run_dir_records_checkpoint_step_and_default_out(run_dir):
    meta = sample_tool.run(tool_cfg(f"run={run_dir}", "num_samples=20", "batch_size=10", "steps=3"))
    out = run_dir / "samples" / "step-000000002-n20"
    assert (out / "samples.npz").is_file() and json.loads((out / "samples.json").read_text()) == meta
    s = meta["settings"]
    assert s["step"] == 2 and s["checkpoint"] == str((run_dir / "checkpoints" / "step-000000002").resolve())
    assert s["weights"] == "ema" and s["clip_denoised"] is True  # pixel model: ADM clips x0


@pytest.mark.parametrize(("overrides", "error", "message"), [
    (["num_samples=45"], ValueError, r"divisible by the 10 classes: 45 is not \(e.g. num_samples=40 or 50"),
    (["sampler=plms"], ValueError, r"unknown sampler='plms'; valid: ddpm, ddim, dpm\+\+, euler, heun, dopri5, sde"),
    (["sampler=euler"], ValueError, r"sampler='euler' is a flow sampler, but this is a Gaussian .*sampler=ddpm\|ddim\|dpm"),
    (["last_step=mean"], ValueError, "last_step are flow sampler settings, but this run is a Gaussian diffusion"),
    (["precision=fp16"], ValueError, "unknown precision='fp16'; valid: fp32, bf16"),
    (["labels=random"], ValueError, "unknown labels='random'"),
    (["per_class=4"], ValueError, "give one of them"),
    (["batch_size=0"], ValueError, "batch_size=0 must be positive"),
    (["sampler=ddim", "steps=300"], ValueError, "cannot create exactly 300 steps"),
    (["classes=[3,12]"], ValueError, r"classes \[12\] are outside 0..9"),
])
def test_bad_inputs_fail_before_any_compute(ckpt, tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        sample_set(ckpt, tmp_path, *overrides)
    assert not tmp_path.joinpath("parts").exists() and not tmp_path.joinpath("samples.npz").exists()


def test_missing_checkpoints_are_named(run_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint step-000000099 .* available: \\['step-000000002'\\]"):
        sample_tool.run(tool_cfg(f"run={run_dir}", "step=99", *FEW, f"out={tmp_path}"))
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        sample_tool.run(tool_cfg(f"ckpt={tmp_path / 'nope.pt'}", MODEL_ARG, *FEW, f"out={tmp_path}"))
    with pytest.raises(FileNotFoundError, match="is .* a bigdit run directory"):
        sample_tool.run(tool_cfg(f"run={tmp_path}", *FEW, f"out={tmp_path}"))
    with pytest.raises(ValueError, match="grid .* is one process"):
        sample_tool.run(tool_cfg(f"run={run_dir}", "per_class=2", "rank=0", "world_size=2"))


def test_submission_pins_the_step_and_out(run_dir, capsys):
    from bigdit.launch import submit_tool

    cfg = tool_cfg(f"run={os.path.relpath(run_dir)}", "num_samples=50000", "batch_size=125", "launcher=slurm",
                   "launcher.dry_run=true")
    sample_tool.prepare_submission(cfg)
    out = Path(os.path.abspath(run_dir)) / "samples" / "step-000000002-n50000"
    assert cfg.step == 2 and cfg.out == str(out) and cfg.run == os.path.abspath(run_dir)
    assert submit_tool(cfg, str(REPO / "tools" / "sample.py")) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --ntasks-per-node=8" in script and f"#SBATCH --output={out}/submitit/%j_0_log.out" in script
    assert not out.exists()


# ------------------------------------------------------------------------------------------- processes


def cli(ckpt: Path, out: Path, *overrides: str) -> list[str]:
    return [sys.executable, "tools/sample.py", f"ckpt={ckpt}", MODEL_ARG, f"out={out}", *FEW, *overrides]


@pytest.mark.slow
def test_two_rank_processes_write_the_same_bytes_as_one(ckpt, tmp_path):
    """Two processes at once (RANK/WORLD_SIZE as torchrun or srun set them; no process group), against one."""
    sample_set(ckpt, tmp_path / "one")
    env = dict(os.environ, WORLD_SIZE="2", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(cli(ckpt, tmp_path / "two"), cwd=REPO, env=dict(env, RANK=str(r)), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(2)]
    logs = [p.communicate(timeout=180) for p in procs]
    for p, (stdout, stderr) in zip(procs, logs):
        assert p.returncode == 0, stdout[-2000:] + stderr[-2000:]
    rank0 = logs[0][0]
    assert "rank 0/2: 40 samples (balanced labels over 10 classes) in 5 chunks of 8; 3 of this rank's 3" in rank0
    assert "samples/s on this rank" in rank0 and "ETA " in rank0
    assert "samples/s on this rank" not in logs[1][0]  # progress is rank 0's
    for name in ("samples.npz", "samples.json"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


@pytest.mark.slow
def test_launcher_local_job_of_two_tasks(ckpt, tmp_path):
    """``launcher=local launcher.tasks_per_node=2``: the SLURM code path (submitit tasks, each on its slice)."""
    sample_set(ckpt, tmp_path / "one")
    proc = subprocess.run(cli(ckpt, tmp_path / "job", "launcher=local", "launcher.tasks_per_node=2"), cwd=REPO,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "2 task(s) of sample" in proc.stdout and f"finished: {tmp_path / 'job'}" in proc.stdout
    assert (tmp_path / "job" / "samples.npz").read_bytes() == (tmp_path / "one" / "samples.npz").read_bytes()
    assert len(list((tmp_path / "job" / "submitit").glob("*_log.out"))) == 2


@pytest.mark.slow
def test_bad_input_exits_before_loading_with_the_message(ckpt, tmp_path):
    proc = subprocess.run(cli(ckpt, tmp_path, "num_samples=45"), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "labels=balanced needs num_samples divisible by the 10 classes" in proc.stderr
