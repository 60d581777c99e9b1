"""FLOP formulas agree with torch's FlopCounterMode."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bigdit.flops import train_flops_per_sample
from bigdit.models import build_model


def counted_forward_flops(model, x, t, y) -> int:
    # The math SDPA backend decomposes attention into bmm, which the counter sees; the fused CPU kernel
    # is invisible to it.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, y)
    return counter.get_total_flops()


@pytest.mark.parametrize("name,kw", [("DiT-S/2", {}), ("DiT-B/4", {"depth": 2}), ("DiT-XL/8", {"depth": 1, "in_channels": 3})])
def test_dit_formula_matches_flop_counter(name, kw):
    model = build_model(name, input_size=32, num_classes=10, **kw)
    c = model.in_channels
    x, t, y = torch.randn(2, c, 32, 32), torch.tensor([1, 2]), torch.tensor([3, 4])
    assert model.forward_flops() * 2 == counted_forward_flops(model, x, t, y)


def test_dit_xl2_256_costs_what_the_paper_says():
    with torch.device("meta"):
        model = build_model("DiT-XL/2")
    # DiT paper, Table 4: 118.6 GFLOPs (multiply-adds) per forward at 256px.
    assert model.forward_flops() / 2 / 1e9 == pytest.approx(118.6, abs=0.1)
    assert train_flops_per_sample(model) / 1e12 == pytest.approx(0.71, abs=0.01)


@pytest.mark.parametrize("kw", [
    {"name": "U-ViT-S/2", "depth": 4},
    {"name": "U-ViT-M/4", "depth": 2, "mlp_time_embed": True},
    {"name": "U-ViT-H/2", "depth": 2, "num_classes": 0},
])
def test_uvit_formula_matches_flop_counter(kw):
    kw = dict(kw)
    model = build_model(kw.pop("name"), input_size=16, **kw)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([1, 2])
    y = torch.tensor([3, 4]) if model.num_classes else None
    assert model.forward_flops() * 2 == counted_forward_flops(model, x, t, y)


def test_text_uvit_formula_matches_flop_counter():
    model = build_model("U-ViT-S/2", input_size=16, depth=2, num_classes=0, context_dim=32, context_tokens=5)
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([1, 2]), torch.randn(2, 5, 32)
    assert model.forward_flops() * 2 == counted_forward_flops(model, x, t, ctx)


@pytest.mark.parametrize("deploy", [False, True])
def test_udit_formula_matches_flop_counter(deploy):
    model = build_model("U-DiT-S", input_size=16, hidden_size=32, depth=[1, 1, 2, 1, 1], num_heads=2, num_classes=10)
    if deploy:
        model = model.deploy()
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([1, 2]), torch.tensor([3, 4])
    assert model.forward_flops() * 2 == counted_forward_flops(model, x, t, y)


@pytest.mark.parametrize("name,deploy,paper_gmacs", [
    ("U-DiT-B", True, 22.22), ("U-DiT-L", True, 85.0), ("U-ViT-H/2", False, 133.0), ("DiT-XL/2", False, 118.6),
])
def test_formulas_reproduce_the_papers_gflops(name, deploy, paper_gmacs):
    # The papers quote multiply-adds of one 256px forward (U-DiT: the merged, deploy form).
    with torch.device("meta"):
        model = build_model(name)
    if deploy:
        model = model.deploy()
    assert model.forward_flops() / 2 / 1e9 == pytest.approx(paper_gmacs, rel=0.005)


@pytest.mark.parametrize("name,kw", [
    ("DiT-S/2", {"hidden_size": 64, "num_heads": 4, "depth": 2}),
    ("U-DiT-S", {"hidden_size": 32, "num_heads": 2, "depth": [1, 1, 2, 1, 1]}),
    ("U-DiT-S", {"hidden_size": 32, "num_heads": 2, "depth": [1, 1, 2, 1, 1], "rep": False}),
])
def test_text_dit_and_udit_formulas_match_flop_counter(name, kw):
    # Our text-conditioned forms: cross-attention to 5 context tokens in every block, caption embedders.
    model = build_model(name, input_size=16, num_classes=0, context_dim=24, context_tokens=5, **kw)
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([1, 2]), torch.randn(2, 5, 24)
    assert model.forward_flops() * 2 == counted_forward_flops(model, x, t, ctx)
    # The text part is counted, not just present: the class form of the same size costs less.
    cls = build_model(name, input_size=16, num_classes=10, **kw)
    assert model.forward_flops() > cls.forward_flops()
