"""Loading trained models back and drawing guided samples (used by tools/sample.py and the demo)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from bigdit.checkpoint import latest_checkpoint, step_tag
from bigdit.codec import LatentCodec
from bigdit.diffusion import (FLOW_SAMPLERS, SAMPLERS, Schedule, Transport, classifier_cond_fn, flow_sample,
                              guidance_time, guided_model_fn, sample)
from bigdit.export import consolidated_weights
from bigdit.models import build_model

PRECISIONS = ("fp32", "bf16")
#: sampler settings when neither the command nor the run's preset gives them (DiT's evaluation setup); read by
#: tools/sample.py and by the model card of tools/export.py
DEFAULT_SETTINGS = {"sampler": "ddpm", "steps": 250, "cfg_scale": 4.0, "cfg_convention": "dit", "guidance": "dit",
                    "guidance_interval": None}
#: the same for flow runs (diffusion=flow): SiT's SDE sampler (its FID-50K setting; SiT's sample.py guides with 4.0)
FLOW_DEFAULT_SETTINGS = {**DEFAULT_SETTINGS, "sampler": "sde", "atol": 1e-6, "rtol": 1e-3, "diffusion_form": "sigma",
                         "diffusion_norm": 1.0, "last_step": "mean", "last_step_size": 0.04}
#: the keys of FLOW_DEFAULT_SETTINGS only flow samplers read
FLOW_SAMPLER_KEYS = ("atol", "rtol", "diffusion_form", "diffusion_norm", "last_step", "last_step_size")


def default_settings(diffusion: Schedule | Transport) -> dict:
    """The sampler defaults of a run's diffusion kind: DEFAULT_SETTINGS (Gaussian) or FLOW_DEFAULT_SETTINGS."""
    return dict(FLOW_DEFAULT_SETTINGS if isinstance(diffusion, Transport) else DEFAULT_SETTINGS)


def check_sampler_kind(diffusion: Schedule | Transport, sampler: str) -> None:
    """A flow model samples with a flow sampler, a Gaussian diffusion with a DDPM-family one: ValueError otherwise."""
    flow = isinstance(diffusion, Transport)
    valid = FLOW_SAMPLERS if flow else SAMPLERS
    if sampler not in valid:
        other = "a Gaussian diffusion (DDPM) sampler" if sampler in SAMPLERS else (
            "a flow sampler" if sampler in FLOW_SAMPLERS else "no sampler")
        what = "a flow-matching model (diffusion=flow)" if flow else "a Gaussian diffusion model (diffusion=gaussian)"
        raise ValueError(f"sampler={sampler!r} is {other}, but this is {what}: use sampler={'|'.join(valid)}")


def checkpoint_dir(run_dir: str | Path, step: int | None = None) -> Path:
    """The checkpoint directory of a run: ``step``'s, or the latest one; FileNotFoundError naming those there."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir / 'config.yaml'} not found: is {run_dir} a bigdit run directory (run.dir of "
                                f"bigdit-train)?")
    root = run_dir / "checkpoints"
    ckpt_dir = latest_checkpoint(root) if step is None else root / step_tag(step)
    if ckpt_dir is None or not ckpt_dir.is_dir():
        have = sorted(p.name for p in root.glob("step-*")) if root.is_dir() else []
        which = "latest" if step is None else step_tag(step)
        raise FileNotFoundError(f"no checkpoint {which} in {root}; available: {have}")
    return ckpt_dir


def load_run(run_dir: str | Path, step: int | None = None, weights: str = "ema") -> tuple[torch.nn.Module, DictConfig]:
    """The model of a training run (EMA weights by default) and the run's resolved config."""
    ckpt_dir = checkpoint_dir(run_dir, step)
    cfg = OmegaConf.load(Path(run_dir) / "config.yaml")
    model = build_model(**cfg.model)
    # Any strategy's checkpoint (DDP, FSDP2 shards, DeepSpeed ZeRO partitions), consolidated in this process
    # by the strategy that wrote it.
    model.load_state_dict(consolidated_weights(ckpt_dir, cfg.model, weights), strict=True)
    return model.eval(), cfg


