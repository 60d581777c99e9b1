"""A first-order model of data-parallel scaling: bytes each GPU sends per step, and the step time it implies.

Collectives are ring algorithms, whose per-GPU traffic for a payload of ``B`` bytes over ``n`` ranks is
``2 (n-1)/n B`` for an all-reduce and ``(n-1)/n B`` for an all-gather or a reduce-scatter. A flat
collective over several nodes runs at the inter-node bandwidth per GPU; within a node at NVLink's.
Per strategy and optimizer step (P parameters, gradients reduced in ``grad_bytes``, weights gathered in
``param_bytes``):

- ddp: all-reduce of the gradients.
- zero1, zero2: reduce-scatter of the gradients + all-gather of the updated parameters (same bytes as DDP).
- zero3, fsdp: all-gather of the parameters in forward and again in backward + reduce-scatter of the gradients.
- hsdp: fsdp inside a node (``gpus_per_node`` shards) + an all-reduce of each shard's gradients across nodes.

Step time = compute + the communication that compute cannot hide: ``compute + max(0, comm - overlap * compute)``,
plus a latency of ``latency_s`` per tree level (2 log2 n, NCCL's tree/hierarchical algorithms) for each
collective call. Weak scaling keeps the per-GPU batch, so
efficiency = compute time / step time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

STRATEGIES = ("ddp", "zero1", "zero2", "zero3", "fsdp", "hsdp")


@dataclass(frozen=True)
class Cluster:
    """Per-GPU bandwidths (bytes/s) and topology; defaults: H100 SXM nodes, NVLink 4, 8 x 400 Gb/s IB."""

    gpus_per_node: int = 8
    intra_node_bw: float = 360e9  # achievable NVLink all-reduce bus bandwidth per GPU
    inter_node_bw: float = 45e9  # one 400 Gb/s NIC per GPU, ~90% achievable
    latency_s: float = 5e-6  # per tree level
    overlap: float = 0.8  # share of the compute time that can hide communication


def _ring(kind: str, payload: float, n: int) -> float:
    """Bytes one GPU sends in a ring collective of ``payload`` bytes over ``n`` ranks."""
    if n <= 1:
        return 0.0
    return (2 if kind == "all_reduce" else 1) * (n - 1) / n * payload


def collectives(strategy: str, params: int, world: int, cluster: Cluster, grad_bytes: int = 4,
                param_bytes: int = 2) -> list[tuple[str, float, int]]:
    """``(kind, payload bytes, ranks)`` of the collectives one optimizer step runs, per GPU."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    grads, weights = params * grad_bytes, params * param_bytes
    if strategy == "ddp":
        return [("all_reduce", grads, world)]
    if strategy in ("zero1", "zero2"):
        return [("reduce_scatter", grads, world), ("all_gather", weights, world)]
    if strategy in ("zero3", "fsdp"):
        return [("all_gather", weights, world), ("all_gather", weights, world), ("reduce_scatter", grads, world)]
    shard = min(world, cluster.gpus_per_node)
    out = [("all_gather", weights, shard), ("all_gather", weights, shard), ("reduce_scatter", grads, shard)]
    return out + [("all_reduce", grads / shard, world // shard)]


def bytes_per_step(strategy: str, params: int, world: int, cluster: Cluster = Cluster(), grad_bytes: int = 4,
                   param_bytes: int = 2) -> float:
    """Bytes each GPU sends per optimizer step."""
    return sum(_ring(k, b, n) for k, b, n in collectives(strategy, params, world, cluster, grad_bytes, param_bytes))


def comm_time(strategy: str, params: int, world: int, cluster: Cluster = Cluster(), grad_bytes: int = 4,
              param_bytes: int = 2, collectives_per_step: int = 1) -> float:
    """Seconds of communication per step; ``collectives_per_step`` buckets (DDP) or blocks (FSDP) each pay
    the latency."""
    total = 0.0
    for kind, payload, n in collectives(strategy, params, world, cluster, grad_bytes, param_bytes):
        # A group of ranks that spans nodes runs at the inter-node bandwidth; HSDP's shard groups stay inside one.
        inside = n <= cluster.gpus_per_node and not (strategy == "hsdp" and kind == "all_reduce" and n > 1)
        bw = cluster.intra_node_bw if inside else cluster.inter_node_bw
        levels = 2 * math.ceil(math.log2(n)) if n > 1 else 0
        total += _ring(kind, payload, n) / bw + collectives_per_step * levels * cluster.latency_s
    return total


def step_time(compute_s: float, comm_s: float, overlap: float) -> float:
    """Compute plus the communication it cannot hide."""
    return compute_s + max(0.0, comm_s - overlap * compute_s)


def scaling_table(strategy: str, params: int, compute_s: float, worlds=(8, 16, 32, 64, 128, 256, 512, 1024),
                  cluster: Cluster = Cluster(), grad_bytes: int = 4, param_bytes: int = 2,
                  collectives_per_step: int = 1) -> list[dict]:
    """Per world size: bytes sent per GPU, communication time, step time and weak-scaling efficiency."""
    rows = []
    for world in worlds:
        comm = comm_time(strategy, params, world, cluster, grad_bytes, param_bytes, collectives_per_step)
        t = step_time(compute_s, comm, cluster.overlap)
        rows.append({"strategy": strategy, "gpus": world,
                     "gib_sent_per_gpu": bytes_per_step(strategy, params, world, cluster, grad_bytes, param_bytes) / 2**30,
                     "comm_s": comm, "step_s": t, "efficiency": compute_s / t})
    return rows
