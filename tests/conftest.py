"""Shared test fixtures: reference layouts, a tiny demo-like config, repo paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

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
