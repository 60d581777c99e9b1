"""The numbers of an evaluation, from features: Fréchet distance, Inception Score, precision and recall.

Everything here works on features (no network), so it is exact to test on synthetic data. The statistics
that FID, sFID and FD-DINOv2 compare accumulate as float64 sums (:class:`MomentAccumulator`: count,
``sum x`` and ``sum x x^T``), so ranks that each saw a slice of the images add their sums with one
all-reduce and get the mean and covariance of the whole set: no rank ever holds another's features.
The Inception Score accumulates the same way, per split (:class:`InceptionScoreAccumulator`).

The formulas follow ADM's evaluator (openai/guided-diffusion ``evaluations/evaluator.py``):

* Fréchet distance: ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2))`` with ``scipy.linalg.sqrtm``;
  when the square root is not finite it is retried with ``eps`` added to both diagonals; a complex result
  is accepted only when the diagonal's imaginary part is within 1e-3 of zero. Covariances are unbiased
  (``np.cov``'s ``n - 1``).
* Inception Score: ``exp(mean_x KL(p(y|x) || p(y)))`` per contiguous split of ``split_size`` samples (ADM:
  5,000, i.e. 10 splits of the 50K protocol), averaged over splits; no shuffling.
* Precision/recall: the k-NN manifold estimator of Kynkäänniemi et al. as ADM runs it (k = 3, squared
  euclidean distances in row x column blocks of 10,000): the radius of a point is its squared distance to
  its k-th nearest neighbour in its own set (itself at distance 0 not counted); a point is inside the other
  set's manifold when it is within the radius of at least one point of that set. Precision is the share of
  samples inside the reference manifold, recall the share of reference points inside the sample manifold.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import torch

#: Sums a tensor over ranks (in place or returning the sum), e.g. ``torch.distributed.all_reduce``.
ReduceFn = Callable[[torch.Tensor], "torch.Tensor | None"]


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """Full float32 CUDA matmuls and convolutions (no TF32) inside the block, as the reference implementations
    compute; the previous settings come back after it. Does nothing without CUDA.

    Uses the legacy ``allow_tf32`` flags, or the ``fp32_precision`` API where the process already uses that one
    (torch refuses to read the legacy flags after the new API has set them).
    """
    if not torch.cuda.is_available():
        yield
        return
    mm, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    try:
        saved = (mm.allow_tf32, cudnn.allow_tf32)
        mm.allow_tf32 = cudnn.allow_tf32 = False
        legacy = True
    except RuntimeError:
        saved = (mm.fp32_precision, cudnn.conv.fp32_precision)
        mm.fp32_precision = cudnn.conv.fp32_precision = "ieee"
        legacy = False
    try:
        yield
    finally:
        if legacy:
            mm.allow_tf32, cudnn.allow_tf32 = saved
        else:
            mm.fp32_precision, cudnn.conv.fp32_precision = saved


def default_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the ranks of the default process group when one with several ranks is up, else as is."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def local_reduce(t: torch.Tensor) -> torch.Tensor:
    """The reduce of a single process: nothing to add."""
    return t


def _reduce(t: torch.Tensor, reduce_fn: ReduceFn | None) -> torch.Tensor:
    out = (reduce_fn or default_reduce)(t)
    return t if out is None else out


class MomentAccumulator:
    """Count, ``sum x`` and ``sum x x^T`` of D-dim features in float64, on ``device``.

    ``update`` per batch on each rank, then ``reduced()`` (one all-reduce of the sums) and ``mean_cov()``.
    Two accumulators over two halves of a set add up (``merge``) to the accumulator of the whole set.
    """

    def __init__(self, dim: int, device: str | torch.device = "cpu"):
        self.dim = int(dim)
        self.n = 0
        self.s = torch.zeros(self.dim, dtype=torch.float64, device=device)
        self.ss = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=device)

    @property
    def device(self) -> torch.device:
        return self.s.device

    def update(self, x: torch.Tensor | np.ndarray) -> MomentAccumulator:
        """Add a batch of features (N, D)."""
        x = torch.as_tensor(x).to(self.device, torch.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features of shape {tuple(x.shape)}, expected (N, {self.dim})")
        self.n += int(x.shape[0])
        self.s += x.sum(0)
        self.ss += x.T @ x
        return self

    def merge(self, other: MomentAccumulator) -> MomentAccumulator:
        """Add another accumulator's sums (the in-process equivalent of the all-reduce)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge {other.dim}-dim moments into {self.dim}-dim ones")
        self.n += other.n
        self.s += other.s.to(self.device)
        self.ss += other.ss.to(self.device)
        return self

    def reduced(self, reduce_fn: ReduceFn | None = None) -> MomentAccumulator:
        """A copy whose sums are summed over ranks by ``reduce_fn`` (default: the process group's all-reduce
        when one is up). This accumulator is left as it is, so calling it twice never double-counts."""
        out = MomentAccumulator(self.dim, self.device)
        head = _reduce(torch.cat([torch.tensor([float(self.n)], dtype=torch.float64, device=self.device),
                                  self.s]), reduce_fn)
        out.n = int(round(float(head[0])))
        out.s = head[1:].clone()
        out.ss = _reduce(self.ss.clone(), reduce_fn)
        return out

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean (D,), unbiased covariance (D, D)) as float64 numpy, as ``np.mean``/``np.cov`` give them."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.n}")
        mu = self.s / self.n
        sigma = (self.ss - torch.outer(mu, mu) * self.n) / (self.n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


FID_METHODS = ("sqrtm", "eigh")


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6, method: str = "sqrtm") -> float:
    """Fréchet distance between Gaussians.

    ``method="sqrtm"``: ADM's ``FIDStatistics.frechet_distance`` (``scipy.linalg.sqrtm(S1 S2)``, eps retry,
    imaginary-part check). ``"eigh"``: ``tr sqrt(S1 S2)`` as ``sum sqrt(eig(sqrt(S1) S2 sqrt(S1)))`` from two
    symmetric eigendecompositions: the same number for covariance matrices (to ~1e-9 relative on full-rank
    statistics) in a fraction of the time on 2048x2048 ones.
    """
    from scipy import linalg

    if method not in FID_METHODS:
        raise ValueError(f"method={method!r}: use one of {FID_METHODS}")
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors have different lengths: {mu1.shape}, {mu2.shape}")
    if sigma1.shape != sigma2.shape:
        raise ValueError(f"covariances have different dimensions: {sigma1.shape}, {sigma2.shape}")
    diff = mu1 - mu2
    if method == "eigh":
        w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
        root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        inner = root @ sigma2 @ root
        tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum())
        return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates",
                      stacklevel=2)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Fréchet distance: imaginary component {np.max(np.abs(covmean.imag))} in sqrtm")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


