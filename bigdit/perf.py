"""Peak FLOP/s of the device, for model FLOPs utilisation (MFU)."""

from __future__ import annotations

import time

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
