"""Text-conditioned (cross-attention) DiT and U-DiT, our extension: interface, zero-init, layout, deploy."""

from __future__ import annotations

import copy

import pytest
import torch

from bigdit.engine.blocks import apply_block_options
from bigdit.models import build_model
from bigdit.models.layers import CrossAttention

CTX_DIM, CTX_TOKENS = 16, 5
TEXT = dict(context_dim=CTX_DIM, context_tokens=CTX_TOKENS, num_classes=0)
# Tiny but complete: U-DiT head dims 16/32/64 (2-D RoPE needs multiples of 4), every level present.
TINY = {
    "DiT-S/2": dict(input_size=8, hidden_size=32, num_heads=2, depth=2),
    "U-DiT-S": dict(input_size=8, hidden_size=32, num_heads=2, depth=(1, 1, 2, 1, 1)),
}
NAMES = sorted(TINY)
# The new modules of the text form; everything else must keep the class form's names.
TEXT_KEY_PARTS = ("cross_attn", "norm_cross", "caption_embedder")


def _tiny(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, **{**TINY[name], **TEXT, **kw})


def _meta(name: str, **kw) -> torch.nn.Module:
    with torch.device("meta"):
        return build_model(name, **kw)


def _numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _randomise(model: torch.nn.Module, keep=lambda key: False, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """N(0, std) in every state-dict entry except those ``keep`` selects (zero-initialised layers hide the rest)."""
    g = torch.Generator().manual_seed(seed)
    state = {k: v if keep(k) else torch.randn(v.shape, generator=g) * std for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    return model


def _inputs(n: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=g)
    return x, torch.tensor([3, 871, 500][:n]), torch.randn(n, CTX_TOKENS, CTX_DIM, generator=g)


def _is_cross_out(key: str) -> bool:
    return "cross_attn" in key and ".proj." in key


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_forward_backward_shapes_and_gradients(name, learn_sigma):
    model = _tiny(name, learn_sigma=learn_sigma)
    assert (model.context_dim, model.context_tokens, model.num_classes) == (CTX_DIM, CTX_TOKENS, 0)
    assert not any("y_embedder" in k for k in model.state_dict())
    x, t, ctx = _inputs()
    out = model(x, t, ctx)
    assert out.shape == (2, 8 if learn_sigma else 4, 8, 8)
    _randomise(model)
    model(x, t, ctx).square().mean().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("name", NAMES)
def test_force_drop_ids_and_train_mode_do_not_change_the_text_form(name):
    # Caption dropout is the training loop's job (it swaps in the empty-prompt embedding).
    model = _randomise(_tiny(name))
    x, t, ctx = _inputs()
    with torch.no_grad():
        want = model.eval()(x, t, ctx)
        got = model.train()(x, t, ctx, force_drop_ids=torch.tensor([1, 1]))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_zero_initialised_cross_attention_ignores_the_context(name):
    model = _tiny(name)
    cross_out = {k: v for k, v in model.state_dict().items() if _is_cross_out(k)}
    assert cross_out and all(v.abs().sum() == 0 for v in cross_out.values())
    # Everything random but the cross-attention outputs: the network computes a non-trivial function of
    # (x, t) that cannot see the context yet.
    _randomise(model, keep=_is_cross_out).eval()
    x, t, ctx = _inputs()
    other = torch.randn_like(ctx) * 3
    with torch.no_grad():
        out = model(x, t, ctx)
        assert out.abs().max() > 0
        torch.testing.assert_close(model(x, t, other), out, rtol=0, atol=0)
        for key, value in cross_out.items():
            model.get_parameter(key).copy_(torch.randn_like(value) * 0.05)
        assert not torch.allclose(model(x, t, other), model(x, t, ctx), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_clear_errors_for_labels_and_wrong_context(name):
    for num_classes in (10, 1000):
        with pytest.raises(ValueError, match="has no class labels; pass num_classes=0"):
            build_model(name, **{**TINY[name], **TEXT, "num_classes": num_classes})
    model = _tiny(name, num_classes=None)  # None means no labels too
    x, t, ctx = _inputs()
    wrong = [torch.tensor([1, 2]), ctx[:, :-1], ctx[..., :-1], torch.cat([ctx, ctx]), None]
    for y in wrong:
        with pytest.raises(ValueError, match=rf"expects y \(N, {CTX_TOKENS}, {CTX_DIM}\)"):
            model(x, t, y)


def _new_text_keys(name: str, model: torch.nn.Module, context_dim: int) -> dict[str, list[int]]:
    """The state-dict entries the text form adds, written out from the design (independent of the code)."""
    new: dict[str, list[int]] = {}

    def cross(block: str, w: int, subs: tuple[str, ...]) -> None:
        for sub in subs:  # DiT blocks have one cross-attention, U-DiT blocks one per sub-block ("1", "2")
            new.update({f"{block}.norm_cross{sub}.weight": [w], f"{block}.norm_cross{sub}.bias": [w]})
            for lin, out in (("q_linear", w), ("kv_linear", 2 * w), ("proj", w)):
                key = f"{block}.cross_attn{sub}.{lin}"
                new.update({f"{key}.weight": [out, w], f"{key}.bias": [out]})

    def caption(prefix: str, w: int) -> None:
        new.update({f"{prefix}.fc1.weight": [w, context_dim], f"{prefix}.fc1.bias": [w],
                    f"{prefix}.fc2.weight": [w, w], f"{prefix}.fc2.bias": [w]})

    c = model.hidden_size
    if name.startswith("DiT"):
        for i in range(len(model.blocks)):
            cross(f"blocks.{i}", c, ("",))
        caption("caption_embedder", c)
        return new
    levels = {"encoder_level_1": c, "encoder_level_2": 2 * c, "latent": 4 * c, "decoder_level_2": 2 * c,
              "decoder_level_1": 2 * c}
    for level, w in levels.items():
        for i in range(len(getattr(model, level))):
            cross(f"{level}.{i}", w, ("1", "2"))
    for i, w in enumerate((c, 2 * c, 4 * c), start=1):
        caption(f"caption_embedder_{i}", w)
    return new


@pytest.mark.parametrize("name", ["DiT-S/2", "DiT-XL/2", "U-DiT-S", "U-DiT-B"])
def test_state_dict_is_the_class_layout_minus_labels_plus_text_modules(name):
    cls = {k: list(v.shape) for k, v in _meta(name).state_dict().items()}
    text_model = _meta(name, context_dim=768, context_tokens=77, num_classes=0)
    text = {k: list(v.shape) for k, v in text_model.state_dict().items()}
    labels = {k for k in cls if "y_embedder" in k}
    assert labels and all(k.endswith("embedding_table.weight") for k in labels)
    assert not any(part in k for k in cls for part in TEXT_KEY_PARTS)  # the class form gained nothing
    added = {k: v for k, v in text.items() if any(part in k for part in TEXT_KEY_PARTS)}
    assert added == _new_text_keys(name, text_model, 768)
    assert {k: v for k, v in text.items() if k not in added} == {k: v for k, v in cls.items() if k not in labels}


def _text_params(name: str, model: torch.nn.Module, context_dim: int) -> int:
    """Parameters the text form adds: per cross-attention affine norm 2w + q, kv, out 4w^2 + 4w; per caption
    embedder context_dim*w + w + w^2 + w."""
    def cross(w: int) -> int:
        return 2 * w + 4 * w * w + 4 * w

    def caption(w: int) -> int:
        return context_dim * w + w + w * w + w

    d = model.hidden_size
    if name.startswith("DiT"):
        return len(model.blocks) * cross(d) + caption(d)
    widths = [d] * 2 + [2 * d] * 5 + [4 * d] * 8 + [2 * d] * 5 + [2 * d] * 2  # official depth (2, 5, 8, 5, 2)
    return sum(2 * cross(w) for w in widths) + sum(caption(w) for w in (d, 2 * d, 4 * d))


@pytest.mark.parametrize("name", ["DiT-XL/2", "DiT-S/2", "U-DiT-B", "U-DiT-S"])
def test_parameter_count_formula(name):
    cls = _meta(name)
    text = _meta(name, context_dim=768, context_tokens=77, num_classes=0)
    d = cls.hidden_size
    tables = d * 1001 if name.startswith("DiT") else 1001 * (d + 2 * d + 4 * d)  # 1000 classes + null row
    assert _numel(text) == _numel(cls) - tables + _text_params(name, text, 768)
    if name.startswith("U-DiT"):  # re-parameterisation removes the same FFN weights as in the class form
        assert _numel(text) - _numel(text.deploy()) == _numel(cls) - _numel(cls.deploy())


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_activation_checkpointing_gives_identical_outputs_and_grads(name):
    plain = _randomise(_tiny(name))
    ckpt = apply_block_options(copy.deepcopy(plain), activation_checkpointing=True)
    x, t, ctx = _inputs()
    outs, grads = [], []
    for model in (plain, ckpt):
        out = model(x, t, ctx)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    assert grads[1].keys() == grads[0].keys()
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=0, atol=0, msg=n)
    assert len(plain.repeated_blocks()) == (2 if name.startswith("DiT") else 6)


@pytest.mark.slow
def test_udit_text_deploy_equals_training_form_and_leaves_it_untouched():
    model = _randomise(_tiny("U-DiT-S")).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, t, ctx = _inputs()
    with torch.no_grad():
        want = model(x, t, ctx)
        merged = model.deploy()
        got = merged(x, t, ctx)
    assert not merged.rep and merged.context_dim == CTX_DIM
    assert sum(isinstance(m, CrossAttention) for m in merged.modules()) == 2 * len(model.repeated_blocks())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    # A merged text checkpoint loads into the rep=False text layout with strict=True.
    direct = _tiny("U-DiT-S", rep=False).eval()
    direct.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(direct(x, t, ctx), got, rtol=0, atol=0)