class InceptionScoreAccumulator:
    """Per-split sums of the Inception Score over ranks: for each contiguous split of ``split_size`` samples
    (by global sample index), the count, ``sum_x sum_y p log p`` and ``sum_x p(y|x)``, in float64.

    ``update(logits, start)``: ``start`` is the global index of the batch's first sample (ranks that each
    evaluate a contiguous slice pass their offset); left out, it continues from this accumulator's own count,
    which is right for one process. The score of a split is ``exp(mean_x sum_y p log p - sum_y pbar log pbar)``
    with ``pbar`` its mean prediction, the same number as ADM's ``mean_x KL(p(y|x) || pbar)``.
    """

    def __init__(self, split_size: int = 5000, num_classes: int = 1008, device: str | torch.device = "cpu"):
        if split_size < 1:
            raise ValueError(f"split_size={split_size}: must be >= 1")
        self.split_size = int(split_size)
        self.num_classes = int(num_classes)
        self.device = torch.device(device)
        self.rows: dict[int, torch.Tensor] = {}  # split -> [count, sum p log p, sum p (C)]
        self.count = 0

    def update(self, logits: torch.Tensor | np.ndarray, start: int | None = None) -> InceptionScoreAccumulator:
        logits = torch.as_tensor(logits).to(self.device, torch.float64)
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"logits of shape {tuple(logits.shape)}, expected (N, {self.num_classes})")
        start = self.count if start is None else int(start)
        logp = torch.log_softmax(logits, dim=1)
        p = logp.exp()
        plogp = (p * logp).sum(1)
        split = (start + torch.arange(len(logits), device=self.device)) // self.split_size
        for s in torch.unique(split).tolist():
            m = split == s
            row = self.rows.setdefault(s, torch.zeros(2 + self.num_classes, dtype=torch.float64, device=self.device))
            row[0] += m.sum()
            row[1] += plogp[m].sum()
            row[2:] += p[m].sum(0)
        self.count += len(logits)
        return self

    def compute(self, reduce_fn: ReduceFn | None = None) -> float:
        """The Inception Score of everything all ranks added (mean over splits)."""
        total = int(round(float(_reduce(torch.tensor([float(self.count)], dtype=torch.float64,
                                                      device=self.device), reduce_fn)[0])))
        if total == 0:
            raise ValueError("Inception Score of no samples")
        nsplit = math.ceil(total / self.split_size)
        if self.rows and max(self.rows) >= nsplit:
            raise ValueError(f"Inception Score: sample index {max(self.rows) * self.split_size} or more given, but "
                             f"only {total} samples in all: pass each rank's global offset as start=")
        table = torch.zeros(nsplit, 2 + self.num_classes, dtype=torch.float64, device=self.device)
        for s, row in self.rows.items():
            table[s] = row
        table = _reduce(table, reduce_fn)
        n = table[:, 0]
        want = torch.full_like(n, self.split_size)
        want[-1] = total - (nsplit - 1) * self.split_size
        if not torch.equal(n, want):
            raise ValueError(f"Inception Score: splits hold {n.long().tolist()} samples, expected "
                             f"{want.long().tolist()}: ranks' sample indices overlap or leave gaps (pass start=)")
        pbar = table[:, 2:] / n[:, None]
        kl = table[:, 1] / n - torch.special.xlogy(pbar, pbar).sum(1)
        return float(torch.exp(kl).mean())


