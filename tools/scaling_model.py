#!/usr/bin/env python
"""Predicted scaling of data-parallel strategies from 8 to 1,024 GPUs; prints a table (or JSON).

``python tools/scaling_model.py model=DiT-XL/2 batch_per_gpu=256 [tflops_per_gpu=400] [strategies=ddp,zero2,fsdp,hsdp]
[intra_node_gbps=360] [inter_node_gbps=45] [gpus_per_node=8] [overlap=0.8] [json=true]``

Compute time per step = batch_per_gpu x training FLOPs per sample (3x the model's ``forward_flops()``:
bigdit.flops.train_flops_per_sample) / achieved TFLOP/s.
Communication: bigdit.scaling (ring collectives, NVLink inside a node, InfiniBand across nodes). Gradients
reduce in fp32 and weights are gathered in bf16 (the bf16 training recipes).
"""

from __future__ import annotations

import json
import sys

import torch

import bigdit  # noqa: F401
from bigdit.flops import train_flops_per_sample
from bigdit.models import build_model
from bigdit.scaling import Cluster, scaling_table


def main(argv: list[str]) -> None:
    args = {"model": "DiT-XL/2", "batch_per_gpu": "256", "tflops_per_gpu": "400",
            "strategies": "ddp,zero2,zero3,fsdp,hsdp", "intra_node_gbps": "360", "inter_node_gbps": "45",
            "gpus_per_node": "8", "overlap": "0.8", "json": "false", **dict(a.split("=", 1) for a in argv)}
    with torch.device("meta"):
        model = build_model(args["model"])
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    compute_s = int(args["batch_per_gpu"]) * train_flops_per_sample(model) / (float(args["tflops_per_gpu"]) * 1e12)
    cluster = Cluster(gpus_per_node=int(args["gpus_per_node"]), intra_node_bw=float(args["intra_node_gbps"]) * 1e9,
                      inter_node_bw=float(args["inter_node_gbps"]) * 1e9, overlap=float(args["overlap"]))
    blocks = len(model.repeated_blocks())
    rows = []
    for strategy in args["strategies"].split(","):
        # DDP/ZeRO-1/2 reduce in ~25 MB buckets; FSDP/ZeRO-3 run one collective set per block.
        calls = blocks if strategy in ("zero3", "fsdp", "hsdp") else max(1, params * 4 // (25 * 2**20))
        rows += scaling_table(strategy, params, compute_s, cluster=cluster, grad_bytes=4, param_bytes=2,
                              collectives_per_step=calls)
    if args["json"] == "true":
        print(json.dumps({"model": args["model"], "params": params, "compute_s": compute_s, "rows": rows}))
        return
    print(f"{args['model']}: {params:,} trainable parameters, compute {compute_s * 1e3:.1f} ms/step "
          f"({args['batch_per_gpu']} samples/GPU at {args['tflops_per_gpu']} TFLOP/s)")
    print(f"{'strategy':<9}{'GPUs':>6}{'GiB sent/GPU':>14}{'comm ms':>10}{'step ms':>10}{'efficiency':>12}")
    for r in rows:
        print(f"{r['strategy']:<9}{r['gpus']:>6}{r['gib_sent_per_gpu']:>14.2f}{r['comm_s'] * 1e3:>10.1f}"
              f"{r['step_s'] * 1e3:>10.1f}{r['efficiency']:>12.1%}")


if __name__ == "__main__":
    main(sys.argv[1:])
