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
def reference_layouts() -> dict:
    """Official state-dict layouts ({model: {key: shape}}) from ../shared/reference."""
    if not REFERENCE.is_file():
        pytest.skip(f"{REFERENCE} not present (it sits beside the checkout in CI and developer machines)")
    return json.loads(REFERENCE.read_text())