def sample_generators(seed: int, indices) -> list[torch.Generator]:
    """One CPU generator per sample, seeded by ``(seed, sample index)``: sample ``i``'s initial and per-step noise
    are the same whichever batch, rank or process draws it."""
    from bigdit.batching import stream_seed

    return [torch.Generator().manual_seed(stream_seed(seed, int(i))) for i in indices]


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    diffusion: Schedule | Transport,
    cond: torch.Tensor,
    *,
    null: torch.Tensor | None = None,
    sampler: str = "ddpm",
    steps: int = 250,
    cfg_scale: float = 4.0,
    guidance: str = "dit",
    guidance_interval: tuple[float, float] | None = None,
    eta: float = 0.0,
    clip_denoised: bool = False,
    seed: int = 0,
    indices: torch.Tensor | None = None,
    batch_size: int = 256,
    precision: str = "fp32",
    device: torch.device | str = "cpu",
    progress: bool = False,
    classifier: torch.nn.Module | None = None,
    classifier_scale: float = 1.0,
    **flow_settings,
) -> torch.Tensor:
    """Samples (N, C, H, W) in model space for ``cond``, in batches, reproducible under ``seed``.

    ``diffusion`` is the run's: a Gaussian :class:`Schedule` (samplers ddpm, ddim, dpm++) or a flow
    :class:`Transport` (euler, heun, dopri5, sde; ``flow_settings`` are their FLOW_SAMPLER_KEYS); the other kind's
    sampler is refused. ``guidance_interval=(lo, hi)`` guides only at times in [lo, hi] of the flow convention
    (0 = noise, 1 = data; a DDPM step k is at 1 - k / T).

    ``cond`` is class labels (N,), guided against the model's null label, or, for a text-to-image model,
    CLIP token embeddings (N, T, D) guided against ``null``, the empty-prompt embedding (T, D). An unconditional
    model (``num_classes`` None or 0) ignores the labels. With a noisy ``classifier`` (ADM-G) every step is also
    guided by ``classifier_scale`` times the gradient of its ``log p(cond | x_t)`` (DDPM and DDIM; combines with
    ``cfg_scale``).

    ``clip_denoised`` clamps each predicted x0 to [-1, 1] (DDPM/DDIM, what ADM does in pixel space; latents are
    left unclipped). Sample ``k`` draws all its noise (``x_T`` and DDPM's or the SDE's per-step noise) from its own
    generator seeded by ``(seed, indices[k])`` (``indices`` default: ``0..N-1``), so it does not change with the batch
    size, the other samples of its batch or the process that draws it (up to the rounding of batched matmuls, which
    differs between batch sizes; at the same batch size it is bit-identical). ``precision="bf16"`` runs the
    network under bf16 autocast; the sampler's arithmetic stays fp32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    check_sampler_kind(diffusion, sampler)
    flow = isinstance(diffusion, Transport)
    unknown = sorted(set(flow_settings) - set(FLOW_SAMPLER_KEYS))
    if unknown or (flow_settings and not flow):
        raise ValueError(f"{unknown or sorted(flow_settings)} are flow sampler settings ({', '.join(FLOW_SAMPLER_KEYS)}),"
                         f" for a diffusion=flow model")
    if flow and model.learn_sigma:
        raise ValueError("a flow model predicts one value per channel: it must be built with learn_sigma=false")
    device = torch.device(device)
    model = model.to(device).eval()
    shape = (model.in_channels, model.input_size, model.input_size)
    if getattr(model, "context_dim", None) is not None and null is None:
        raise ValueError("a text-to-image model samples with null= the empty-prompt embedding (T, D)")
    if cfg_scale != 1.0 and null is None and (not model.num_classes or getattr(model, "class_dropout_prob", 1) == 0):
        raise ValueError(f"cfg_scale={cfg_scale}: classifier-free guidance needs a null label, which "
                         f"{type(model).__name__} only has when trained with label dropout (model.class_dropout_prob "
                         f"> 0); use cfg_scale=1, or classifier guidance (classifier=<noisy classifier run>)")
    if classifier is not None:
        if cond.ndim != 1 or flow:
            raise ValueError("classifier guidance (ADM-G) needs class labels and a Gaussian diffusion (DDPM/DDIM); "
                             "this model is text-to-image or a flow model")
        classifier = classifier.to(device).eval()
    null = model.num_classes if null is None else null.to(device)
    indices = torch.arange(len(cond)) if indices is None else torch.as_tensor(indices)
    if len(indices) != len(cond):
        raise ValueError(f"{len(indices)} sample indices for {len(cond)} conditions")
    def bf16_net(*args, **kwargs):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return model(*args, **kwargs).float()

    net = bf16_net if precision == "bf16" else model

    def bf16_classifier(*args):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return classifier(*args).float()

    judge = bf16_classifier if precision == "bf16" else classifier

    outs = []
    for y, idx in zip(cond.split(batch_size), indices.split(batch_size)):
        y = y.to(device)
        time_of = (lambda t: t) if flow else guidance_time(diffusion.num_timesteps)
        fn = guided_model_fn(net, y, cfg_scale, null, guidance, in_channels=model.in_channels,
                             interval=guidance_interval, time_of=time_of)
        generators = sample_generators(seed, idx.tolist())
        if flow:
            x = flow_sample(fn, diffusion, sampler=sampler, steps=steps, shape=(len(y), *shape), generator=generators,
                            device=device, progress=progress, **flow_settings)
        else:
            cond_fn = None if classifier is None else classifier_cond_fn(judge, y, classifier_scale)
            x = sample(fn, sampler=sampler, steps=steps, train_schedule=diffusion, shape=(len(y), *shape),
                       learn_sigma=model.learn_sigma, generator=generators, eta=eta, clip_denoised=clip_denoised,
                       device=device, progress=progress, cond_fn=cond_fn)
        outs.append(x.cpu())
    return torch.cat(outs)


def image_decoder(vae_id: str | None, codec: LatentCodec, device: torch.device, channels: int):
    """Model outputs -> images in [-1, 1]: pixels (``vae_id`` None) as they are, latents through the diffusers
    ``AutoencoderKL`` ``vae_id`` (hub id or local dir, loaded once) after ``codec``'s inverse scaling."""
    if vae_id is None:
        if channels not in (1, 3):
            raise ValueError(f"the model makes {channels}-channel latents: pass vae=<AutoencoderKL hub id or dir>")
        return lambda x: x
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_id).to(device).eval()

    @torch.no_grad()
    def decode(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([vae.decode(codec.to_vae(z.to(device))).sample.float().cpu() for z in x.split(32)])

    return decode


def to_uint8_images(x: torch.Tensor) -> np.ndarray:
    """Model-space images in [-1, 1] (N, C, H, W) -> uint8 NHWC, as ADM's evaluation ``.npz`` stores them.

    The quantisation of DiT's ``sample_ddp.py``: ``clamp(127.5 * x + 128, 0, 255)`` truncated to uint8, i.e.
    ``(x + 1) * 127.5`` rounded half up (ADM's ``sample.py`` truncates ``(x + 1) * 127.5``, half a level lower).
    """
    return (127.5 * x.float() + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


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
    """``auto`` -> this process's CUDA device (``cuda:$LOCAL_RANK``, one GPU per torchrun/SLURM task) when CUDA is
    available, else CPU."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device(name)
