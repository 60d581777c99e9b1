#!/usr/bin/env python
"""Sampling throughput: ``python tools/bench_sample.py [model=DiT-XL/2] [sampler=ddim] [steps=25] [batch=64]
[cfg_scale=4.0] [precisions=fp32,bf16] [model.<key>=<value> ...]``; prints one JSON object.

Builds the model with random weights (the same compute as a trained checkpoint; tools/sample.py needs a run
directory or a checkpoint file) and times :func:`bigdit.inference.generate`, what tools/sample.py runs: ``batch``
samples of random classes, classifier-free guidance as one doubled batch (``cfg_scale`` in DiT's convention,
DiT's channel split), ``steps`` network calls of ``sampler`` (ddpm | ddim | dpm++) on DiT's linear schedule,
including the copy of the samples back to the host, no VAE decode. ``fp32`` is what tools/sample.py does;
``bf16`` runs the same call under ``torch.autocast`` (bf16 matmuls, the sampler's arithmetic in fp32). One
untimed call of 2 steps first per precision (kernel selection, allocator). Reports samples/s, seconds per
sampler step and the peak memory of each precision (GPU: allocated; CPU: the process's peak RSS so far).
``model.<key>=<value>`` overrides a constructor argument (e.g. ``model.depth=2`` for a smoke test).
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import platform
import sys
import time

import torch

import bigdit  # noqa: F401  (environment fixes before third-party imports)
from bigdit.diffusion import make_schedule
from bigdit.inference import generate, resolve_device
from bigdit.models import build_model
from bigdit.perf import peak_memory_gib


def literal(value: str):
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def main(argv: list[str]) -> None:
    args = {"model": "DiT-XL/2", "input_size": "32", "sampler": "ddim", "steps": "25", "batch": "64",
            "cfg_scale": "4.0", "precisions": "fp32,bf16", "seed": "0", "device": "auto"}
    model_kwargs = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            sys.exit(f"expected key=value, got {arg!r}")
        if key.startswith("model."):
            model_kwargs[key[6:]] = literal(value)
        elif key in args:
            args[key] = value
        else:
            sys.exit(f"unknown key {key!r}; keys: {', '.join(args)}, model.<constructor argument>")
    device = resolve_device(args["device"])
    model = build_model(args["model"], input_size=int(args["input_size"]), **model_kwargs).to(device).eval()
    schedule = make_schedule()  # configs/diffusion/gaussian.yaml: DiT's linear 1000-step schedule
    batch, steps = int(args["batch"]), int(args["steps"])
    labels = torch.randint(0, model.num_classes, (batch,), generator=torch.Generator().manual_seed(int(args["seed"])))
    call = dict(sampler=args["sampler"], cfg_scale=float(args["cfg_scale"]), guidance="dit", seed=int(args["seed"]),
                batch_size=batch, device=device)
    results = {}
    for precision in args["precisions"].split(","):
        if precision not in ("fp32", "bf16"):
            sys.exit(f"precision {precision!r}: use fp32 or bf16")
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                    else contextlib.nullcontext())
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        with autocast:
            generate(model, schedule, labels, steps=2, **call)  # warm-up: 2 steps are valid for every sampler
            start = time.perf_counter()
            samples = generate(model, schedule, labels, steps=steps, **call)  # ends with the copy to the host
            elapsed = time.perf_counter() - start
        if not torch.isfinite(samples).all():
            sys.exit(f"{precision}: non-finite samples")
        results[precision] = {"samples_per_s": batch / elapsed, "s_per_step": elapsed / steps, "wall_s": elapsed,
                              "peak_mem_gib": peak_memory_gib(device)}
    print(json.dumps({
        "tool": "bench_sample",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
        "command": "python tools/bench_sample.py " + " ".join(argv),
        "model": {"name": args["model"], "input_size": int(args["input_size"]), **model_kwargs},
        "params": sum(p.numel() for p in model.parameters()),
        "sampler": args["sampler"], "steps": steps, "batch": batch, "cfg_scale": float(args["cfg_scale"]),
        "network_batch": 2 * batch if float(args["cfg_scale"]) != 1.0 else batch,
        "samples_per_s": {p: r["samples_per_s"] for p, r in results.items()},
        "peak_mem_gib": max(r["peak_mem_gib"] for r in results.values()),
        "per_precision": results,
    }))


if __name__ == "__main__":
    main(sys.argv[1:])
