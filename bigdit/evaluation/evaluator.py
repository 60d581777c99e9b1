"""Streaming metrics for a training loop: :class:`FIDEvaluator` (FID, sFID, IS against an ADM reference
batch) and :class:`FeatureFD` (the Fréchet distance of any feature extractor's features, e.g. a small
classifier's for the digits demo).

Each rank calls ``update`` on its own batches; ``compute(reduce_fn)`` sums the float64 statistics over ranks
(``reduce_fn``: default ``torch.distributed.all_reduce`` when a process group is up, e.g. a strategy's
``all_reduce``-style sum) and returns the same numbers on every rank. ``compute`` does not consume the
state: call ``reset()`` before the next evaluation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bigdit.evaluation.stats import (InceptionScoreAccumulator, MomentAccumulator, ReduceFn, frechet_distance,
                                     local_reduce)


class FeatureFD:
    """Fréchet distance of streamed (N, D) features against reference statistics ``(mu, sigma)``."""

    def __init__(self, ref_mu: np.ndarray, ref_sigma: np.ndarray, device: str | torch.device = "cpu",
                 method: str = "sqrtm"):
        self.method = method
        self.ref_mu = np.asarray(ref_mu, np.float64)
        self.ref_sigma = np.asarray(ref_sigma, np.float64)
        d = self.ref_mu.shape[0]
        if self.ref_mu.shape != (d,) or self.ref_sigma.shape != (d, d):
            raise ValueError(f"reference statistics {self.ref_mu.shape} / {self.ref_sigma.shape}: expected (D,), (D, D)")
        self.acc = MomentAccumulator(d, device)

    @classmethod
    def from_features(cls, ref_features: np.ndarray | torch.Tensor, device: str | torch.device = "cpu",
                      method: str = "sqrtm") -> FeatureFD:
        """Reference statistics from reference features (N, D) (mean and unbiased covariance)."""
        mu, sigma = MomentAccumulator(np.shape(ref_features)[1], device).update(ref_features).mean_cov()
        return cls(mu, sigma, device, method)

    def update(self, features: np.ndarray | torch.Tensor) -> None:
        self.acc.update(features)

    def statistics(self, reduce_fn: ReduceFn | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) of everything all ranks added."""
        return self.acc.reduced(reduce_fn).mean_cov()

    def compute(self, reduce_fn: ReduceFn | None = None) -> float:
        return frechet_distance(*self.statistics(reduce_fn), self.ref_mu, self.ref_sigma, method=self.method)

    def reset(self) -> None:
        self.acc = MomentAccumulator(self.acc.dim, self.acc.device)


class FIDEvaluator:
    """FID, sFID and Inception Score of generated images against an ADM reference batch, for in-training use.

    ``FIDEvaluator(ref_npz, inception_weights, device)``; per batch on each rank ``update(images)`` (uint8
    (N, H, W, 3) at the reference's resolution; ``bigdit.inference.to_uint8_images`` makes them from model
    outputs), then ``compute()`` -> ``{"fid", "sfid", "is", "num_samples"}``. The reference's statistics come
    from the npz (ADM's batches carry them) or, when it has none, from its images, once, here.
    ``fid_method``: ADM's ``sqrtm``, or ``eigh`` (the same number, several times faster on 2048x2048
    covariances).

    IS splits are contiguous runs of ``is_split_size`` samples by global index: ranks that generate
    contiguous slices pass ``start=`` (the global index of the batch's first image); in one process the
    default (the count so far) is right. The protocol's numbers need 50,000 samples; fewer give biased but
    comparable-across-checkpoints values.
    """

    def __init__(self, ref: str | Path, inception_weights: str | Path | None = None,
                 device: str | torch.device = "cpu", batch_size: int = 100, is_split_size: int = 5000,
                 fid_method: str = "sqrtm", net=None):
        from bigdit.evaluation.inception import load_inception
        from bigdit.evaluation.reference import read_batch

        self.device = torch.device(device)
        self.net = net if net is not None else load_inception(inception_weights, self.device, batch_size)
        batch = read_batch(ref, "reference batch")
        self.resolution = batch.resolution
        stats = dict(batch.stats)
        if "pool" not in stats or "spatial" not in stats:
            from bigdit.evaluation.inception import POOL_DIM, SPATIAL_DIM

            acc = {"pool": MomentAccumulator(POOL_DIM, self.device), "spatial": MomentAccumulator(SPATIAL_DIM, self.device)}
            for a in range(0, len(batch.images), batch_size):
                f = self.net.features(batch.images.read(a, a + batch_size))
                acc["pool"].update(f["pool"])
                acc["spatial"].update(f["spatial"])
            for k, v in acc.items():
                stats.setdefault(k, v.mean_cov())
        self.fid = FeatureFD(*stats["pool"], device=self.device, method=fid_method)
        self.sfid = FeatureFD(*stats["spatial"], device=self.device, method=fid_method)
        self.is_split_size = is_split_size
        self.isc = InceptionScoreAccumulator(is_split_size, device=self.device)

    def update(self, images: np.ndarray | torch.Tensor, start: int | None = None) -> None:
        x = torch.as_tensor(images)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected uint8 images (N, H, W, 3), got {x.dtype} {tuple(x.shape)}")
        if tuple(x.shape[1:3]) != tuple(self.resolution):
            raise ValueError(f"images are {x.shape[1]}x{x.shape[2]} but the reference batch is "
                             f"{self.resolution[0]}x{self.resolution[1]}")
        f = self.net.features(x)
        self.fid.update(f["pool"])
        self.sfid.update(f["spatial"])
        self.isc.update(f["logits"], start)

    def compute(self, reduce_fn: ReduceFn | None = None) -> dict[str, float]:
        fid_acc = self.fid.acc.reduced(reduce_fn)
        return {"fid": frechet_distance(*fid_acc.mean_cov(), self.fid.ref_mu, self.fid.ref_sigma,
                                        method=self.fid.method),
                "sfid": self.sfid.compute(reduce_fn), "is": self.isc.compute(reduce_fn),
                "num_samples": fid_acc.n}

    def reset(self) -> None:
        self.fid.reset()
        self.sfid.reset()
        self.isc = InceptionScoreAccumulator(self.is_split_size, device=self.device)


__all__ = ["FIDEvaluator", "FeatureFD", "local_reduce"]
