"""The demo's two axes: digits FD sees what accuracy cannot (a set that is right but too uniform)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from bigdit.data.digits import DIGITS_MAX, load_digits_arrays
from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import eval_digits  # noqa: E402


def as_uint8(pixels: np.ndarray) -> np.ndarray:
    return np.clip(pixels / DIGITS_MAX * 255.0, 0, 255).astype(np.uint8).reshape(-1, 8, 8, 1)


@pytest.mark.slow
def test_digits_fd_floor_real_half_and_a_collapsed_set():
    real, labels = load_digits_arrays()
    first, _ = eval_digits._halves(labels)
    fd_real, floor = eval_digits.digits_fd(as_uint8(real[first]))
    assert 0 < floor < 1 and fd_real == pytest.approx(floor, rel=0.05)  # the half itself scores the floor
    # Every sample the mean image of its class: perfectly accurate, no diversity.
    means = np.stack([real[first][labels[first] == c].mean(0) for c in range(10)])
    collapsed = as_uint8(means[labels[first]])
    assert eval_digits.digits_accuracy(collapsed, labels[first]) > 0.95
    assert eval_digits.digits_fd(collapsed)[0] > 10 * floor


def test_digits_arrays_are_scikit_learns_load_digits():
    # read from the file scikit-learn bundles, without importing scikit-learn (see load_digits_arrays)
    from sklearn.datasets import load_digits

    images, labels = load_digits_arrays()
    reference = load_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.float32 and labels.dtype == np.int64
    np.testing.assert_array_equal(images, reference.images)
    np.testing.assert_array_equal(labels, reference.target)
