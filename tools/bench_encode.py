#!/usr/bin/env python
"""VAE encode throughput: ``python tools/bench_encode.py [vae=<hub id|dir>] [resolutions=256,512] [batch=8]``.

Times ``bigdit.codec.vae_moments`` (what tools/encode_latents.py runs per batch) at each resolution and
prints one JSON object with images/s. Without ``vae=`` it builds the Stable Diffusion VAE architecture
(diffusers' AutoencoderKL with 4 latent channels, blocks 128-256-512-512) with random weights: the
same compute as sd-vae-ft-ema/mse, for machines that cannot download weights.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

import bigdit  # noqa: F401  (torchvision shim before diffusers)
from bigdit.codec import vae_moments
from bigdit.perf import peak_memory_gib


def sd_vae_architecture():
    from diffusers import AutoencoderKL

    blocks = ["DownEncoderBlock2D"] * 4
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=blocks,
                         up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
                         layers_per_block=2, latent_channels=4, sample_size=256)


def main(argv: list[str]) -> None:
    args = {"vae": None, "resolutions": "256,512", "batch": "8", "iters": "3", **dict(a.split("=", 1) for a in argv)}
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    if args["vae"]:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args["vae"], torch_dtype=dtype)
    else:
        vae = sd_vae_architecture().to(dtype)
    vae = vae.to("cuda" if cuda else "cpu").eval()
    batch, iters = int(args["batch"]), int(args["iters"])
    results = {}
    for res in (int(r) for r in args["resolutions"].split(",")):
        images = torch.rand(batch, 3, res, res) * 2 - 1
        vae_moments(vae, images)  # warm-up
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            vae_moments(vae, images)  # includes the copy back to host, as in the tool
            times.append(time.perf_counter() - start)
        results[str(res)] = batch / statistics.median(times)
    # Peak over every resolution of this run (GPU: allocated memory; CPU: the process's peak RSS).
    peak = peak_memory_gib(torch.device("cuda" if cuda else "cpu"))
    print(json.dumps({"device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": str(dtype),
                      "vae": args["vae"] or "SD-VAE architecture, random weights", "batch": batch,
                      "images_per_s": results, "peak_mem_gib": peak,
                      "command": "python tools/bench_encode.py " + " ".join(argv)}))


if __name__ == "__main__":
    main(sys.argv[1:])
