#!/usr/bin/env python
"""Score generated digits: ``python tools/eval_digits.py samples=runs/demo/samples/samples.npz``.

Two numbers, one per axis a generative model can fail on:

- **digits accuracy** (fidelity to the condition): an independent classifier (an RBF SVM) fit on scikit-learn's
  real digits; the share of generated samples it assigns to the digit they were conditioned on (chance 0.1).
- **digits FD** (fidelity and diversity, as FID at MNIST scale): the Fréchet distance between generated and real
  digits in the feature space of a small classifier fit on the real digits (the 64 hidden ReLU units of an MLP),
  computed by the same metric code as ``tools/evaluate.py`` (:mod:`bigdit.evaluation.stats`). A set that is
  accurate but too uniform within each class scores a high FD. The real digits are split into two
  class-stratified halves: the generated set is compared with one half, and the floor is the FD between the two
  halves (what a perfect model would score with as many samples). The generated set should have about as many
  samples as a half (~900) for the two to be comparable: the FD of a finite sample is biased upwards.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import bigdit  # noqa: F401
from bigdit.data.digits import DIGITS_MAX, load_digits_arrays
from bigdit.fsio import write_json_atomic
from bigdit.inference import save_grid


def digits_accuracy(images_uint8: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of an SVM trained on all 1,797 real digits, on generated (N, 8, 8, 1) uint8 images."""
    from sklearn.svm import SVC

    real, real_labels = load_digits_arrays()
    clf = SVC(gamma=0.001, C=10.0).fit(real.reshape(len(real), -1), real_labels)
    x = images_uint8.reshape(len(images_uint8), -1).astype(np.float32) / 255.0 * DIGITS_MAX
    return float((clf.predict(x) == labels).mean())


def _halves(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of two class-stratified halves of the real digits (fixed seed: the same floor every time)."""
    rng = np.random.default_rng(seed)
    first, second = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        first.append(idx[: len(idx) // 2])
        second.append(idx[len(idx) // 2 :])
    return np.concatenate(first), np.concatenate(second)


def digits_fd(images_uint8: np.ndarray) -> tuple[float, float]:
    """(FD of generated (N, 8, 8, 1) uint8 digits against half of the real ones, the real-vs-real floor)."""
    from sklearn.neural_network import MLPClassifier

    from bigdit.evaluation.stats import MomentAccumulator, frechet_distance

    real, real_labels = load_digits_arrays()
    real = real.reshape(len(real), -1) / DIGITS_MAX
    clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=600, random_state=0).fit(real, real_labels)

    def stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        hidden = np.maximum(x @ clf.coefs_[0] + clf.intercepts_[0], 0.0)  # the classifier's feature layer
        return MomentAccumulator(hidden.shape[1]).update(hidden).mean_cov()

    first, second = _halves(real_labels)
    reference = stats(real[second])
    generated = images_uint8.reshape(len(images_uint8), -1).astype(np.float64) / 255.0
    return frechet_distance(*stats(generated), *reference), frechet_distance(*stats(real[first]), *reference)


def grid_of(images: np.ndarray, labels: np.ndarray, per_class: int = 10) -> np.ndarray:
    """The first ``per_class`` samples of each digit 0-9 in order: the rows of the demo's grid.png (blank where a
    digit has fewer)."""
    rows = []
    for c in range(10):
        mine = images[labels == c][:per_class]
        rows.append(np.concatenate([mine, np.zeros((per_class - len(mine), *images.shape[1:]), np.uint8)]))
    return np.concatenate(rows)


def main(argv: list[str]) -> None:
    args = dict(a.split("=", 1) for a in argv)
    if "samples" not in args:
        sys.exit("usage: eval_digits.py samples=<samples.npz> [run=<run dir>]")
    path = Path(args["samples"])
    if not path.is_file():
        sys.exit(f"{path} does not exist: run tools/sample.py first")
    data = np.load(path)
    images, labels = data["arr_0"], data["arr_1"]
    if images.shape[1:] != (8, 8, 1):
        sys.exit(f"{path} holds {images.shape[1:]} images, not 8x8x1 digits")
    acc = digits_accuracy(images, labels)
    fd, floor = digits_fd(images)
    if "run" in args:
        run = Path(args["run"])
        save_grid(grid_of(images, labels), rows=10, path=path.parent / "grid.png")
        write_json_atomic(run / "eval.json", {"digits_accuracy": acc, "digits_fd": fd, "digits_fd_real_vs_real": floor,
                                              "samples": len(labels), "samples_npz": str(path)}, indent=1)
        print(f"outputs: {run}/samples/grid.png, {path}, {run}/metrics.jsonl, {run}/loss.png, {run}/eval.json")
    print(f"digits FD: {fd:.2f} (real vs real: {floor:.2f})")
    print(f"digits accuracy: {acc:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
