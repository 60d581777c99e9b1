"""Write tests/data/adm_official_output.pt: outputs of openai/guided-diffusion's own classes on random weights.

Runs the official ``UNetModel``/``EncoderUNetModel`` (guided-diffusion@22e0df8) on tiny configs covering both
attention orders, ``resblock_updown`` true and false (with and without ``conv_resample``), scale-shift and
additive conditioning, labels and none, and both classifier heads. It imports nothing from bigdit: the test
builds bigdit's classes from the same keyword dicts and regenerates the same weights from ``seed``.

    G=$(fetch github:openai/guided-diffusion)   # a bare git directory
    mkdir -p /tmp/gd/guided_diffusion && touch /tmp/gd/guided_diffusion/__init__.py
    for f in unet nn fp16_util logger; do git --git-dir=$G show HEAD:guided_diffusion/$f.py \
        > /tmp/gd/guided_diffusion/$f.py; done
    .venv/bin/python tests/data/make_adm_golden.py /tmp/gd tests/data/adm_official_output.pt
"""

from __future__ import annotations

import sys

import torch

BASE = dict(image_size=16, in_channels=3, model_channels=32, num_res_blocks=1, attention_resolutions=(2, 4),
            channel_mult=(1, 2, 2), dropout=0.0)
UNETS = {
    "legacy_updown": dict(BASE, out_channels=6, num_classes=10, num_heads=2, use_scale_shift_norm=True,
                          resblock_updown=True),
    "new_order_conv_resample": dict(BASE, out_channels=3, num_head_channels=16, use_new_attention_order=True),
    "legacy_pool_nearest": dict(BASE, out_channels=6, num_classes=10, num_heads=2, num_heads_upsample=1,
                                conv_resample=False, use_scale_shift_norm=True),
}
CLASSIFIERS = {
    "classifier_attention": dict(BASE, out_channels=10, num_head_channels=16, use_scale_shift_norm=True,
                                 resblock_updown=True, pool="attention"),
    "classifier_adaptive": dict(BASE, out_channels=10, num_heads=2, use_new_attention_order=True, pool="adaptive"),
}
SEED, STD = 0, 0.1


def random_state(model: torch.nn.Module, seed: int, std: float) -> dict[str, torch.Tensor]:
    """N(0, std) draws for every entry, in sorted-key order (what the test regenerates)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * std for k, v in sorted(model.state_dict().items())}


def main(official_dir: str, out: str) -> None:
    sys.path.insert(0, official_dir)
    from guided_diffusion.unet import EncoderUNetModel, UNetModel

    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([3, 871]), torch.tensor([4, 9])
    cases = {}
    for i, (name, config) in enumerate({**UNETS, **CLASSIFIERS}.items()):
        classifier = name in CLASSIFIERS
        model = (EncoderUNetModel if classifier else UNetModel)(**config).eval()
        model.load_state_dict(random_state(model, SEED + i, STD), strict=True)
        with torch.no_grad():
            output = model(x, t) if classifier else model(x, t, y if config.get("num_classes") else None)
        cases[name] = {"config": config, "seed": SEED + i, "output": output}
        print(name, tuple(output.shape), f"max |out| {output.abs().max():.3f}")
    torch.save({"x": x, "t": t, "y": y, "std": STD, "cases": cases}, out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
