"""Sample-quality evaluation: ADM's protocol (FID, sFID, Inception Score, precision/recall) on the TF-faithful
2015 Inception, optional FD-DINOv2 (EDM2) and CLIP score; ``tools/evaluate.py`` is its command line.

Modules (imported on first use; the package itself needs only torch and numpy):

* :mod:`~bigdit.evaluation.stats`: the math on features (Fréchet distance, IS, manifold precision/recall)
  and the float64 accumulators that all-reduce over ranks.
* :mod:`~bigdit.evaluation.inception`: the network (torch-fidelity's port; ``load_inception``).
* :mod:`~bigdit.evaluation.reference`: ADM ``.npz`` batches (lazy ``arr_0``, statistics, input checks).
* :mod:`~bigdit.evaluation.evaluator`: ``FIDEvaluator`` / ``FeatureFD`` for in-training evaluation.
* :mod:`~bigdit.evaluation.runner`: ``evaluate`` / ``make_reference``, what the tool runs.
* :mod:`~bigdit.evaluation.sources`, :mod:`~bigdit.evaluation.dinov2`, :mod:`~bigdit.evaluation.clip`.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MomentAccumulator": "stats", "InceptionScoreAccumulator": "stats", "ManifoldEstimator": "stats",
    "frechet_distance": "stats", "inception_score": "stats", "precision_recall": "stats",
    "default_reduce": "stats", "local_reduce": "stats",
    "InceptionV3": "inception", "load_inception": "inception", "spatial_features": "inception",
    "read_batch": "reference", "write_reference": "reference", "NpzArray": "reference",
    "FIDEvaluator": "evaluator", "FeatureFD": "evaluator",
    "evaluate": "runner", "make_reference": "runner",
    "load_dinov2": "dinov2", "CLIPScorer": "clip",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
