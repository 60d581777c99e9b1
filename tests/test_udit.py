"""The U-DiT family: exact sizes, official layout, re-parameterisation, shapes, official outputs."""

from __future__ import annotations

import pytest
import torch

from bigdit.models import MODELS, build_model
from bigdit.models.udit import DeployFFN, RepFFN, UDiT, apply_rope, rope_2d_angles

SIZES = ("U-DiT-S", "U-DiT-B", "U-DiT-L")
TRAIN_COUNTS = {"U-DiT-S": 58_896_568, "U-DiT-B": 231_251_304, "U-DiT-L": 916_335_304}
DEPLOY_COUNTS = {"U-DiT-S": 52_045_240, "U-DiT-B": 204_425_064, "U-DiT-L": 810_188_488}
# Tiny but complete: every level present, 2 heads, head dims 8/16/32 (2-D RoPE needs multiples of 4).
TINY = dict(input_size=16, num_classes=10, hidden_size=16, num_heads=2, depth=(1, 1, 1, 1, 1))


def _meta(name: str, **kw) -> UDiT:
    with torch.device("meta"):
        return build_model(name, **kw)


def _numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _randomised(std: float = 0.05, seed: int = 0, **kw) -> UDiT:
    # Random weights everywhere (the zero-initialised adaLN/output layers would hide most of the network).
    model = build_model("U-DiT-S", **{**TINY, **kw})
    g = torch.Generator().manual_seed(seed)
    model.load_state_dict({k: torch.randn(v.shape, generator=g) * std for k, v in model.state_dict().items()})
    return model


def _inputs(n: int = 2, size: int = 16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, size, size, generator=g), torch.tensor([3, 871][:n]), torch.tensor([4, 9][:n])


@pytest.mark.parametrize("name", SIZES)
def test_parameter_counts_equal_official(name):
    model = _meta(name)
    assert _numel(model) == TRAIN_COUNTS[name]
    assert _numel(model.deploy()) == DEPLOY_COUNTS[name]
    # Building the merged layout directly (rep=False, to load deployed checkpoints) gives the same size.
    assert _numel(_meta(name, rep=False)) == DEPLOY_COUNTS[name]


@pytest.mark.parametrize("name", SIZES)
def test_state_dict_keys_and_shapes_equal_official(name, reference_layouts):
    ours = {k: list(v.shape) for k, v in _meta(name).state_dict().items()}
    assert ours == reference_layouts[f"{name} (training form)"]


def test_deployed_layout_is_the_rep_false_layout():
    merged = {k: v.shape for k, v in _meta("U-DiT-S").deploy().state_dict().items()}
    assert merged == {k: v.shape for k, v in _meta("U-DiT-S", rep=False).state_dict().items()}


def test_registry_and_attributes():
    assert set(SIZES) <= set(MODELS)
    model = _meta("U-DiT-B")
    assert (model.input_size, model.in_channels, model.num_classes, model.learn_sigma) == (32, 4, 1000, True)
    assert model.y_embedder_1.embedding_table.num_embeddings == 1001  # 1000 real classes + the null row
    assert len(model.repeated_blocks()) == 2 + 5 + 8 + 5 + 2


@pytest.mark.slow
@pytest.mark.parametrize("name", SIZES)
def test_forward_backward_every_size(name):
    # Each size's head count and level structure at width 8 per head, one block per level, 16x16 input.
    torch.manual_seed(0)
    heads = {"U-DiT-S": 4, "U-DiT-B": 8, "U-DiT-L": 16}[name]
    model = build_model(name, input_size=16, num_classes=10, hidden_size=8 * heads, depth=(1, 1, 1, 1, 1))
    assert model.latent[0].attn1.num_heads == heads
    x, t, y = _inputs()
    out = model(x, t, y)
    assert out.shape == (2, 8, 16, 16)
    assert out.abs().max() == 0  # adaLN-Zero: the untrained network outputs zeros
    # Perturb the zero-initialised layers so that gradients reach every parameter.
    for blk in model.repeated_blocks():
        torch.nn.init.normal_(blk.adaLN_modulation1[-1].weight, std=0.02)
        torch.nn.init.normal_(blk.adaLN_modulation2[-1].weight, std=0.02)
    torch.nn.init.normal_(model.final_layer.out_proj.weight, std=0.02)
    torch.nn.init.normal_(model.final_layer.adaLN_modulation[-1].weight, std=0.02)
    model(x, t, y).square().mean().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        if "embedding_table" not in n:  # only the two rows looked up get gradient
            assert p.grad.abs().sum() > 0, n


def test_learn_sigma_off_keeps_input_channels():
    model = build_model("U-DiT-S", **{**TINY, "learn_sigma": False})
    assert model.out_channels == 4 and not model.learn_sigma
    assert model(*_inputs()).shape == (2, 4, 16, 16)


