"""eval=fid: FID/sFID/IS of the EMA during training go into metrics.jsonl, grids into samples/, and a run with
evaluation ends with exactly the weights of one without."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bigdit.checkpoint import latest_checkpoint
from bigdit.data.digits import DIGITS_MAX, load_digits_arrays
from bigdit.export import consolidated_weights
from bigdit.metrics import read_metrics
from bigdit.train import CONFIG_DIR, train

TINY = ["experiment=demo", "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "run.global_batch=16",
        "optim.warmup_steps=0", "optim.schedule=constant", "run.log_every=2", "run.ckpt_every=2"]


@pytest.fixture(scope="module")
def digits_ref(tmp_path_factory, inception_weights):
    """An ADM-format reference batch of 4 real digits as 8x8 RGB uint8 (the training resolution) with its
    FID/sFID statistics, as ADM's published batches carry them."""
    from bigdit.evaluation.inception import load_inception
    from bigdit.evaluation.reference import write_reference
    from bigdit.evaluation.stats import MomentAccumulator

    images, _ = load_digits_arrays()
    u8 = np.clip(images[:4] / DIGITS_MAX * 255.0, 0, 255).astype(np.uint8).reshape(-1, 8, 8, 1).repeat(3, axis=-1)
    f = load_inception(inception_weights, "cpu", batch_size=4).features(u8)
    stats = {k: MomentAccumulator(f[k].shape[1]).update(f[k]).mean_cov() for k in ("pool", "spatial")}
    return write_reference(tmp_path_factory.mktemp("ref") / "digits_ref.npz", u8, stats)


def run(run_dir, *overrides):
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("train", overrides=[*TINY, f"run.dir={run_dir}", *overrides])
    train(cfg)
    return read_metrics(run_dir / "metrics.jsonl")


def weights(run_dir):
    ckpt, model_cfg = latest_checkpoint(run_dir / "checkpoints"), OmegaConf.load(run_dir / "config.yaml").model
    return {which: consolidated_weights(ckpt, model_cfg, which) for which in ("ema", "model")}


@pytest.mark.slow
def test_evaluation_logs_fid_and_grids_and_never_changes_the_weights(tmp_path, digits_ref, inception_weights):
    evaluation = ["eval=fid", "eval.every=2", "eval.num_samples=3", "eval.batch_size=2", "eval.steps=2",
                  f"eval.ref={digits_ref}", f"eval.inception_weights={inception_weights}", "eval.fid_method=eigh",
                  "eval.grid_every=4", "eval.grid_classes=2", "eval.grid_per_class=1", "run.loggers=[jsonl,tensorboard]"]
    with_eval = run(tmp_path / "eval", "run.steps=2", *evaluation)
    with_eval = run(tmp_path / "eval", "run.steps=4", *evaluation)  # resumed at step 2: one record per step
    without = run(tmp_path / "plain", "run.steps=4")

    assert [r["step"] for r in with_eval] == [2, 4] and all(np.isfinite(r["fid"]) for r in with_eval)
    assert all({"fid", "sfid", "is", "eval_s"} <= set(r) for r in with_eval)
    assert not any("fid" in r for r in without)
    assert [r["loss"] for r in with_eval] == [r["loss"] for r in without]
    assert (tmp_path / "eval" / "samples" / "step-4.png").is_file()
    assert not (tmp_path / "eval" / "samples" / "step-2.png").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "eval" / "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert {"samples", "loss_plot"} <= set(events.Tags()["images"])  # the grid and the loss + FID plot
    assert [e.step for e in events.Scalars("fid")] == [2, 4]
    a, b = weights(tmp_path / "eval"), weights(tmp_path / "plain")
    for which in a:
        assert a[which].keys() == b[which].keys()
        assert all(torch.equal(a[which][k], b[which][k]) for k in a[which]), which


def test_bad_evaluation_settings_fail_before_any_work(tmp_path, digits_ref):
    with pytest.raises(ValueError, match="eval.every=3 must be a multiple of run.log_every=2"):
        run(tmp_path / "a", "run.steps=2", "eval=fid", "eval.every=3", f"eval.ref={digits_ref}")
    with pytest.raises(FileNotFoundError, match="inception"):
        run(tmp_path / "b", "run.steps=2", "eval=fid", "eval.every=2", f"eval.ref={digits_ref}",
            f"eval.inception_weights={tmp_path / 'missing.pth'}")
    assert not (tmp_path / "a" / "checkpoints").exists() and not (tmp_path / "b" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp2", "zero3"])
def test_sharded_ema_is_evaluated_in_place_on_two_ranks(tmp_path, digits_ref, inception_weights, strategy):
    """2 ranks under FSDP2 / ZeRO-3: the EMA shards are swapped into the sharded parameters (nothing gathered),
    both ranks sample their share (3 samples over 2 ranks: one rank pads its second batch), FID is logged, and
    the run ends with the weights of the same run without evaluation."""
    from test_strategies import STRATEGIES, launch

    evaluation = ["eval=fid", "eval.every=2", "eval.num_samples=3", "eval.batch_size=1", "eval.steps=2",
                  f"eval.ref={digits_ref}", f"eval.inception_weights={inception_weights}", "eval.fid_method=eigh"]
    launch(tmp_path / "eval", 2, *STRATEGIES[strategy], "run.steps=2", "run.log_every=2", *evaluation)
    launch(tmp_path / "plain", 2, *STRATEGIES[strategy], "run.steps=2", "run.log_every=2")
    records = read_metrics(tmp_path / "eval" / "metrics.jsonl")
    assert [r["step"] for r in records] == [2] and np.isfinite(records[0]["fid"])
    a, b = weights(tmp_path / "eval"), weights(tmp_path / "plain")
    for which in a:
        assert all(torch.equal(a[which][k], b[which][k]) for k in a[which]), which
