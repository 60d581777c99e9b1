"""The GPU fast path, checked where a CPU can check it: no device -> host readback inside a step, pinned
host batches when the device is a GPU, and the step profiler's gap analysis."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

TINY = ["experiment=demo", "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "run.global_batch=16",
        "run.ckpt_every=100", "optim.warmup_steps=0"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy,data,nonfinite", [
    *[(strategy, data, "skip") for strategy in ("ddp", "fsdp2", "deepspeed") for data in ("digits", "wds")],
    ("ddp", "digits", "off")])
def test_loss_and_grad_norm_are_read_back_only_at_log_steps(tmp_path, strategy, data, nonfinite, digit_shards):
    """10 steps logged every 5: bigdit's code reads device values back twice (one ``tolist`` per log step, in the
    metrics window, which carries the loader's bad-sample count in the same collective), plus, under DDP and FSDP2
    with the non-finite check on, the global gradient norm's finiteness once per step (DeepSpeed's own overflow
    check already holds it on the host). Nothing else per step (e.g. DeepSpeed's grad norm as a Python float would
    be one stall per step on a GPU), in-memory or from shards."""
    source = [] if data == "digits" else ["data=digits_wds", f"data.root={digit_shards['wds']}", "data.flip=false"]
    proc = subprocess.run([sys.executable, "tests/sync_probe.py", *TINY, *source, f"strategy={strategy}",
                           "run.steps=10", "run.log_every=5", f"run.nonfinite={nonfinite}", f"run.dir={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = json.loads(proc.stdout.strip().splitlines()[-1])
    metrics = {site: n for site, n in calls.items() if site.startswith("metrics.py:")}
    assert sum(metrics.values()) == 2 and len(metrics) == 1, calls
    per_step = {site: n for site, n in calls.items() if site not in metrics}
    if nonfinite == "skip" and strategy != "deepspeed":
        assert len(per_step) == 1 and next(iter(per_step)).startswith("base.py:") and sum(per_step.values()) == 10
    else:
        assert not per_step, calls


def test_pin_memory_defaults_to_on_exactly_when_training_on_a_gpu(digit_shards):
    import torch

    from bigdit.batching import BatchPlan
    from bigdit.data import resolve_pin_memory
    from bigdit.data.wds import WdsLoader

    assert resolve_pin_memory(None) is torch.cuda.is_available() and resolve_pin_memory(False) is False
    loader = WdsLoader(str(digit_shards["wds"]), BatchPlan(16, 1, 16), rank=0, seed=0, num_workers=0)
    assert loader.pin_memory is torch.cuda.is_available()
    if torch.cuda.is_available():  # page-locked batches, from the training process and from workers
        assert next(loader.micro_batches(0))["x"].is_pinned()
        workers = WdsLoader(str(digit_shards["wds"]), BatchPlan(16, 1, 16), rank=0, seed=0, num_workers=2)
        assert next(workers.micro_batches(0))["x"].is_pinned()


def test_idle_gaps_of_a_known_trace():
    from bigdit.profiling import idle_gaps

    def ev(name, ts, dur, cat="kernel", tid=7):
        return {"ph": "X", "name": name, "ts": ts, "dur": dur, "cat": cat, "tid": tid}

    # step 0..100 us: kernels 10-30 and 20-40 overlap (busy 10-40), a 40 us gap, then 80-90; idle 10+40+10 us
    events = [ev("ProfilerStep#3", 0, 100, cat="user_annotation", tid=1), ev("a", 10, 20), ev("b", 20, 20),
              ev("c", 80, 10), ev("cpu", 0, 100, cat="cpu_op", tid=1), ev("late", 150, 10)]
    got = idle_gaps(events, "cuda")
    assert got["busy_fraction"] == pytest.approx(0.4) and got["idle_ms_per_step"] == pytest.approx(0.06)
    assert got["largest_gaps"][0] == {"step": "ProfilerStep#3", "ms": pytest.approx(0.04), "after": "b", "before": "c"}
    assert [g["ms"] for g in got["largest_gaps"]] == pytest.approx([0.04, 0.01, 0.01])
    assert idle_gaps(events, "cpu")["busy_fraction"] == pytest.approx(1.0)  # the loop thread's op spans the step
    with pytest.raises(ValueError, match="ProfilerStep"):
        idle_gaps(events[1:], "cuda")


def test_profiling_a_run_writes_trace_and_gap_summary(tmp_path):
    from hydra import compose, initialize_config_dir

    from bigdit.train import CONFIG_DIR, train

    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("train", overrides=[*TINY, "run.steps=9", "run.log_every=3", f"run.dir={tmp_path}",
                                          "run.profile=true"])
    train(cfg)
    summary = json.loads((tmp_path / "profile" / "summary.json").read_text())
    assert [s["step"] for s in summary["steps"]] == [f"ProfilerStep#{i}" for i in range(4, 8)]
    assert 0 < summary["busy_fraction"] <= 1 and summary["largest_gaps"] and summary["device"] == "cpu"
    names = {e.get("name") for e in json.loads((tmp_path / "profile" / "trace.json").read_text())["traceEvents"]}
    assert "aten::scaled_dot_product_attention" in names or "aten::_scaled_dot_product_flash_attention_for_cpu" in names
