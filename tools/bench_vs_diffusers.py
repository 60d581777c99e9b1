#!/usr/bin/env python
"""Our DiT training step vs diffusers' ``DiTTransformer2DModel`` of the same configuration; prints JSON.

``python tools/bench_vs_diffusers.py [model=DiT-B/2] [batch=8] [steps=6] [device=cpu]``: same batch, fp32,
AdamW, forward + backward + step. The two models alternate within each step *and* swap which goes first
every step (``bigdit.perf.time_alternating``; ``steps`` must be even): in one process the second model of
a pair runs on what the first left behind, which on a CPU biased a fixed-order comparison by ~10% either
way. Reported: the median step time of each, and the per-step speed ratio (diffusers' time over ours, > 1:
ours is faster) as min/median/max over the steps and as the median of the steps each model ran first;
when those two medians disagree by more than the effect, the machine was too noisy for the number.
"""

from __future__ import annotations

import json
import statistics
import sys

import torch

import bigdit  # noqa: F401
from bigdit.models import build_model
from bigdit.perf import ratio_spread, time_alternating


def diffusers_twin(ours):
    """diffusers' DiT with our model's size (patch, width, heads, depth, channels, classes)."""
    from diffusers import DiTTransformer2DModel

    heads = ours.blocks[0].attn.num_heads
    return DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=ours.hidden_size // heads, in_channels=ours.in_channels,
        out_channels=ours.out_channels, num_layers=len(ours.blocks), sample_size=ours.input_size,
        patch_size=ours.patch_size, num_embeds_ada_norm=ours.num_classes)


def training_step(model, forward, target, device):
    """One forward + backward + AdamW step of ``model`` as a callable that returns when the device is done."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        loss = (forward() - target).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


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
    ours_s, theirs_s = time_alternating(  # one untimed warm-up step each (allocator, AdamW state)
        training_step(ours, lambda: ours(x, t, y), target, device),
        training_step(theirs, lambda: theirs(x, timestep=t, class_labels=y).sample, target, device), steps)
    spread = ratio_spread(ours_s, theirs_s)
    print(json.dumps({
        "model": args["model"], "batch": batch, "device": str(device), "threads": torch.get_num_threads(),
        "steps": steps, "params": {k: sum(p.numel() for p in m.parameters()) for k, m in
                                   (("bigdit", ours), ("diffusers", theirs))},
        "step_time_s": {"bigdit": statistics.median(ours_s), "diffusers": statistics.median(theirs_s)},
        "speed_ratio_bigdit_over_diffusers": {
            "min": spread["min"], "median": spread["median"], "max": spread["max"],
            "median_bigdit_first": spread["median_a_first"], "median_diffusers_first": spread["median_b_first"]},
    }))


if __name__ == "__main__":
    main(sys.argv[1:])
