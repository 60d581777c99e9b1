"""The scaling model's per-step traffic matches what DDP and FSDP2 actually send (2 gloo ranks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bigdit.scaling import Cluster, bytes_per_step, collectives, scaling_table

from conftest import REPO


def probe(strategy: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "tests/comm_probe.py",
         strategy], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))


@pytest.mark.slow
@pytest.mark.parametrize("strategy,modelled", [("ddp", "ddp"), ("fsdp2", "fsdp")])
def test_modelled_payloads_match_counted_ones(strategy, modelled):
    got = probe(strategy)
    # fp32 training: gradients and gathered weights are 4 bytes; FSDP2 also gathers the frozen pos_embed.
    params = got["trainable"] + (got["frozen"] if modelled == "fsdp" else 0)
    expected: dict[str, float] = {}
    for kind, payload, _ in collectives(modelled, params, 2, Cluster(), grad_bytes=4, param_bytes=4):
        expected[kind] = expected.get(kind, 0) + payload
    if modelled == "fsdp":  # the frozen parameter has no gradient to reduce-scatter
        expected["reduce_scatter"] -= got["frozen"] * 4
    for kind, value in expected.items():
        assert got["sent"][kind] == pytest.approx(value, rel=0.005), kind  # FSDP2 pads shards slightly


def test_ring_traffic_and_scaling_shape():
    p = 1_000_000
    assert bytes_per_step("ddp", p, 2) == pytest.approx(p * 4)  # 2 (n-1)/n x 4 bytes, n = 2
    assert bytes_per_step("ddp", p, 1024) == pytest.approx(2 * 1023 / 1024 * p * 4)
    assert bytes_per_step("zero2", p, 64, grad_bytes=4, param_bytes=4) == pytest.approx(bytes_per_step("ddp", p, 64))
    rows = scaling_table("ddp", 675_000_000, compute_s=0.05)
    eff = [r["efficiency"] for r in rows]
    assert eff == sorted(eff, reverse=True) and eff[0] > eff[-1]
    hsdp = scaling_table("hsdp", 675_000_000, compute_s=0.05)
    assert hsdp[-1]["efficiency"] > rows[-1]["efficiency"]  # most traffic stays on NVLink
