"""ADM (guided-diffusion's U-Net and noisy classifier): exact sizes, official layout, official outputs, FLOPs."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bigdit.engine.blocks import apply_block_options
from bigdit.models import MODELS, build_model
from bigdit.models.adm import AttentionBlock, EncoderUNetModel, GroupNorm32, ResBlock, UNetModel

UNET_COUNTS = {"ADM-64": 295_904_454, "ADM-128": 421_529_606, "ADM-256": 553_838_086,
               "ADM-256-uncond": 552_814_086, "ADM-512": 558_997_638}
CLASSIFIER_COUNTS = {"ADM-classifier-64": 65_438_568, "ADM-classifier-128": 42_568_040,
                     "ADM-classifier-256": 54_096_360, "ADM-classifier-512": 54_448_360}
# Every module kind at 16x16: three levels, attention at rates 2 and 4, 32 channels (GroupNorm's 32 groups).
TINY = dict(input_size=16, model_channels=32, num_res_blocks=1, attention_resolutions=(2, 4), channel_mult=(1, 2, 2),
            num_classes=10, num_head_channels=16)


@pytest.fixture(scope="module")
def adm_reference() -> dict:
    """Official layouts, flags and counts from ../shared/reference/adm_state_dict_keys.json."""
    from conftest import REFERENCE

    path = REFERENCE.parent / "adm_state_dict_keys.json"
    if not path.is_file():
        pytest.skip(f"{path} not present (it sits beside the checkout in CI and developer machines)")
    return json.loads(path.read_text())


def _meta(name: str, **kw) -> torch.nn.Module:
    with torch.device("meta"):
        return build_model(name, **kw) if kw else _meta_registered(name)


@functools.cache
def _meta_registered(name: str) -> torch.nn.Module:
    # Several tests read the same full-size layouts (read only); building each once keeps the file fast.
    return build_model(name)


def _numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _inputs(n: int = 2):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 16, 16, generator=g), torch.tensor([3, 871][:n]), torch.tensor([4, 9][:n])


def _randomise(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    # Random weights everywhere: the zero-initialised output convolutions would hide most of the network.
    g = torch.Generator().manual_seed(seed)
    model.load_state_dict({k: torch.randn(v.shape, generator=g) * std for k, v in sorted(model.state_dict().items())})
    return model


@pytest.mark.parametrize("name", sorted({**UNET_COUNTS, **CLASSIFIER_COUNTS}))
def test_parameter_counts_equal_official(name, adm_reference):
    model = _meta(name)
    assert _numel(model) == {**UNET_COUNTS, **CLASSIFIER_COUNTS}[name]
    flags = adm_reference["flags"][name.replace("ADM-classifier", "classifier")]
    assert len(model.state_dict()) == flags["num_state_dict_entries"]


@pytest.mark.parametrize("name", sorted(UNET_COUNTS))
def test_state_dict_keys_and_shapes_equal_official(name, adm_reference):
    ours = {k: list(v.shape) for k, v in _meta(name).state_dict().items()}
    assert ours == adm_reference[name]


@pytest.mark.parametrize("name", sorted(UNET_COUNTS))
def test_registry_equals_the_official_constructor_arguments(name, adm_reference):
    # The exact UNetModel kwargs create_model resolved from the README flags build the same layout.
    kwargs = adm_reference["flags"][name]["unet_model_kwargs"]
    with torch.device("meta"):
        model = UNetModel(**kwargs)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == adm_reference[name]


def test_registry_and_attributes():
    assert set(UNET_COUNTS) | set(CLASSIFIER_COUNTS) <= set(MODELS)
    model = _meta("ADM-256")
    assert (model.input_size, model.in_channels, model.out_channels, model.num_classes) == (256, 3, 6, 1000)
    assert model.learn_sigma and model.label_emb.num_embeddings == 1000  # no null class by default
    assert _meta("ADM-256-uncond").num_classes is None and not hasattr(_meta("ADM-256-uncond"), "label_emb")
    classifier = _meta("ADM-classifier-64")
    assert isinstance(classifier, EncoderUNetModel) and classifier.num_classes == 1000
    with pytest.raises(KeyError, match="ADM-256"):
        build_model("ADM-1024")


def test_outputs_equal_the_official_code():
    # tests/data/adm_official_output.pt: outputs of openai/guided-diffusion@22e0df8's UNetModel/EncoderUNetModel
    # (eval mode) for tiny configs whose state dicts are N(0, std) draws in sorted-key order from each case's
    # seed. Made outside this repo with tests/data/make_adm_golden.py (its docstring has the commands):
    #   .venv/bin/python tests/data/make_adm_golden.py /tmp/gd tests/data/adm_official_output.pt
    from conftest import REPO

    ref = torch.load(REPO / "tests" / "data" / "adm_official_output.pt", weights_only=True)
    assert len(ref["cases"]) == 5
    for name, case in ref["cases"].items():
        config = case["config"]
        classifier = "pool" in config
        model = _randomise((EncoderUNetModel if classifier else UNetModel)(**config).eval(), case["seed"], ref["std"])
        with torch.no_grad():
            out = model(ref["x"], ref["t"]) if classifier else model(ref["x"], ref["t"], ref["y"])
        torch.testing.assert_close(out, case["output"], rtol=1e-5, atol=1e-5, msg=name)
        if name == "legacy_updown":
            # The head layout matters: the same weights read in the other order give other outputs.
            other = _randomise(UNetModel(**config, use_new_attention_order=True).eval(), case["seed"], ref["std"])
            with torch.no_grad():
                assert (other(ref["x"], ref["t"], ref["y"]) - case["output"]).abs().max() > 1e-3


def _counted_forward_flops(model, *args) -> int:
    # The math SDPA backend decomposes attention into bmm, which the counter sees.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(*args)
    return counter.get_total_flops()


@pytest.mark.parametrize("name,kw", [
    ("ADM-256", {}),
    ("ADM-64", {"resblock_updown": False, "num_heads": 2, "num_head_channels": -1, "use_scale_shift_norm": False}),
    ("ADM-128", {"resblock_updown": False, "conv_resample": False}),
    ("ADM-classifier-64", {}),
    ("ADM-classifier-128", {"pool": "adaptive"}),
])
def test_formula_matches_flop_counter(name, kw):
    model = build_model(name, **{**TINY, **kw})
    x, t, y = _inputs()
    args = (x, t) if isinstance(model, EncoderUNetModel) else (x, t, y)
    assert model.forward_flops() * 2 == _counted_forward_flops(model, *args)


@pytest.mark.parametrize("name,gmacs", [("ADM-256", 1120), ("ADM-512", 1983)])
def test_formula_reproduces_the_published_gflops(name, gmacs):
    # DiT paper, Tables 4 and 5: ADM costs 1,120 (256px) and 1,983 (512px) GFLOPs (multiply-adds) per forward;
    # the formula gives 1,119.8 and 1,982.3 (FlopCounterMode on the meta device agrees to the FLOP).
    assert _meta(name).forward_flops() / 2 / 1e9 == pytest.approx(gmacs, rel=1e-3)


def test_repeated_blocks_are_the_res_and_attention_blocks():
    model = build_model("ADM-256", **TINY)
    blocks = model.repeated_blocks()
    # down: 3 levels x 1 res block + 2 down blocks; middle: res, attention, res; up: 3 levels x 2 + 2 up blocks;
    # attention after each res block at rates 2 and 4: 2 on the way down, 4 on the way up.
    assert sum(isinstance(b, ResBlock) for b in blocks) == 5 + 2 + 8
    assert sum(isinstance(b, AttentionBlock) for b in blocks) == 2 + 1 + 4
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    rest = {n.split(".")[0] for n, p in model.named_parameters() if id(p) not in in_blocks}
    assert rest == {"time_embed", "label_emb", "input_blocks", "out"}  # the stem convolution stays with the root
    assert len(build_model("ADM-classifier-64", **TINY).repeated_blocks()) == 5 + 2 + 3


def test_activation_checkpointing_keeps_outputs_and_gradients():
    x, t, y = _inputs()
    grads = []
    for checkpointing in (False, True):
        model = _randomise(build_model("ADM-64", **TINY, dropout=0.0))
        apply_block_options(model, activation_checkpointing=checkpointing)
        model(x, t, y).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], msg=n)
    assert all(g.abs().sum() > 0 for n, g in grads[0].items() if n != "label_emb.weight")


def test_groupnorm_runs_in_float32_under_bf16_autocast():
    norm = GroupNorm32(64)
    x = torch.randn(2, 64, 4, 4).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, torch.nn.functional.group_norm(x.float(), 32, norm.weight, norm.bias).to(torch.bfloat16))
    model = _randomise(build_model("ADM-64", **TINY)).eval()
    x, t, y = _inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x, t, y)
    with torch.no_grad():
        torch.testing.assert_close(low.float(), model(x, t, y), rtol=0.05, atol=0.05)


def test_null_class_for_guidance():
    model = _randomise(build_model("ADM-64", **TINY, class_dropout_prob=0.1)).eval()
    assert model.label_emb.num_embeddings == 11
    x, t, y = _inputs()
    with torch.no_grad():
        dropped = model(x, t, y, force_drop_ids=torch.tensor([0, 1]))
        torch.testing.assert_close(dropped[0], model(x, t, y)[0])
        torch.testing.assert_close(dropped[1], model(x, t, torch.tensor([4, 10]))[1])
    # Without the null row (the official layout) the loop's all-zero drop ids change nothing.
    plain = _randomise(build_model("ADM-64", **TINY)).eval()
    with torch.no_grad():
        assert torch.equal(plain(x, t, y, force_drop_ids=torch.zeros(2, dtype=torch.long)), plain(x, t, y))


def test_bigdit_and_official_keywords():
    assert _meta("ADM-256", learn_sigma=False).out_channels == 3
    assert _meta("ADM-256", input_size=64).image_size == _meta("ADM-256", image_size=64).input_size == 64
    assert _meta("ADM-256", num_classes=0).num_classes is None
    assert _meta("ADM-classifier-256", num_classes=10, input_size=64).out_channels == 10
    # use_fp16 / use_checkpoint are run options here (run.precision, run.activation_checkpointing): no new layout.
    keys = _meta("ADM-128").state_dict().keys()
    assert _meta("ADM-128", use_fp16=True, use_checkpoint=True).state_dict().keys() == keys


@pytest.mark.parametrize("kw,match", [
    ({"dims": 3}, "dims=3"),
    ({"learn_sigma": False, "out_channels": 6}, "contradicts learn_sigma"),
    ({"image_size": 64, "input_size": 32}, "name the same side"),
    ({"input_size": 20}, "must be divisible by 32 for 6 levels"),
    ({"num_classes": None, "class_dropout_prob": 0.1}, "needs class labels"),
    ({"num_head_channels": 48}, "not divisible into heads of 48"),
    ({"attention_resolutions": "32,16,8"}, "sequences of numbers"),
    ({"channel_mult": (1, 2)}, r"reach only \[1, 2\]: drop \[8, 16, 32\]"),
    ({"model_channels": 48}, "multiple of 32"),
])
def test_bad_arguments_are_refused_before_building(kw, match):
    with pytest.raises(ValueError, match=match):
        _meta("ADM-256", **kw)


def test_bad_inputs_name_the_expected_shape():
    model = build_model("ADM-64", **TINY)
    with pytest.raises(ValueError, match=r"\(N, 3, 16, 16\)"):
        model(torch.randn(1, 3, 32, 32), torch.tensor([1]), torch.tensor([1]))
    with pytest.raises(ValueError, match="expects labels"):
        model(torch.randn(1, 3, 16, 16), torch.tensor([1]))
    with pytest.raises(ValueError, match="pool='spatial'"):
        _meta("ADM-classifier-64", pool="spatial")