def inception_score(logits: torch.Tensor | np.ndarray, split_size: int = 5000) -> float:
    """Inception Score of logits (N, C) in order: contiguous splits of ``split_size`` (the last one holds the
    rest), mean over splits (ADM's ``compute_inception_score``)."""
    logits = torch.as_tensor(logits)
    acc = InceptionScoreAccumulator(split_size, logits.shape[1], logits.device)
    return acc.update(logits, 0).compute(local_reduce)


class ManifoldEstimator:
    """ADM's k-NN manifold estimator (``nhood_sizes=(k,)``), in torch on ``device``, in float32.

    ``half=True`` computes the distance blocks in float16 first, as ADM does on its GPU (falling back to
    float32 for a block that overflows); the default float32 blocks are what ADM falls back to.
    """

    def __init__(self, k: int = 3, row_batch_size: int = 10000, col_batch_size: int = 10000,
                 device: str | torch.device = "cpu", half: bool = False):
        self.k = int(k)
        self.row_batch_size = int(row_batch_size)
        self.col_batch_size = int(col_batch_size)
        self.device = torch.device(device)
        self.half = half

    def _features(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(x)
        if x.ndim != 2:
            raise ValueError(f"features of shape {tuple(x.shape)}, expected (N, D)")
        return x.to(torch.float32)

    def distances(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Squared euclidean distances (len(u), len(v)), float32, clamped at 0."""
        u = u.to(self.device, torch.float32)
        v = v.to(self.device, torch.float32)
        if self.half:
            d = _pairwise(u.half(), v.half())
            if torch.isfinite(d).all():
                return d.float()
        with ieee_fp32():
            return _pairwise(u, v)

    def radii(self, features: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Squared distance of each feature to its k-th nearest neighbour in ``features`` (N,), float32."""
        f = self._features(features)
        n = len(f)
        if n <= self.k:
            raise ValueError(f"the k-NN manifold of {n} points needs more than k={self.k} of them")
        out = torch.empty(n, dtype=torch.float32)
        for a in range(0, n, self.row_batch_size):
            rows = f[a : a + self.row_batch_size]
            best = None
            for b in range(0, n, self.col_batch_size):
                d = self.distances(rows, f[b : b + self.col_batch_size])
                best = d if best is None else torch.cat([best, d], dim=1)
                best = best.topk(min(self.k + 1, best.shape[1]), dim=1, largest=False).values
            out[a : a + len(rows)] = best[:, self.k].cpu()  # ascending: index 0 is the point itself
        return out

    def evaluate_pr(self, ref: torch.Tensor | np.ndarray, ref_radii: torch.Tensor,
                    samples: torch.Tensor | np.ndarray, sample_radii: torch.Tensor) -> tuple[float, float]:
        """(precision, recall): the share of samples inside the reference manifold, and of reference points
        inside the sample manifold."""
        ref, samples = self._features(ref), self._features(samples)
        ref_in = torch.zeros(len(ref), dtype=torch.bool)
        sample_in = torch.zeros(len(samples), dtype=torch.bool)
        rr = torch.as_tensor(ref_radii).to(self.device, torch.float32)
        sr = torch.as_tensor(sample_radii).to(self.device, torch.float32)
        for a in range(0, len(ref), self.row_batch_size):
            rows = ref[a : a + self.row_batch_size]
            for b in range(0, len(samples), self.col_batch_size):
                d = self.distances(rows, samples[b : b + self.col_batch_size])
                ref_in[a : a + len(rows)] |= (d <= sr[None, b : b + d.shape[1]]).any(1).cpu()
                sample_in[b : b + d.shape[1]] |= (d <= rr[a : a + len(rows), None]).any(0).cpu()
        return float(sample_in.double().mean()), float(ref_in.double().mean())


def _pairwise(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ADM's ``_batch_pairwise_distances``: ``max(|u|^2 - 2 u.v + |v|^2, 0)``."""
    nu = (u * u).sum(1)[:, None]
    nv = (v * v).sum(1)[None, :]
    return torch.clamp(nu - 2 * (u @ v.T) + nv, min=0.0)


def precision_recall(ref_features: torch.Tensor | np.ndarray, sample_features: torch.Tensor | np.ndarray,
                     k: int = 3, device: str | torch.device = "cpu", **kwargs) -> tuple[float, float]:
    """(precision, recall) of samples against reference features (ADM's ``compute_prec_recall``)."""
    est = ManifoldEstimator(k=k, device=device, **kwargs)
    return est.evaluate_pr(ref_features, est.radii(ref_features), sample_features, est.radii(sample_features))
