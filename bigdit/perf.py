"""Peak FLOP/s of the device, for model FLOPs utilisation (MFU), and fair timing of two workloads."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

#: Dense (no sparsity) tensor-core peaks from NVIDIA datasheets, TFLOP/s, SXM parts.
DATASHEET_TFLOPS = {
    "H200": {torch.bfloat16: 989.0, torch.float32: 67.0},
    "H100": {torch.bfloat16: 989.0, torch.float32: 67.0},
    "H800": {torch.bfloat16: 989.0, torch.float32: 67.0},
    "A100": {torch.bfloat16: 312.0, torch.float32: 19.5},
}


def datasheet_tflops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The datasheet peak for this GPU and dtype, or None when unknown (CPUs, other GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in DATASHEET_TFLOPS.items():
        if key in name:
            return peaks.get(dtype)
    return None


@torch.no_grad()
def measured_matmul_tflops(device: torch.device, dtype: torch.dtype, n: int | None = None, iters: int = 10) -> float:
    """Achieved TFLOP/s of square matmuls in ``dtype`` on ``device``: the practical peak."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up (kernel selection, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n**3 * iters / (time.perf_counter() - start) / 1e12


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process so far: allocated GPU memory, or resident host memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def time_alternating(a: Callable[[], object], b: Callable[[], object], iters: int,
                     warmup: int = 1) -> tuple[list[float], list[float]]:
    """Seconds per call of ``a`` and ``b`` over ``iters`` iterations, after ``warmup`` untimed calls of each.

    Iteration ``i`` runs ``a`` first when ``i`` is even and ``b`` first when it is odd: in one process the
    second call of an iteration inherits what the first left behind (warm caches and allocator, CPU clocks,
    the other's garbage), so a fixed order biases the comparison by as much as the difference measured.
    ``iters`` must be even so that each order runs equally often. The callables must finish their device
    work before returning (e.g. ``torch.cuda.synchronize()``).
    """
    if iters < 2 or iters % 2:
        raise ValueError(f"iters must be even and >= 2 so that each side runs first equally often, got {iters}")
    for _ in range(warmup):
        a()
        b()
    fns, times = (a, b), ([], [])
    for i in range(iters):
        for side in (0, 1) if i % 2 == 0 else (1, 0):
            start = time.perf_counter()
            fns[side]()
            times[side].append(time.perf_counter() - start)
    return times


def ratio_spread(a_s: list[float], b_s: list[float]) -> dict[str, float]:
    """Spread of the per-iteration ratio ``b / a`` (> 1: ``a`` is faster) of :func:`time_alternating`'s output.

    ``min``/``median``/``max`` over all iterations, and the median over the iterations where ``a`` ran first
    (even) and where ``b`` ran first (odd): the two disagree by the order bias, and their spread against the
    overall median says how much one number can be trusted on a shared machine.
    """
    ratios = [tb / ta for ta, tb in zip(a_s, b_s)]
    return {"min": min(ratios), "median": statistics.median(ratios), "max": max(ratios),
            "median_a_first": statistics.median(ratios[0::2]), "median_b_first": statistics.median(ratios[1::2])}
