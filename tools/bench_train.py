#!/usr/bin/env python
"""Training throughput benchmark; prints one JSON object.

``python tools/bench_train.py [bench.ranks=2] [bench.warmup_steps=5] <bigdit-train overrides...>``, e.g.
``python tools/bench_train.py bench.ranks=2 model.name=DiT-S/2 model.input_size=32 model.in_channels=4
data=synthetic strategy=deepspeed strategy.zero_stage=2 run.global_batch=16 run.steps=20``.

It runs the real training loop (``bigdit.train``) in a temporary run directory, one process or
``bench.ranks`` under torchrun, logs every step, and reports the median over steps after the warm-up:
img/s, step time, TFLOP/s per device and MFU (from the explicit per-model FLOP formula in
``bigdit.flops``), peak memory of rank 0, plus device, commit and command.
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
    bench = {"ranks": 1, "warmup_steps": 5}
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
        train_args = [*overrides, f"run.dir={tmp}", "run.log_every=1", "run.ckpt_every=1000000000"]
        if bench["ranks"] > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={bench['ranks']}", "-m", "bigdit.train", *train_args]
        else:
            cmd = [sys.executable, "-m", "bigdit.train", *train_args]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"training failed:\n{proc.stderr[-4000:]}")
        records = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
        model_cfg = OmegaConf.to_container(OmegaConf.load(Path(tmp) / "config.yaml").model)
    timed = records[bench["warmup_steps"]:]
    if not timed:
        sys.exit(f"run.steps must exceed bench.warmup_steps={bench['warmup_steps']}")

    def median(key: str):
        values = [r[key] for r in timed if r.get(key) is not None]
        return statistics.median(values) if values else None

    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    device = (torch.cuda.get_device_name() if torch.cuda.is_available()
              else f"CPU ({platform.machine()}, {os.cpu_count()} cores)")
    print(json.dumps({
        "device": device, "ranks": bench["ranks"], "commit": commit,
        "command": "python tools/bench_train.py " + " ".join(argv),
        "img_per_s": median("img_per_s"), "step_time_s": median("step_time_s"),
        "tflops_per_gpu": median("tflops_per_gpu"), "mfu": median("mfu"),
        "peak_mem_gib_rank0": max(r["peak_mem_gib"] for r in records), "steps_timed": len(timed),
        "model": model_cfg,
    }))


if __name__ == "__main__":
    main(sys.argv[1:])
