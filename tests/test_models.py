"""The DiT family: exact sizes, official layout, initialisation, shapes, loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bigdit.models import MODELS, build_model, extract_state_dict, load_weights
from bigdit.models.layers import sincos_2d, timestep_embedding

OFFICIAL_COUNTS = {"DiT-S/2": 32_963_360, "DiT-B/2": 130_512_416, "DiT-L/2": 458_102_816, "DiT-XL/2": 675_129_632}


def _meta(name: str, **kw) -> torch.nn.Module:
    with torch.device("meta"):
        return build_model(name, **kw)


@pytest.mark.parametrize("name,count", OFFICIAL_COUNTS.items())
def test_parameter_counts_equal_official(name, count):
    assert sum(p.numel() for p in _meta(name).parameters()) == count


@pytest.mark.parametrize("name", ["DiT-S/2", "DiT-XL/2"])
def test_state_dict_keys_and_shapes_equal_official(name, reference_layouts):
    ours = {k: list(v.shape) for k, v in _meta(name).state_dict().items()}
    assert ours == reference_layouts[name]


def test_registry_has_every_size_and_patch():
    assert {f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)} <= set(MODELS)


def test_unknown_model_lists_valid_names():
    with pytest.raises(KeyError, match="DiT-XL/2"):
        build_model("DiT-XXL/2")


@pytest.mark.parametrize("name", sorted(n for n in MODELS if n.startswith("DiT-")))
def test_forward_backward_every_size(name):
    # Each size's width, heads and patch at depth 2 and a 16x16 input keep this fast on CPU.
    torch.manual_seed(0)
    model = build_model(name, input_size=16, num_classes=10, depth=2)
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([0, 999]), torch.tensor([3, 7])
    out = model(x, t, y)
    assert out.shape == (2, 8, 16, 16)
    # adaLN-Zero makes the untrained output zero; perturb the final layer so gradients reach every block.
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.02)
    model(x, t, y).square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert model.pos_embed.grad is None  # the position table is frozen, as in the paper


def test_learn_sigma_off_halves_output_channels():
    model = build_model("DiT-S/8", input_size=16, learn_sigma=False, depth=1)
    assert model(torch.randn(1, 4, 16, 16), torch.tensor([5]), torch.tensor([1])).shape == (1, 4, 16, 16)


def test_adaln_zero_initialisation():
    model = build_model("DiT-S/4", input_size=16, depth=3)
    for block in model.blocks:
        assert block.adaLN_modulation[-1].weight.abs().sum() == 0 and block.adaLN_modulation[-1].bias.abs().sum() == 0
    for p in (model.final_layer.linear.weight, model.final_layer.linear.bias, model.final_layer.adaLN_modulation[-1].weight):
        assert p.abs().sum() == 0
    assert model(torch.randn(2, 4, 16, 16), torch.tensor([1, 2]), torch.tensor([0, 1])).abs().max() == 0
    assert model.y_embedder.embedding_table.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_null_class_row_and_forced_label_dropout():
    model = build_model("DiT-S/4", input_size=16, num_classes=10, depth=1)
    assert model.y_embedder.embedding_table.num_embeddings == 11
    assert build_model("DiT-S/4", input_size=16, num_classes=10, depth=1, class_dropout_prob=0).y_embedder.embedding_table.num_embeddings == 10
    labels = torch.tensor([1, 2, 3])
    dropped = model.y_embedder.token_drop(labels, force_drop_ids=torch.tensor([0, 1, 0]))
    assert dropped.tolist() == [1, 10, 3]


def test_position_embedding_is_the_2d_sincos_table():
    # Independent closed form: token (row r, col c), channel k of D: the first D/2 channels embed the column
    # (sin then cos of c * 10000^(-k/(D/4))), the last D/2 the row.
    d, g = 16, 4
    table = sincos_2d(d, g)
    omega = 1.0 / 10000 ** (np.arange(d // 4) / (d // 4))
    for r in range(g):
        for c in range(g):
            want = np.concatenate([np.sin(c * omega), np.cos(c * omega), np.sin(r * omega), np.cos(r * omega)])
            np.testing.assert_allclose(table[r * g + c], want, atol=1e-12)
    model = build_model("DiT-S/2", input_size=8, hidden_size=16, num_heads=2, depth=1)
    np.testing.assert_allclose(model.pos_embed[0].numpy(), table, atol=1e-7)


def test_position_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    theirs = get_2d_sincos_pos_embed(64, 8, base_size=8, output_type="pt").numpy()
    np.testing.assert_allclose(sincos_2d(64, 8), theirs, atol=1e-6)


def test_timestep_embedding_closed_form():
    emb = timestep_embedding(torch.tensor([0.0, 10.0]), 8)
    freqs = np.exp(-np.log(10000) * np.arange(4) / 4)
    np.testing.assert_allclose(emb[1].numpy(), np.concatenate([np.cos(10 * freqs), np.sin(10 * freqs)]), rtol=1e-6)
    assert emb[0, :4].eq(1).all() and emb[0, 4:].eq(0).all()


def test_load_plain_state_dict_and_training_checkpoint(tmp_path):
    src = build_model("DiT-S/4", input_size=16, depth=1)
    for p in src.parameters():
        p.data.normal_()
    plain = src.state_dict()
    ema = {k: v + 1 for k, v in plain.items()}
    torch.save(plain, tmp_path / "plain.pt")
    torch.save({"model": plain, "ema": ema, "step": 3}, tmp_path / "train.pt")

    dst = build_model("DiT-S/4", input_size=16, depth=1)
    load_weights(dst, tmp_path / "plain.pt")
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in plain.items())
    load_weights(dst, tmp_path / "train.pt")  # EMA preferred
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in ema.items())
    load_weights(dst, tmp_path / "train.pt", prefer="model")
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in plain.items())
    with pytest.raises(ValueError, match="not a model checkpoint"):
        extract_state_dict({"step": 3, "config": {}})
    with pytest.raises(RuntimeError, match="Missing key"):
        load_weights(build_model("DiT-S/4", input_size=16, depth=2), tmp_path / "plain.pt")
    with pytest.raises(FileNotFoundError):
        load_weights(dst, tmp_path / "absent.pt")


def test_wrong_input_shape_is_a_clear_error():
    model = build_model("DiT-S/2", input_size=8, depth=1)
    with pytest.raises(ValueError, match=r"expects input \(N, 4, 8, 8\)"):
        model(torch.randn(1, 4, 16, 16), torch.tensor([1]), torch.tensor([1]))


def test_blocks_equal_timm_modules_the_official_dit_uses():
    # facebookresearch/DiT builds on timm's PatchEmbed, Attention and Mlp; ours must compute the same
    # function from the same state dict so official checkpoints give official outputs.
    from timm.models.vision_transformer import Attention as TimmAttention, Mlp as TimmMlp, PatchEmbed as TimmPatchEmbed

    from bigdit.models.layers import Attention, Mlp, PatchEmbed

    torch.manual_seed(0)
    pairs = [
        (TimmAttention(64, num_heads=4, qkv_bias=True), Attention(64, 4), torch.randn(2, 16, 64)),
        (TimmMlp(64, 256, act_layer=lambda: torch.nn.GELU(approximate="tanh"), drop=0), Mlp(64, 256), torch.randn(2, 16, 64)),
        (TimmPatchEmbed(16, 2, 4, 64, bias=True), PatchEmbed(2, 4, 64), torch.randn(2, 4, 16, 16)),
    ]
    for theirs, ours, x in pairs:
        ours.load_state_dict(theirs.state_dict(), strict=True)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


def test_outputs_equal_the_official_dit_code():
    # tests/data/dit_official_output.pt: the output of facebookresearch/DiT's models.py (run once, outside
    # this repo) for a small DiT whose state dict is N(0, 0.2) draws in sorted-key order from seed 1234.
    # Loading the same state dict into ours must reproduce it, which is what makes official checkpoints usable.
    from conftest import REPO

    ref = torch.load(REPO / "tests" / "data" / "dit_official_output.pt", weights_only=True)
    cfg = dict(ref["config"])
    model = build_model(f"DiT-S/{cfg.pop('patch_size')}", **cfg).eval()
    g = torch.Generator().manual_seed(ref["seed"])
    state = {k: torch.randn(v.shape, generator=g) * ref["std"] for k, v in sorted(model.state_dict().items())}
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        out = model(ref["x"], ref["t"], ref["y"])
    torch.testing.assert_close(out, ref["output"], rtol=1e-5, atol=1e-5)
