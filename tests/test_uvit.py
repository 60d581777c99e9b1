"""The U-ViT family: exact sizes, official layout, configs, shapes, text-to-image, official outputs."""

from __future__ import annotations

import pytest
import torch

from bigdit.models import build_model
from bigdit.models.uvit import UViT

T2I = dict(context_dim=768, context_tokens=77, num_classes=0)
T2I_REF = "U-ViT-S/2 text-to-image (77 CLIP tokens, dim 768)"
# name: (width, in+out blocks, heads, patch, final conv), from the official configs.
CONFIGS = {
    "U-ViT-S/2": (512, 12, 8, 2, True),
    "U-ViT-S/2-Deep": (512, 16, 8, 2, True),
    "U-ViT-M/4": (768, 16, 12, 4, True),
    "U-ViT-L/2": (1024, 20, 16, 2, True),
    "U-ViT-L/4": (1024, 20, 16, 4, True),
    "U-ViT-H/2": (1152, 28, 16, 2, False),
    "U-ViT-H/4": (1152, 28, 16, 4, False),
}


def _meta(name: str, **kw) -> UViT:
    with torch.device("meta"):
        return build_model(name, **kw)


def _numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name,kw,count",
    [("U-ViT-H/2", {}, 500_832_016), ("U-ViT-L/2", {}, 286_763_172), ("U-ViT-S/2", T2I, 44_692_644)],
)
def test_parameter_counts_equal_official(name, kw, count):
    assert _numel(_meta(name, **kw)) == count


@pytest.mark.parametrize("name,kw,ref", [("U-ViT-H/2", {}, "U-ViT-H/2"), ("U-ViT-S/2", T2I, T2I_REF)])
def test_state_dict_keys_and_shapes_equal_official(name, kw, ref, reference_layouts):
    ours = {k: list(v.shape) for k, v in _meta(name, **kw).state_dict().items()}
    assert ours == reference_layouts[ref]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_registered_sizes_follow_the_official_configs(name):
    width, depth, heads, patch, conv = CONFIGS[name]
    model = _meta(name)
    assert (model.hidden_size, model.patch_size) == (width, patch)
    assert len(model.in_blocks) == len(model.out_blocks) == depth // 2
    assert len(model.repeated_blocks()) == depth + 1  # the paper counts the mid block too (13 for S)
    assert model.mid_block.attn.num_heads == heads and model.mid_block.attn.qkv.bias is None
    assert isinstance(model.final_layer, torch.nn.Conv2d) == conv
    assert isinstance(model.time_embed, torch.nn.Identity)  # no time MLP in any official config
    assert (model.input_size, model.in_channels, model.num_classes, model.learn_sigma) == (32, 4, 1000, False)
    assert model.label_emb.num_embeddings == 1001  # 1000 real classes + the null row


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_backward_every_size(name):
    # Each size's heads and patch at 8 channels per head, depth 2 (in, mid, out block) and a tiny input.
    torch.manual_seed(0)
    _, _, heads, patch, _ = CONFIGS[name]
    size = 4 * patch
    model = build_model(name, input_size=size, num_classes=10, hidden_size=8 * heads, depth=2)
    x, t, y = torch.randn(2, 4, size, size), torch.tensor([0, 999]), torch.tensor([3, 7])
    out = model(x, t, y)
    assert out.shape == (2, 4, size, size)
    out.square().mean().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert model.pos_embed.grad.abs().sum() > 0  # learned positions, unlike DiT's frozen table
    assert model.out_blocks[0].skip_linear.weight.grad.abs().sum() > 0


def test_unconditional_has_no_label_token():
    for nc in (0, None):
        model = build_model("U-ViT-S/2", input_size=8, hidden_size=16, num_heads=2, depth=2, num_classes=nc)
        assert model.num_classes == 0 and model.extras == 1 and not hasattr(model, "label_emb")
        assert model.pos_embed.shape == (1, 1 + 16, 16)
        assert model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), None).shape == (2, 4, 8, 8)


