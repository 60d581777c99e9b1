#!/usr/bin/env python
"""Cost of one rank's random draws per step: ``python tools/bench_draws.py [global_batch=32768] [ranks=1024]
[shape=4,32,32] [repeats=5] [device=auto]``; prints one JSON object.

``whole_batch`` is what the loop did before per-sample draws: draw timesteps, noise and dropout for the whole
global batch from one generator seeded by ``(seed, step)`` and keep this rank's slice (every rank paid for all
ranks). ``per_sample`` is :func:`bigdit.train.draw_samples` for this rank's share only. Both run in this process,
alternating which goes first, ``repeats`` times; reports the median and the spread (min, max) in milliseconds.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

import torch

import bigdit  # noqa: F401  (environment fixes before third-party imports)
from bigdit.batching import stream_seed
from bigdit.inference import resolve_device
from bigdit.train import draw_samples


def whole_batch(seed: int, step: int, global_batch: int, span: slice, shape, drop_prob: float, device):
    """The former draws: the whole global batch from one stream, then this rank's slice."""
    g = torch.Generator(device=device).manual_seed(stream_seed(seed, step, 1))
    t = torch.randint(0, 1000, (global_batch,), generator=g, device=device)
    noise = torch.randn((global_batch, *shape), generator=g, device=device)
    drop = torch.rand(global_batch, generator=g, device=device) < drop_prob
    return t[span], noise[span], drop[span]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def main(argv: list[str]) -> None:
    args = {"global_batch": "32768", "ranks": "1024", "shape": "4,32,32", "repeats": "5", "device": "auto"}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in args:
            sys.exit(f"expected one of {', '.join(k + '=' for k in args)}, got {arg!r}")
        args[key] = value
    device = resolve_device(args["device"])
    global_batch, ranks = int(args["global_batch"]), int(args["ranks"])
    if global_batch % ranks:
        sys.exit(f"global_batch={global_batch} is not divisible by ranks={ranks}")
    shape = tuple(int(d) for d in args["shape"].split(","))
    share = global_batch // ranks
    span = slice(share, 2 * share)  # rank 1's share
    sides = {"whole_batch": lambda step: whole_batch(0, step, global_batch, span, shape, 0.1, device),
             "per_sample": lambda step: draw_samples(0, step, span, shape, 0.1, device)}
    times = {name: [] for name in sides}
    for step in range(int(args["repeats"])):
        order = list(sides) if step % 2 else list(sides)[::-1]
        for name in order:
            times[name].append(timed(lambda: sides[name](step)))
    print(json.dumps({
        "tool": "bench_draws",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
        "command": "python tools/bench_draws.py " + " ".join(argv),
        "global_batch": global_batch, "ranks": ranks, "samples_per_rank": share, "sample_shape": shape,
        "ms_per_step": {name: {"median": statistics.median(v), "min": min(v), "max": max(v)}
                        for name, v in times.items()},
        "speedup": statistics.median(times["whole_batch"]) / statistics.median(times["per_sample"]),
    }))


if __name__ == "__main__":
    main(sys.argv[1:])
