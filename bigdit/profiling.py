"""Profiling a few training steps, and where the device sits idle in them (``run.profile=true``).

The loop calls :meth:`StepProfiler.step` after every optimizer step. With profiling on, rank 0 records
``wait`` steps unprofiled, ``warmup`` steps profiled but discarded (allocator and compile warm-up), then
``active`` steps, and writes ``<run.dir>/profile/trace.json`` (open in Perfetto or chrome://tracing) and
``summary.json``: per profiled step its wall time, the fraction of it the device was busy and the largest
idle gaps with the operations around them (:func:`idle_gaps`).

What "busy" means: on a GPU, the union of kernel, memcpy and memset intervals (any stream), so a gap is
time the GPU had nothing to run: a host-device sync, a data-loader stall, Python launch overhead outrunning
the kernels. On a CPU there is no separate device: the union of the training thread's top-level torch
operators, so a gap is host time outside torch (Python, waiting for the data loader, logging).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

DEVICE_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}


def _union(intervals: list[tuple[float, float, str]]) -> list[tuple[float, float, str, str]]:
    """Merge (start, end, name) intervals into disjoint (start, end, first name, last name) runs."""
    merged: list[list[Any]] = []
    for start, end, name in sorted(intervals):
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1][1], merged[-1][3] = end, name
        else:
            merged.append([start, end, name, name])
    return [tuple(m) for m in merged]


def idle_gaps(events: list[dict[str, Any]], device: str, top: int = 5) -> dict[str, Any]:
    """Busy fraction and largest idle gaps per ``ProfilerStep#N`` of a chrome trace's ``traceEvents``.

    ``device`` is ``cuda`` (busy = device kernels/copies) or ``cpu`` (busy = operators of the thread that
    ran the steps). Times in the result are milliseconds.
    """
    steps = [e for e in events if e.get("ph") == "X" and str(e.get("name", "")).startswith("ProfilerStep#")]
    if not steps:
        raise ValueError("the trace has no ProfilerStep# events: profile with a schedule and call step()")
    if device == "cuda":
        busy = [e for e in events if e.get("ph") == "X" and e.get("cat") in DEVICE_CATEGORIES]
    else:
        loop_thread = steps[0]["tid"]
        busy = [e for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_op" and e["tid"] == loop_thread]
    rows, gaps = [], []
    for step in sorted(steps, key=lambda e: e["ts"]):
        lo, hi = float(step["ts"]), float(step["ts"]) + float(step["dur"])
        inside = [(max(lo, float(e["ts"])), min(hi, float(e["ts"]) + float(e["dur"])), e["name"]) for e in busy
                  if float(e["ts"]) < hi and float(e["ts"]) + float(e["dur"]) > lo]
        runs = _union(inside)
        busy_us = sum(end - start for start, end, _, _ in runs)
        edges = [(lo, "step start")] + [(end, last) for _, end, _, last in runs]
        starts = [(start, first) for start, _, first, _ in runs] + [(hi, "step end")]
        for (gap_start, after), (gap_end, before) in zip(edges, starts):
            if gap_end > gap_start:
                gaps.append({"step": step["name"], "ms": (gap_end - gap_start) / 1e3, "after": after, "before": before})
        rows.append({"step": step["name"], "ms": (hi - lo) / 1e3, "busy_fraction": busy_us / (hi - lo)})
    n = len(rows)
    return {
        "device": device,
        "steps": rows,
        "step_ms": sum(r["ms"] for r in rows) / n,
        "busy_fraction": sum(r["busy_fraction"] for r in rows) / n,
        "idle_ms_per_step": sum(r["ms"] * (1 - r["busy_fraction"]) for r in rows) / n,
        "largest_gaps": sorted(gaps, key=lambda g: -g["ms"])[:top],
    }


class StepProfiler:
    """``torch.profiler`` over a few training steps of rank 0; inert (no cost) when not ``enabled``."""

    def __init__(self, enabled: bool, out_dir: str | Path, device: torch.device, wait: int = 2, warmup: int = 2,
                 active: int = 4):
        self.out_dir, self.device = Path(out_dir), device
        self.summary: dict[str, Any] | None = None
        self.prof = None
        if enabled:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(
                activities=activities, on_trace_ready=self._write,
                schedule=torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=1))
            self.prof.start()

    def step(self) -> None:
        """Mark the end of an optimizer step."""
        if self.prof is not None:
            self.prof.step()

    def close(self) -> None:
        """Stop profiling (writes the trace if the active steps were reached and not yet written)."""
        if self.prof is not None:
            self.prof.stop()
            self.prof = None

    def _write(self, prof) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        trace = self.out_dir / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
        self.summary = idle_gaps(events, "cuda" if self.device.type == "cuda" else "cpu")
        (self.out_dir / "summary.json").write_text(json.dumps(self.summary, indent=1))
        gap = self.summary["largest_gaps"][0] if self.summary["largest_gaps"] else None
        print(f"profile: {len(self.summary['steps'])} steps of {self.summary['step_ms']:.1f} ms, {self.device.type} busy "
              f"{100 * self.summary['busy_fraction']:.1f}%, idle {self.summary['idle_ms_per_step']:.1f} ms/step"
              + (f"; largest gap {gap['ms']:.2f} ms between {gap['after']} and {gap['before']}" if gap else "")
              + f" -> {trace}, {self.out_dir / 'summary.json'}", flush=True)
