#!/usr/bin/env python
"""Score generated digits: ``python tools/eval_digits.py samples=runs/demo/samples/samples.npz``.

Fits an independent classifier (an RBF SVM) on scikit-learn's real digits and reports the share of
generated samples it assigns to the digit they were conditioned on (chance is 0.1).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

import bigdit  # noqa: F401
from bigdit.data.digits import DIGITS_MAX, load_digits_arrays


def digits_accuracy(images_uint8: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of an SVM trained on all 1,797 real digits, on generated (N, 8, 8, 1) uint8 images."""
    from sklearn.svm import SVC

    real, real_labels = load_digits_arrays()
    clf = SVC(gamma=0.001, C=10.0).fit(real.reshape(len(real), -1), real_labels)
    x = images_uint8.reshape(len(images_uint8), -1).astype(np.float32) / 255.0 * DIGITS_MAX
    return float((clf.predict(x) == labels).mean())


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
    if "run" in args:
        run = Path(args["run"])
        (run / "eval.json").write_text(json.dumps({"digits_accuracy": acc, "samples": len(labels)}) + "\n")
        print(f"outputs: {run}/samples/grid.png, {run}/samples/samples.npz, {run}/metrics.jsonl, {run}/loss.png")
    print(f"digits accuracy: {acc:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
