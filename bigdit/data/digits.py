"""scikit-learn's ``load_digits`` (1,797 real 8x8 handwritten digits, bundled with scikit-learn) as pixels.

Used by the demo: small enough to train a class-conditional DiT on two CPU cores in minutes.
"""

from __future__ import annotations

import numpy as np
import torch

#: load_digits pixels are integers 0..16.
DIGITS_MAX = 16.0


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 8, 8) in 0..16 and labels (N,) as shipped with scikit-learn (what ``load_digits`` returns).

    The file scikit-learn bundles (64 pixels then the label per row) is read directly: importing scikit-learn for it
    costs ~2 s in every process of every demo-sized run, more than the whole training of most tests."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the digits come with scikit-learn: pip install scikit-learn")
    data = np.loadtxt(Path(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz"), delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8).astype(np.float32), data[:, -1].astype(np.int64)


class Digits:
    """The digits as (1, 8, 8) images scaled to [-1, 1], labels 0..9."""

    num_classes = 10
    sample_shape = (1, 8, 8)

    def __init__(self) -> None:
        images, labels = load_digits_arrays()
        self.x = torch.from_numpy(images / (DIGITS_MAX / 2) - 1.0).unsqueeze(1)
        self.y = torch.from_numpy(labels)

    def __len__(self) -> int:
        return len(self.y)

    def get(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        idx = torch.from_numpy(indices)
        return {"x": self.x[idx], "y": self.y[idx]}