def test_forced_label_dropout_uses_the_null_label_at_every_level():
    model = _randomised().eval()
    x, t, y = _inputs()
    with torch.no_grad():
        forced = model(x, t, y, force_drop_ids=torch.tensor([1, 0]))
        null = model(x, t, torch.tensor([10, int(y[1])]))
        plain = model(x, t, y)
    torch.testing.assert_close(forced, null, rtol=0, atol=0)
    assert not torch.allclose(forced[0], plain[0])
    torch.testing.assert_close(forced[1], plain[1], rtol=0, atol=0)


def test_wrong_input_shape_is_a_clear_error():
    model = build_model("U-DiT-S", **TINY)
    with pytest.raises(ValueError, match=r"expects input \(N, 4, 16, 16\)"):
        model(torch.randn(1, 4, 8, 8), torch.tensor([1]), torch.tensor([1]))
    with pytest.raises(ValueError, match="divisible by 8"):
        build_model("U-DiT-S", input_size=12)


def test_deploy_equals_training_form_and_leaves_it_untouched():
    model = _randomised().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, t, y = _inputs()
    with torch.no_grad():
        want = model(x, t, y)
        merged = model.deploy()
        got = merged(x, t, y)
    assert merged is not model and not merged.rep
    assert not any(isinstance(m, RepFFN) for m in merged.modules())
    assert sum(isinstance(m, DeployFFN) for m in merged.modules()) == 2 * len(model.repeated_blocks())
    assert _numel(merged) < _numel(model)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # The training weights are bit-identical, and the merged weights are new tensors.
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    train_ptrs = {p.data_ptr() for p in model.parameters()}
    assert not any(p.data_ptr() in train_ptrs for p in merged.parameters())
    # A merged checkpoint loads into the rep=False layout with strict=True and computes the same.
    direct = build_model("U-DiT-S", **TINY, rep=False).eval()
    direct.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(direct(x, t, y), got, rtol=0, atol=0)
        # Deploying twice (or deploying a deployed model) gives the same function again.
        torch.testing.assert_close(model.deploy()(x, t, y), got, rtol=0, atol=0)
        torch.testing.assert_close(merged.deploy()(x, t, y), got, rtol=0, atol=0)


def test_train_eval_switches_are_idempotent():
    # Upstream folds the re-parameterisation into a live weight on every eval(), so a second eval()
    # corrupts it; ours must not change any state or output however often the mode is switched.
    model = _randomised()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, t, y = _inputs()
    with torch.no_grad():
        first = model.eval()(x, t, y)
        for _ in range(3):
            model.eval()
        model.train()
        model.train()
        again = model.eval()(x, t, y)
        train_out = model.train()(x, t, y, force_drop_ids=torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    torch.testing.assert_close(train_out, first, rtol=0, atol=0)  # no dropout layers: same function
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_rope_rotates_pairs_and_encodes_relative_positions():
    cos, sin = rope_2d_angles(8, 3, 3)
    assert cos.shape == (9, 4)
    # Token (row 1, col 2): pair 0 turns by col * 1, pair 1 by row * 1, pair 2 by col * 0.01, pair 3 by row * 0.01.
    torch.testing.assert_close(torch.atan2(sin[5], cos[5]), torch.tensor([2.0, 1.0, 0.02, 0.01]))
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(9, 8, generator=g), torch.randn(9, 8, generator=g)
    same_q, same_k = q[:1].expand(9, 8), k[:1].expand(9, 8)
    rq, rk = apply_rope(same_q, cos, sin), apply_rope(same_k, cos, sin)
    torch.testing.assert_close(rq.norm(dim=-1), same_q.norm(dim=-1))
    # Scores depend only on the offset: (0,0)-(0,1) equals (1,1)-(1,2) (tokens 0,1 and 4,5).
    torch.testing.assert_close(rq[0] @ rk[1], rq[4] @ rk[5])


def test_outputs_equal_the_official_udit_code():
    # tests/data/udit_official_output.pt: the outputs of YuchuanTian/U-DiT's udit_models.py (run once,
    # outside this repo) for a tiny U-DiT whose state dict is N(0, std) draws in sorted-key order from
    # `seed`: "output" from its training form (train mode, label dropout off) and "output_merged" from its
    # first eval() (the in-place merge, still correct the first time). std is 0.05 rather than 0.2: with
    # 0.2 the outputs reach |90| and float32 rounding alone (the official train vs merged forms) is 1e-4.
    from conftest import REPO

    ref = torch.load(REPO / "tests" / "data" / "udit_official_output.pt", weights_only=True)
    model = build_model("U-DiT-S", **ref["config"]).eval()
    g = torch.Generator().manual_seed(ref["seed"])
    state = {k: torch.randn(v.shape, generator=g) * ref["std"] for k, v in sorted(model.state_dict().items())}
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        out = model(ref["x"], ref["t"], ref["y"])
        merged = model.deploy()(ref["x"], ref["t"], ref["y"])
    torch.testing.assert_close(out, ref["output"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged, ref["output_merged"], rtol=1e-5, atol=1e-5)
