"""Shared test fixtures: reference layouts, digit shards, the tiny VAE / CLIP tower / captioned images the tool
tests load through the real loading code, repo paths."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bigdit  # noqa: F401  (environment fixes before third-party imports)

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO.parent / "shared" / "reference" / "state_dict_keys.json"

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def digit_shards(tmp_path_factory) -> dict[str, Path]:
    """480 digits in 24 shards of 20 (flips stored), in both formats, made by the real tools once per session."""
    import sys

    from hydra import compose, initialize_config_dir

    from bigdit.train import CONFIG_DIR

    sys.path.insert(0, str(REPO / "tools"))
    import encode_latents
    import shards

    base = tmp_path_factory.mktemp("shards")
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("encode_latents", overrides=["input=sklearn:digits", f"out={base / 'wds'}", "limit=480",
                                                   "shard_size=20", "num_workers=0", "progress=false"])
    encode_latents.run(cfg)
    shards.convert(str(base / "wds"), str(base / "mds"), progress=False)
    return {"wds": base / "wds", "mds": base / "mds"}


@pytest.fixture(scope="session")
def reference_layouts() -> dict:
    """Official state-dict layouts ({model: {key: shape}}) from ../shared/reference."""
    if not REFERENCE.is_file():
        pytest.skip(f"{REFERENCE} not present (it sits beside the checkout in CI and developer machines)")
    return json.loads(REFERENCE.read_text())


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=8, layers_per_block=1, sample_size=16, scaling_factor=0.5)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> tuple[str, Path]:
    import open_clip

    d = tmp_path_factory.mktemp("clip")
    (d / "tiny-clip-test.json").write_text(json.dumps({
        "embed_dim": 24, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}))
    open_clip.add_model_config(str(d / "tiny-clip-test.json"))
    torch.manual_seed(0)
    torch.save(open_clip.create_model("tiny-clip-test").state_dict(), d / "tiny.pt")
    return str(d / "tiny-clip-test.json"), d / "tiny.pt"


def image(seed: int, size=(40, 28)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def caption_tars(tmp_path_factory) -> Path:
    """img2dataset-style input: jpg + txt + json members."""
    root = tmp_path_factory.mktemp("tars")
    for t in range(2):
        with tarfile.open(root / f"{t:05d}.tar", "w") as tar:
            for i in range(3):
                key = f"{t:05d}{i:04d}"
                buf = io.BytesIO()
                image(100 + 3 * t + i).save(buf, format="JPEG")
                for ext, data in (("jpg", buf.getvalue()), ("txt", f"photo number {i} of {t}".encode()),
                                  ("json", json.dumps({"url": f"http://x/{key}"}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return root


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    """torch-fidelity's Inception with random weights (He-initialised convolutions, so that features neither
    vanish nor explode through the 94 layers), saved as a state dict file: the tests load it through the
    same path as the real weights-inception-2015-12-05-6726825d.pth."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from bigdit.evaluation.inception import WEIGHTS_NAME

    class Random(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random init
            return None

    d = tmp_path_factory.mktemp("inception")
    torch.save({}, d / "empty.pth")
    torch.manual_seed(0)
    net = Random("random", ["2048"], feature_extractor_weights_path=str(d / "empty.pth"))
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), d / WEIGHTS_NAME)
    return d / WEIGHTS_NAME


@pytest.fixture(scope="session")
def two_nodes() -> tuple[str, str]:
    """The two namespace nodes of partition ``two`` (``launchers/slurm_cluster.sh nodes=2``: idempotent, brought
    up here and left up, beside the one-node partition that tests/test_slurm.py uses; tear down with
    ``launchers/slurm_cluster.sh nodes=2 down``). Without root they cannot be made: skip with the reason."""
    import os
    import shutil
    import subprocess

    script = REPO / "launchers" / "slurm_cluster.sh"
    if subprocess.run([str(script), "nodes=2", "--check"], capture_output=True).returncode == 0:
        return "bigdit-n1", "bigdit-n2"
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("the two-node SLURM tests need root (network namespaces, a bridge, two slurmd): run them as "
                    "root, e.g. `sudo make test`, or start the nodes with `sudo launchers/slurm_cluster.sh nodes=2`")
    proc = subprocess.run([str(script), "nodes=2"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"launchers/slurm_cluster.sh nodes=2 failed:\n{proc.stdout}\n{proc.stderr}"
    return "bigdit-n1", "bigdit-n2"


def pytest_terminal_summary(terminalreporter):
    """Print the one-line summaries the fault-injection (``fault`` property) and two-node (``summary``) cases
    record, also from xdist workers."""
    for prop, title in (("fault", "Faults survived"), ("summary", "Two-node checks")):
        lines = [value for report in terminalreporter.stats.get("passed", []) if report.when == "call"
                 for name, value in report.user_properties if name == prop]
        if lines:
            terminalreporter.section(title)
            for line in sorted(lines):
                terminalreporter.write_line(line)
