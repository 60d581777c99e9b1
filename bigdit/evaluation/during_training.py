"""FID during training (``eval=fid``): every ``eval.every`` steps every rank samples its share with the EMA
weights as the strategy holds them, the Inception statistics are all-reduced (never gathered), and FID, sFID
and IS go into that step's metrics.jsonl record; every ``eval.grid_every`` steps a small guided grid is
written to ``<run.dir>/samples/step-N.png``.

The EMA is swapped into the strategy's own tensors (its shards under FSDP2/ZeRO-3) for the evaluation and
swapped back exactly afterwards (:meth:`bigdit.ema.EMA.swapped_into`): sharded EMA is not gathered onto one
rank, the model is not copied, and the training trajectory is the same with evaluation on or off. Sample i's
label and noise depend only on ``(eval.seed, i)``, as in ``tools/sample.py``, so the evaluation set of a
step is the same for any number of ranks.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from bigdit.data.schema import Manifest
from bigdit.diffusion import Schedule, Transport, dit_cfg_scale
from bigdit.ema import EMA
from bigdit.engine import Strategy
from bigdit.evaluation.evaluator import FIDEvaluator
from bigdit.inference import check_sampler_kind, generate, image_decoder, save_grid, to_uint8_images


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """``module.eval()`` within the block, its previous mode restored afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class TrainingEvaluation:
    """The ``eval`` group's evaluations of a training run; built by the loop before any step (it loads the
    Inception network and the reference batch first, so a bad ``eval.ref`` fails before compute)."""

    def __init__(self, cfg: DictConfig, strategy: Strategy, ema: EMA, diffusion: Schedule | Transport,
                 on_grid: Callable[[str, np.ndarray, int], None] | None = None):
        e = cfg.eval
        self.on_grid = on_grid  # e.g. the trackers' log_image, called on the main rank with each grid
        self.cfg, self.strategy, self.ema, self.diffusion = e, strategy, ema, diffusion
        check_sampler_kind(diffusion, e.sampler)  # a flow run evaluates with eval.sampler=euler|heun|dopri5|sde
        self.every, self.grid_every = int(e.every or 0), int(e.grid_every or 0)
        if self.every and self.every % cfg.run.log_every:
            raise ValueError(f"eval.every={self.every} must be a multiple of run.log_every={cfg.run.log_every}: "
                             f"evaluation results go into that step's metrics.jsonl record")
        model = strategy.module
        if getattr(model, "context_dim", None) is not None:
            raise ValueError("eval=fid samples class labels; for a text-to-image run sample prompts with tools/sample.py "
                             "and score them with tools/evaluate.py")
        self.num_classes = int(model.num_classes or 0)
        self.cfg_scale = dit_cfg_scale(float(e.cfg_scale), e.cfg_convention)
        root = OmegaConf.select(cfg, "data.root")
        manifest = Manifest.load(root) if root is not None else None
        latent = manifest is not None and manifest.vae != "none"
        vae = e.vae or (manifest.vae if latent else None)
        self.decode = image_decoder(vae, manifest.codec() if latent else None, strategy.device, model.in_channels)
        self.clip_denoised = vae is None  # ADM clips x0 in pixel space only
        self.fid = (FIDEvaluator(e.ref, e.inception_weights, strategy.device, e.batch_size, fid_method=e.fid_method)
                    if self.every else None)

    def due(self, step: int) -> bool:
        """Whether step ``step`` evaluates or draws a grid."""
        return bool((self.every and step % self.every == 0) or (self.grid_every and step % self.grid_every == 0))

    def __call__(self, step: int, run_dir: str | Path) -> dict[str, float]:
        """Run what is due at ``step`` (collective): FID/sFID/IS (same numbers on every rank), the grid on rank 0."""
        out: dict[str, float] = {}
        start = time.perf_counter()
        with self.ema.swapped_into([t for _, t in self.strategy.ema_targets()]), eval_mode(self.strategy.module):
            if self.every and step % self.every == 0:
                out.update(self._fid())
            if self.grid_every and step % self.grid_every == 0:
                self._grid(Path(run_dir) / "samples" / f"step-{step}.png", step)
        out["eval_s"] = time.perf_counter() - start
        return out

    def _sample(self, labels: torch.Tensor, indices: torch.Tensor) -> np.ndarray:
        e = self.cfg
        x = generate(self.strategy.module, self.diffusion, labels, sampler=e.sampler, steps=int(e.steps),
                     cfg_scale=self.cfg_scale, guidance=e.guidance, clip_denoised=self.clip_denoised, seed=int(e.seed),
                     indices=indices, batch_size=len(labels), precision=e.precision, device=self.strategy.device)
        images = to_uint8_images(self.decode(x))
        return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images  # Inception sees RGB

    def _fid(self) -> dict[str, float]:
        """This rank's chunks r, r + W, ... of ``eval.num_samples`` (balanced labels: sample i is class i mod K).
        Every rank runs the same number of batches (a rank without a chunk left samples one and drops it), as
        sharded strategies gather parameters collectively in each forward."""
        n, batch = int(self.cfg.num_samples), int(self.cfg.batch_size)
        rank, world = self.strategy.info.rank, self.strategy.info.world_size
        chunks = math.ceil(n / batch)
        for it in range(math.ceil(chunks / world)):
            c = rank + it * world
            first = min(c, chunks - 1) * batch  # past the last chunk: sample the last one again, then drop it
            indices = torch.arange(first, min(first + batch, n))
            images = self._sample(indices % max(self.num_classes, 1), indices)
            if c < chunks:
                self.fid.update(images, start=int(indices[0]))
        metrics = self.fid.compute()
        self.fid.reset()
        return {k: float(v) for k, v in metrics.items() if k != "num_samples"}

    def _grid(self, path: Path, step: int) -> None:
        """``eval.grid_per_class`` samples of the first ``eval.grid_classes`` classes, one row per class."""
        rows, per = max(min(int(self.cfg.grid_classes), self.num_classes), 1), int(self.cfg.grid_per_class)
        indices = torch.arange(rows * per)
        images = self._sample(indices // per, indices)
        if self.strategy.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_grid(images, rows, path)
            if self.on_grid is not None:
                self.on_grid("samples", np.asarray(Image.open(path).convert("RGB")), step)
