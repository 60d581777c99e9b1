"""Loading trained models back and drawing guided samples (used by tools/sample.py and the demo)."""

from __future__ import annotations

from pathlib import Path
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from bigdit.checkpoint import latest_checkpoint, step_tag
from bigdit.diffusion import Schedule, guided_model_fn, sample
from bigdit.export import consolidated_weights
from bigdit.models import build_model


def load_run(run_dir: str | Path, step: int | None = None, weights: str = "ema") -> tuple[torch.nn.Module, DictConfig]:
    """The model of a training run (EMA weights by default) and the run's resolved config."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: is {run_dir} a bigdit run directory (run.dir of bigdit-train)?")
    cfg = OmegaConf.load(cfg_path)
    root = run_dir / "checkpoints"
    ckpt_dir = latest_checkpoint(root) if step is None else root / step_tag(step)
    if ckpt_dir is None or not ckpt_dir.is_dir():
        have = sorted(p.name for p in root.glob("step-*")) if root.is_dir() else []
        raise FileNotFoundError(f"no checkpoint {'latest' if step is None else step_tag(step)} in {root}; available: {have}")
    model = build_model(**cfg.model)
    # Any strategy's checkpoint (DDP, FSDP2 shards, DeepSpeed ZeRO partitions), consolidated in this process.
    model.load_state_dict(consolidated_weights(ckpt_dir, cfg.model, weights), strict=True)
    return model.eval(), cfg


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    schedule: Schedule,
    cond: torch.Tensor,
    *,
    null: torch.Tensor | None = None,
    sampler: str = "ddpm",
    steps: int = 250,
    cfg_scale: float = 4.0,
    guidance: str = "dit",
    eta: float = 0.0,
    clip_denoised: bool = False,
    seed: int = 0,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """Samples (N, C, H, W) in model space for ``cond``, in batches, reproducible under ``seed``.

    ``cond`` is class labels (N,), guided against the model's null label, or, for a text-to-image model,
    CLIP token embeddings (N, T, D) guided against ``null``, the empty-prompt embedding (T, D).

    ``clip_denoised`` clamps each predicted x0 to [-1, 1] (what ADM does in pixel space; latents are
    left unclipped). Each batch uses its own generator seeded by ``(seed, batch index)`` so a sample
    does not change when other batches are added.
    """
    from bigdit.batching import stream_seed

    model = model.to(device).eval()
    shape = (model.in_channels, model.input_size, model.input_size)
    outs = []
    if getattr(model, "context_dim", None) is not None and null is None:
        raise ValueError("a text-to-image model samples with null= the empty-prompt embedding (T, D)")
    null = model.num_classes if null is None else null.to(device)
    for i, y in enumerate(cond.split(batch_size)):
        y = y.to(device)
        fn = guided_model_fn(model, y, cfg_scale, null, guidance, in_channels=model.in_channels)
        g = torch.Generator().manual_seed(stream_seed(seed, i))
        outs.append(sample(fn, sampler=sampler, steps=steps, train_schedule=schedule, shape=(len(y), *shape),
                           learn_sigma=model.learn_sigma, generator=g, eta=eta, clip_denoised=clip_denoised,
                           device=device, progress=progress).cpu())
    return torch.cat(outs)


def to_uint8_images(x: torch.Tensor) -> np.ndarray:
    """Model-space images in [-1, 1] (N, C, H, W) -> uint8 NHWC, as ADM's evaluation ``.npz`` stores them."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_grid(images: np.ndarray, rows: int, path: str | Path, min_side: int = 32) -> Path:
    """Tile uint8 NHWC ``images`` into a PNG with ``rows`` rows, upscaling small images (nearest)."""
    from PIL import Image

    n, h, w, c = images.shape
    cols = int(np.ceil(n / rows))
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for k, img in enumerate(images):
        r, col = divmod(k, cols)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = img
    scale = max(1, int(np.ceil(min_side / h)))
    pil = Image.fromarray(grid[..., 0] if c == 1 else grid)
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pil.save(path)
    return path


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)

