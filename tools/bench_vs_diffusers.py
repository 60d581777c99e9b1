#!/usr/bin/env python
"""Our DiT training step vs diffusers' ``DiTTransformer2DModel`` of the same configuration; prints JSON.

``python tools/bench_vs_diffusers.py [model=DiT-B/2] [batch=8] [steps=6] [device=cpu]``: same batch, fp32,
AdamW, forward + backward + step; the two models alternate step by step so machine load hits both alike,
and the median step time of each is reported with their ratio (> 1: ours is faster).
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

import bigdit  # noqa: F401
from bigdit.models import build_model


def diffusers_twin(ours):
    """diffusers' DiT with our model's size (patch, width, heads, depth, channels, classes)."""
    from diffusers import DiTTransformer2DModel

    heads = ours.blocks[0].attn.num_heads
    return DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=ours.hidden_size // heads, in_channels=ours.in_channels,
        out_channels=ours.out_channels, num_layers=len(ours.blocks), sample_size=ours.input_size,
        patch_size=ours.patch_size, num_embeds_ada_norm=ours.num_classes)


def main(argv: list[str]) -> None:
    args = {"model": "DiT-B/2", "batch": "8", "steps": "6", "device": "cpu", **dict(a.split("=", 1) for a in argv)}
    device, batch, steps = torch.device(args["device"]), int(args["batch"]), int(args["steps"])
    torch.manual_seed(0)
    ours = build_model(args["model"]).to(device)
    theirs = diffusers_twin(ours).to(device)
    x = torch.randn(batch, ours.in_channels, ours.input_size, ours.input_size, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    y = torch.randint(0, ours.num_classes, (batch,), device=device)
    target = torch.randn(batch, ours.out_channels, ours.input_size, ours.input_size, device=device)
    runs = {
        "bigdit": (ours, lambda: ours(x, t, y)),
        "diffusers": (theirs, lambda: theirs(x, timestep=t, class_labels=y).sample),
    }
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, (m, _) in runs.items()}
    times = {k: [] for k in runs}
    for i in range(steps + 1):  # the first step of each is warm-up
        for name, (_, fwd) in runs.items():
            start = time.perf_counter()
            loss = (fwd() - target).square().mean()
            loss.backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({
        "model": args["model"], "batch": batch, "device": str(device), "threads": torch.get_num_threads(),
        "params": {k: sum(p.numel() for p in m.parameters()) for k, (m, _) in runs.items()},
        "step_time_s": med, "speed_ratio_bigdit_over_diffusers": med["diffusers"] / med["bigdit"],
    }))


if __name__ == "__main__":
    main(sys.argv[1:])
