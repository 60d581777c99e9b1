#!/usr/bin/env python
"""Training throughput benchmark; prints one JSON object.

``python tools/bench_train.py [bench.ranks=2] [bench.warmup_steps=5] <bigdit-train overrides...>``, e.g.
``python tools/bench_train.py bench.ranks=2 model.name=DiT-S/2 model.input_size=32 model.in_channels=4
data=synthetic strategy=deepspeed strategy.zero_stage=2 run.global_batch=16 run.steps=20``.

It runs the real training loop (``bigdit.train``) in a temporary run directory, one process or
``bench.ranks`` under torchrun, logs every ``bench.log_every`` steps (the loop reads device values back only
at log steps, so logging every step would add a host-device sync per step that real runs do not have), and
reports the median over the log windows after ``bench.warmup_steps``: img/s, step time, TFLOP/s per device
and MFU (from each model's explicit ``forward_flops`` formula, 3x for a training step: ``bigdit.flops``; the
MFU denominator is the datasheet peak on known GPUs), peak memory of rank 0, both peaks (datasheet and a
measured bf16/fp32 matmul), device, commit and command. One configuration per run, so there is no order
bias inside it; compare configurations from separate runs.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> None:
    bench = {"ranks": 1, "warmup_steps": 5, "log_every": 5}
    overrides = []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.startswith("bench."):
            if key[6:] not in bench:
                sys.exit(f"unknown {key}; bench keys: {', '.join('bench.' + k for k in bench)}")
            bench[key[6:]] = int(value)
        else:
            overrides.append(arg)
    with tempfile.TemporaryDirectory() as tmp:
        train_args = [*overrides, f"run.dir={tmp}", f"run.log_every={bench['log_every']}", "run.ckpt_every=1000000000"]
        if bench["ranks"] > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={bench['ranks']}", "-m", "bigdit.train", *train_args]
        else:
            cmd = [sys.executable, "-m", "bigdit.train", *train_args]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"training failed:\n{proc.stderr[-4000:]}")
        records = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
        saved = OmegaConf.load(Path(tmp) / "config.yaml")
        model_cfg, precision = OmegaConf.to_container(saved.model), saved.run.precision
        summary = Path(tmp) / "profile" / "summary.json"  # with run.profile=true: the step profile (steps 5-8)
        profile = json.loads(summary.read_text()) if summary.is_file() else None
        if profile:
            profile.pop("steps", None)  # per-step rows; the means and the largest gaps stay
    timed = [r for r in records if r["step"] - bench["log_every"] >= bench["warmup_steps"]]
    if not timed:
        sys.exit(f"run.steps must exceed bench.warmup_steps={bench['warmup_steps']}")

    def median(key: str):
        values = [r[key] for r in timed if r.get(key) is not None]
        return statistics.median(values) if values else None

    import torch

    from bigdit.perf import datasheet_tflops, measured_matmul_tflops

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    try:  # bench/gpu.sh sets BENCH_COMMIT (its copy of the tree may have no git)
        commit = os.environ.get("BENCH_COMMIT") or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    except FileNotFoundError:
        commit = "unknown"
    device = (torch.cuda.get_device_name() if torch.cuda.is_available()
              else f"CPU ({platform.machine()}, {os.cpu_count()} cores)")
    print(json.dumps({
        "device": device, "ranks": bench["ranks"], "commit": commit,
        "command": "python tools/bench_train.py " + " ".join(argv),
        "img_per_s": median("img_per_s"), "step_time_s": median("step_time_s"),
        "tflops_per_gpu": median("tflops_per_gpu"), "mfu": median("mfu"),
        "peak_mem_gib_rank0": max(r["peak_mem_gib"] for r in records),
        "steps_timed": len(timed) * bench["log_every"], "peak_tflops_datasheet": datasheet_tflops(dev, dtype),
        "peak_tflops_measured": round(measured_matmul_tflops(dev, dtype), 2),
        "model": model_cfg, **({"profile": profile} if profile else {}),
    }))


if __name__ == "__main__":
    main(sys.argv[1:])