def test_learn_sigma_is_not_supported():
    assert build_model("U-ViT-S/2", input_size=8, depth=2).learn_sigma is False
    with pytest.raises(ValueError, match="epsilon only"):
        build_model("U-ViT-S/2", input_size=8, depth=2, learn_sigma=True)


def test_forced_label_dropout_uses_the_null_label():
    model = build_model("U-ViT-S/2", input_size=8, hidden_size=16, num_heads=2, depth=2, num_classes=10)
    assert model.label_emb.num_embeddings == 11
    no_null = build_model("U-ViT-S/2", input_size=8, depth=2, num_classes=10, class_dropout_prob=0)
    assert no_null.label_emb.num_embeddings == 10  # e.g. the ImageNet-64 checkpoints, trained without guidance
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 6]), torch.tensor([1, 2])
    with torch.no_grad():
        forced = model(x, t, y, force_drop_ids=torch.tensor([0, 1]))
        null = model(x, t, torch.tensor([1, 10]))
    torch.testing.assert_close(forced, null, rtol=0, atol=0)
    model.eval()
    with torch.no_grad():  # no random dropout in eval mode
        torch.testing.assert_close(model(x, t, y), model(x, t, y), rtol=0, atol=0)


def test_text_to_image_variant():
    model = build_model(
        "U-ViT-S/2", input_size=8, hidden_size=16, num_heads=2, depth=2, num_classes=0, context_dim=12, context_tokens=5
    )
    assert model.extras == 6 and model.pos_embed.shape == (1, 6 + 16, 16) and not hasattr(model, "label_emb")
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([5, 6]), torch.randn(2, 5, 12)
    out = model(x, t, c)
    assert out.shape == (2, 4, 8, 8)
    # Caption dropout is done in the data pipeline: force_drop_ids is accepted and ignored.
    torch.testing.assert_close(model(x, t, c, force_drop_ids=torch.tensor([1, 1])), out, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"expects y \(N, 5, 12\)"):
        model(x, t, torch.randn(2, 4, 12))
    with pytest.raises(ValueError, match="num_classes=0"):
        build_model("U-ViT-S/2", input_size=8, depth=2, context_dim=12)


def test_wrong_input_shape_is_a_clear_error():
    model = build_model("U-ViT-S/2", input_size=8, hidden_size=16, num_heads=2, depth=2)
    with pytest.raises(ValueError, match=r"expects input \(N, 4, 8, 8\)"):
        model(torch.randn(1, 4, 16, 16), torch.tensor([1]), torch.tensor([1]))


def test_initialisation_matches_upstream():
    model = build_model("U-ViT-S/2", input_size=16, depth=2)
    assert model.pos_embed.requires_grad
    assert model.pos_embed.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.mid_block.mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.mid_block.mlp.fc1.bias.abs().sum() == 0
    assert torch.equal(model.norm.weight, torch.ones(512)) and model.norm.bias.abs().sum() == 0


@pytest.mark.parametrize("variant", ["class", "t2i"])
def test_outputs_equal_the_official_uvit_code(variant):
    # tests/data/uvit_official_output.pt: outputs of baofff/U-ViT's libs/uvit.py ("class": 10 classes + null,
    # time MLP on) and libs/uvit_t2i.py ("t2i": 5 context tokens of width 16), run once outside this repo
    # with timm's Mlp, for tiny models whose state dicts are N(0, std) draws in sorted-key order from `seed`.
    from conftest import REPO

    ref = torch.load(REPO / "tests" / "data" / "uvit_official_output.pt", weights_only=True)
    case = ref[variant]
    model = build_model("U-ViT-S/2", **case["config"]).eval()
    g = torch.Generator().manual_seed(ref["seed"])
    state = {k: torch.randn(v.shape, generator=g) * ref["std"] for k, v in sorted(model.state_dict().items())}
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        out = model(case["x"], case["t"], case["y"])
    torch.testing.assert_close(out, case["output"], rtol=1e-5, atol=1e-5)
