#!/usr/bin/env python
"""Sample a trained model, as a grid or as an FID-50K sample set on any number of ranks.

Grid (one process): ``python tools/sample.py run=runs/demo per_class=16 cfg_scale=4`` -- one row per class
(``classes=[...]``, default all) or, for a text-to-image model, per prompt: ``prompts='[a red bus, two cats]'``
(embedded with the CLIP tower the training captions were cached with, read from the run's data manifest) or
``embeddings=<npz with tokens (N, T, D)>``, guided against the empty prompt. Writes ``grid.png``, ``samples.npz``
and ``samples.json`` to ``out`` (default ``<run>/samples``).

Evaluation set: ``python tools/sample.py run=<run> num_samples=50000 labels=balanced batch_size=125`` -- as one
process, under torchrun (``torchrun --nproc_per_node=8 tools/sample.py ...``) or as a SLURM job (``launcher=slurm
launcher.gpus_per_node=8 [launcher.nodes=N | launcher.array=N] out=<dir>``, one task per GPU), every rank sampling
its share. ``labels=balanced``: sample ``i`` has class ``classes[i % K]``, exactly ``num_samples / K`` per class
(the protocol that reproduces the papers' FIDs); ``labels=uniform``: random labels as DiT's ``sample_ddp.py``.

Reproducibility: sample ``i``'s noise (``x_T`` and every DDPM step's) comes from a CPU generator seeded by
``(seed, i)``, its uniform label from one seeded by ``(seed, i, 1)``; never by rank. The work is cut into chunks of
``batch_size`` consecutive samples (chunk ``c``: samples ``c*B .. c*B+B-1``), dealt round-robin (rank ``r`` of ``W``
takes chunks ``r, r+W, ...``), so ``samples.npz`` is byte-identical for any number of ranks at one ``batch_size``,
and equal up to the rounding of batched matmuls at another.

Resume: each finished chunk is written to ``<out>/parts/chunk-<c>.npz`` (temporary name, then rename); the
settings that decide the samples go to ``<out>/parts/settings.json`` and a rerun with other ones is refused,
naming the keys that differ. Rerunning the same command (any number of ranks) samples only the missing chunks.
The rank that finds every chunk present when it is done (the last to finish; several may, and write the same
bytes) writes ``samples.npz`` in ADM's format (``arr_0`` uint8 NHWC, ``arr_1`` int64 labels or prompt indices)
and ``samples.json`` (settings, checkpoint and step, label counts). ``parts/`` may be deleted afterwards.

Images are quantised as DiT's ``sample_ddp.py`` does, ``uint8(clamp(127.5 * x + 128, 0, 255))``. EMA weights by
default. Sampler settings left null come from the run's preset (``sample:`` in its config.yaml), then DiT's
defaults. ``precision=bf16`` runs the network under bf16 autocast. Keys: configs/sample.yaml.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

import bigdit  # noqa: F401
from bigdit.batching import stream_seed
from bigdit.codec import LatentCodec
from bigdit.data.schema import Manifest
from bigdit.data.shard_dataset import empty_prompt_context
from bigdit.diffusion import (CFG_CONVENTIONS, DIFFUSION_FORMS, FLOW_SAMPLERS, GUIDANCE_MODES, LAST_STEPS, SAMPLERS,
                              Schedule, build_diffusion, check_guidance_interval, dit_cfg_scale, space_timesteps)
from bigdit.fsio import atomic_path, write_json_atomic
from bigdit.inference import (FLOW_SAMPLER_KEYS, PRECISIONS, check_sampler_kind, checkpoint_dir, default_settings,
                              generate, image_decoder, load_run, resolve_device, save_grid, to_uint8_images)
from bigdit.launch import run_or_submit, work_slice
from bigdit.models import build_model, load_weights

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
LABELS = ("balanced", "uniform")
DEFAULT_PER_CLASS = 8
#: the stream of sample i's uniform label: seed (seed, i, LABEL_STREAM); its noise is seeded by (seed, i)
LABEL_STREAM = 1
DECODE = "uint8(clamp(127.5 * x + 128, 0, 255)), as DiT's sample_ddp.py"


# ---------------------------------------------------------------------------------------------- checks, model


def check_keys(cfg: DictConfig) -> None:
    """The checks that need nothing loaded: run before any model, job or compute."""
    if (cfg.run is None) == (cfg.ckpt is None):
        raise ValueError("give exactly one of run=<run dir> or ckpt=<checkpoint file> (with model={name: ...})")
    if cfg.ckpt is not None:
        if not Path(cfg.ckpt).is_file():
            raise FileNotFoundError(f"ckpt={cfg.ckpt}: no such checkpoint file")
        if cfg.model is None:
            raise ValueError("ckpt= needs the model config, e.g. 'model={name: DiT-XL/2, input_size: 32}'")
    elif cfg.diffusion is not None:
        raise ValueError("diffusion= is for ckpt=; run= samples with the diffusion the run was trained with")
    for key, valid in (("sampler", SAMPLERS + FLOW_SAMPLERS), ("guidance", GUIDANCE_MODES),
                       ("cfg_convention", CFG_CONVENTIONS), ("labels", LABELS), ("precision", PRECISIONS),
                       ("diffusion_form", DIFFUSION_FORMS), ("last_step", LAST_STEPS)):
        if cfg[key] is not None and cfg[key] not in valid:
            raise ValueError(f"unknown {key}={cfg[key]!r}; valid: {', '.join(valid)}")
    if cfg.guidance_interval is not None:
        check_guidance_interval(cfg.guidance_interval)
    for key in ("batch_size", "num_samples", "per_class", "steps"):
        if cfg[key] is not None and int(cfg[key]) <= 0:
            raise ValueError(f"{key}={cfg[key]} must be positive")
    if cfg.classifier is not None and not Path(cfg.classifier).exists():
        raise FileNotFoundError(f"classifier={cfg.classifier}: no such run directory or checkpoint file")
    if cfg.classifier is not None and Path(cfg.classifier).is_file() and cfg.classifier_model is None:
        raise ValueError("classifier=<checkpoint file> needs its model config, e.g. "
                         "'classifier_model={name: ADM-classifier-64}'")
    if cfg.num_samples is not None and cfg.per_class is not None:
        raise ValueError("per_class is the grid's (one row per class); num_samples= samples an evaluation set "
                         "(labels=balanced|uniform): give one of them")


def check_settings(s: dict, diffusion) -> None:
    """The resolved sampler settings (command, else the run's preset, else the defaults) are valid, and the
    sampler is of the run's diffusion kind (a flow run refuses DDPM samplers and a Gaussian one flow samplers)."""
    for key, valid in (("sampler", SAMPLERS + FLOW_SAMPLERS), ("guidance", GUIDANCE_MODES),
                       ("cfg_convention", CFG_CONVENTIONS)):
        if s[key] not in valid:
            raise ValueError(f"unknown {key}={s[key]!r} (from the run's preset); valid: {', '.join(valid)}")
    check_sampler_kind(diffusion, s["sampler"])
    if int(s["steps"]) <= 0:
        raise ValueError(f"steps={s['steps']} must be positive")
    if s["guidance_interval"] is not None:
        check_guidance_interval(s["guidance_interval"])


def resolve_checkpoint(cfg: DictConfig) -> tuple[Path, int | None]:
    """The checkpoint (a run's step directory, or the ``ckpt=`` file) and its step; FileNotFoundError when absent."""
    if cfg.run is not None:
        path = checkpoint_dir(cfg.run, cfg.step)
        return path.resolve(), int(path.name.split("-")[-1])
    return Path(cfg.ckpt).resolve(), None


def load_model(cfg: DictConfig, step: int | None):
    """(model, run config or None) from ``run=`` (at ``step``) or ``ckpt=`` + ``model=``."""
    if cfg.run is not None:
        return load_run(cfg.run, step, cfg.weights)
    return load_weights(build_model(**cfg.model), cfg.ckpt, cfg.weights).eval(), None


def load_classifier(cfg: DictConfig, model) -> torch.nn.Module | None:
    """The noisy classifier of ``classifier=`` (a ``task=classifier`` run directory, or a checkpoint file with
    ``classifier_model=``), checked to read the model's images; None without one."""
    if cfg.classifier is None:
        return None
    if Path(cfg.classifier).is_dir():
        classifier, run_cfg = load_run(cfg.classifier, None, cfg.classifier_weights)
        if OmegaConf.select(run_cfg, "task.name") != "classifier":
            raise ValueError(f"classifier={cfg.classifier} is a {OmegaConf.select(run_cfg, 'task.name') or 'diffusion'} "
                             f"run; give a noisy classifier's (bigdit-train task=classifier)")
    else:
        classifier = load_weights(build_model(**cfg.classifier_model), cfg.classifier, cfg.classifier_weights).eval()
    want = (model.in_channels, model.input_size)
    if (classifier.in_channels, classifier.input_size) != want:
        raise ValueError(f"classifier={cfg.classifier} reads {classifier.in_channels}x{classifier.input_size}px images "
                         f"but the model makes {want[0]}x{want[1]}px ones")
    if model.num_classes and classifier.num_classes != model.num_classes:
        raise ValueError(f"classifier={cfg.classifier} has {classifier.num_classes} classes, the model "
                         f"{model.num_classes}")
    return classifier


def default_out(cfg: DictConfig, ckpt: Path) -> Path:
    """``<run>/samples`` (grid) or ``<run>/samples/<step tag>-n<N>`` (evaluation set); ``./samples[...]`` with ckpt=."""
    base = Path(cfg.run) / "samples" if cfg.run is not None else Path("samples")
    if cfg.num_samples is None:
        return base
    return base / f"{ckpt.name if cfg.run is not None else ckpt.stem}-n{cfg.num_samples}"


def settings(cfg: DictConfig, run_cfg: DictConfig | None, diffusion) -> dict:
    """Sampler settings: the command's, else the run preset's ``sample:`` section, else the defaults of the run's
    diffusion kind (DiT's for Gaussian runs, SiT's SDE for flow runs)."""
    given = [k for k in FLOW_SAMPLER_KEYS if cfg[k] is not None]
    if given and isinstance(diffusion, Schedule):
        raise ValueError(f"{', '.join(given)} are flow sampler settings, but this run is a Gaussian diffusion: drop them")
    preset = run_cfg.get("sample") if run_cfg is not None else None
    preset = OmegaConf.to_container(preset, resolve=True) if preset is not None else {}
    chosen = {k: cfg[k] if cfg[k] is not None else preset.get(k, default)
              for k, default in default_settings(diffusion).items()}
    chosen["classifier_scale"] = (cfg.classifier_scale if cfg.classifier_scale is not None
                                  else preset.get("classifier_scale", 1.0))
    return OmegaConf.to_container(OmegaConf.create(chosen), resolve=True)  # plain lists, not ListConfig


def data_manifest(run_cfg: DictConfig | None) -> tuple[str | None, Manifest | None]:
    """The training shards' root and manifest (latent codec, CLIP tower), when the run trained from shards."""
    root = run_cfg.data.get("root") if run_cfg is not None else None
    if root is None or not (Path(root) / "manifest.json").is_file():
        return None, None
    return root, Manifest.load(root)


def text_conditioning(cfg: DictConfig, model, root: str | None, manifest: Manifest | None):
    """(CLIP tokens (N, T, D), empty-prompt tokens (T, D), captions) for a text-to-image model."""
    if (cfg.prompts is None) == (cfg.embeddings is None):
        raise ValueError(f"{type(model).__name__} is text-to-image: give prompts='[a photo of a cat, ...]' or "
                         f"embeddings=<npz with tokens (N, {model.context_tokens}, {model.context_dim})>")
    if cfg.embeddings is not None:
        cached = np.load(cfg.embeddings)
        if root is None:
            raise ValueError("embeddings= takes the empty prompt from the run's shards (empty_prompt.npz); this run "
                             "did not train from shards: use prompts= instead")
        tokens = torch.from_numpy(cached["tokens"]).float()
        return tokens, empty_prompt_context(root, manifest), [f"embedding {i}" for i in range(len(tokens))]
    from bigdit.text import TextEncoder

    text = dict(manifest.text) if manifest is not None and manifest.text else {}
    overrides = {"model": cfg.clip_model, "pretrained": cfg.clip_pretrained, "model_config": cfg.clip_model_config}
    text.update({k: v for k, v in overrides.items() if v is not None})
    if "model" not in text:
        raise ValueError("no CLIP model recorded for this run (it did not train from cached shards): pass "
                         "clip_model=<open_clip name> clip_pretrained=<tag or weights file>")
    enc = TextEncoder(text["model"], text.get("pretrained"), text.get("layer", "last"), "cpu", text.get("model_config"))
    prompts = list(cfg.prompts)
    tokens, _ = enc(prompts)
    empty, _ = enc([""])
    return torch.from_numpy(tokens).float(), torch.from_numpy(empty[0]).float(), prompts


def make_decoder(cfg: DictConfig, manifest: Manifest | None, device: torch.device, channels: int):
    """Model outputs -> images in [-1, 1]: pixels as they are, latents through the VAE decoder (by default the VAE
    and latent scaling the training shards were encoded with), loaded once."""
    vae_id = cfg.vae or (manifest.vae if manifest is not None and manifest.vae != "none" else None)
    from_shards = cfg.vae_scale is None and manifest is not None and manifest.vae != "none"
    codec = manifest.codec() if from_shards else LatentCodec(cfg.vae_scale or 0.18215)
    return image_decoder(vae_id, codec, device, channels)


# ---------------------------------------------------------------------------------------------- the sample plan


class Plan:
    """What sample ``i`` is: its condition (an index into the K conditions: classes or prompts) and its chunk."""

    def __init__(self, mode: str, num_samples: int, num_conds: int, batch_size: int, seed: int, per_class: int = 0):
        self.mode, self.n, self.k, self.batch = mode, num_samples, num_conds, batch_size
        self.seed, self.per_class = seed, per_class
        self.num_chunks = (num_samples + batch_size - 1) // batch_size

    def chunk(self, c: int) -> range:
        return range(c * self.batch, min(self.n, (c + 1) * self.batch))

    def cond_index(self, indices: range) -> torch.Tensor:
        """Which of the K conditions samples ``indices`` have: grid rows (``i // per_class``), balanced
        (``i % K``) or uniform (a draw from the generator of ``(seed, i, LABEL_STREAM)``)."""
        if self.mode == "grid":
            return torch.tensor([i // self.per_class for i in indices], dtype=torch.long)
        if self.mode == "balanced":
            return torch.tensor([i % self.k for i in indices], dtype=torch.long)
        return torch.tensor([int(torch.randint(self.k, (), generator=torch.Generator().manual_seed(
            stream_seed(self.seed, i, LABEL_STREAM)))) for i in indices], dtype=torch.long)


def chunk_path(out: Path, c: int) -> Path:
    return out / "parts" / f"chunk-{c:06d}.npz"


def save_npz(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """An ADM ``.npz`` (``arr_0``, ``arr_1``), atomically, byte-stable: what ``np.savez`` writes, but with a fixed
    zip member date (numpy stamps the current time), so equal arrays make equal files."""
    with atomic_path(path, exclusive=path.parent.name == "parts") as tmp, open(tmp, "wb") as f:
        with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, arr in (("arr_0", images), ("arr_1", labels)):
                with zf.open(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w",
                             force_zip64=True) as member:
                    np.lib.format.write_array(member, np.ascontiguousarray(arr), allow_pickle=False)


def sample_settings(cfg: DictConfig, s: dict, ckpt: Path, step: int | None, clip_denoised: bool, mode: str,
                    names: list) -> dict:
    """The keys that decide the samples: a resume must match them all (parts/settings.json)."""
    text = cfg.prompts is not None or cfg.embeddings is not None
    return json.loads(json.dumps({
        "checkpoint": str(ckpt), "step": step, "weights": cfg.weights,
        "model": OmegaConf.to_container(cfg.model, resolve=True) if cfg.ckpt is not None else None,
        **({"diffusion": OmegaConf.to_container(cfg.diffusion, resolve=True)} if cfg.diffusion is not None else {}),
        "num_samples": int(cfg.num_samples) if cfg.num_samples is not None else None, "labels": mode,
        "per_class": int(cfg.per_class or DEFAULT_PER_CLASS) if mode == "grid" else None,
        "classes": None if text else names,
        "prompts": {"count": len(names), "sha256": hashlib.sha256("\n".join(map(str, names)).encode()).hexdigest()}
        if cfg.prompts is not None else None,
        "embeddings": str(Path(cfg.embeddings).resolve()) if cfg.embeddings is not None else None,
        "sampler": s["sampler"], "steps": int(s["steps"]),
        "cfg_scale": dit_cfg_scale(s["cfg_scale"], s["cfg_convention"]), "cfg_convention": "dit",
        "guidance": s["guidance"],
        **({"guidance_interval": s["guidance_interval"]} if s["guidance_interval"] is not None else {}),
        **{k: s[k] for k in FLOW_SAMPLER_KEYS if k in s},
        "eta": float(cfg.eta) if s["sampler"] == "ddim" else None,
        "clip_denoised": bool(clip_denoised), "seed": int(cfg.seed), "batch_size": int(cfg.batch_size),
        "precision": cfg.precision, "vae": cfg.vae, "vae_scale": cfg.vae_scale,
        "classifier": str(Path(cfg.classifier).resolve()) if cfg.classifier is not None else None,
        "classifier_weights": cfg.classifier_weights if cfg.classifier is not None else None,
        "classifier_scale": float(s["classifier_scale"]) if cfg.classifier is not None else None,
    }))


def check_resume(out: Path, now: dict) -> None:
    """Record the settings in ``<out>/parts``; refuse to add chunks to parts sampled with other ones."""
    path = out / "parts" / "settings.json"
    if path.is_file():
        before = json.loads(path.read_text())
        diff = {k: (before.get(k), now.get(k)) for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)}
        if diff:
            detail = "; ".join(f"{k} {a!r} before, {b!r} now" for k, (a, b) in diff.items())
            raise ValueError(f"{out} holds chunks sampled with other settings ({', '.join(diff)} differ: {detail}): "
                             f"use a new out=, or the original settings to resume")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, now, indent=1)


def summary(settings_: dict, labels: np.ndarray, images: np.ndarray, chunks: int, cond_names: list | None) -> dict:
    """samples.json: the settings, checkpoint, counts and format of samples.npz."""
    values, counts = np.unique(labels, return_counts=True)
    return {
        "format": "ADM .npz: arr_0 uint8 (N, H, W, C) images, arr_1 int64 labels (text: prompt indices)",
        "decode": DECODE, "count": int(len(images)), "image_shape": list(images.shape[1:]), "chunks": chunks,
        "label_counts": {str(int(v)): int(c) for v, c in zip(values, counts)},
        **({"prompts": cond_names} if cond_names is not None else {}),
        "settings": settings_,
    }


def complete(out: Path, settings_: dict, plan: Plan) -> bool:
    """``samples.npz`` is there, made with these settings, and no chunk of ``parts/`` is missing (a deleted one is
    sampled again; a deleted ``parts/`` is fine)."""
    meta = out / "samples.json"
    if not (meta.is_file() and (out / "samples.npz").is_file()):
        return False
    if json.loads(meta.read_text()).get("settings") != settings_:
        return False
    return not (out / "parts").is_dir() or all(chunk_path(out, c).is_file() for c in range(plan.num_chunks))


def finalize(out: Path, plan: Plan, settings_: dict, cond_names: list | None) -> dict | None:
    """``samples.npz`` + ``samples.json`` from the chunks once every chunk is there, else None."""
    paths = [chunk_path(out, c) for c in range(plan.num_chunks)]
    if not all(p.is_file() for p in paths):
        return None
    images = labels = None
    for c, p in enumerate(paths):
        with np.load(p) as part:
            a, b = part["arr_0"], part["arr_1"]
        if images is None:
            images = np.empty((plan.n, *a.shape[1:]), dtype=np.uint8)
            labels = np.empty(plan.n, dtype=np.int64)
        span = plan.chunk(c)
        images[span.start : span.stop], labels[span.start : span.stop] = a, b
    save_npz(out / "samples.npz", images, labels)
    meta = summary(settings_, labels, images, plan.num_chunks, cond_names)
    write_json_atomic(out / "samples.json", meta, indent=1)
    return meta


# ---------------------------------------------------------------------------------------------- the tool


def run(cfg: DictConfig) -> dict | None:
    """Sample this rank's share of the chunks into ``out``; returns samples.json's content once the set is whole."""
    check_keys(cfg)
    rank, world = work_slice(cfg)
    grid = cfg.num_samples is None
    if grid and world > 1:
        raise ValueError(f"the grid (per_class/classes/prompts without num_samples) is one process, not {world}: "
                         f"give num_samples= (labels=balanced|uniform) to share the work between ranks")
    ckpt, step = resolve_checkpoint(cfg)
    out = Path(cfg.out) if cfg.out else default_out(cfg, ckpt)
    device = resolve_device(cfg.device)
    model, run_cfg = load_model(cfg, step)
    diffusion = build_diffusion(run_cfg.diffusion if run_cfg is not None else cfg.diffusion)
    s = settings(cfg, run_cfg, diffusion)
    check_settings(s, diffusion)
    if cfg.classifier is not None and s["sampler"] not in ("ddpm", "ddim"):
        raise ValueError(f"classifier guidance works with sampler=ddpm or ddim (ADM's samplers), not {s['sampler']}")
    classifier = load_classifier(cfg, model)
    root, manifest = data_manifest(run_cfg)

    null, prompts = None, None
    if getattr(model, "context_dim", None) is not None:
        conds, null, names = text_conditioning(cfg, model, root, manifest)
        prompts = names
        values = torch.arange(len(names))  # arr_1: the prompt index
    else:
        # an unconditional model draws its classes from the classifier that guides it (one row without either)
        num_classes = model.num_classes or (classifier.num_classes if classifier is not None else 0)
        names = list(range(max(num_classes, 1))) if cfg.classes is None else [int(c) for c in cfg.classes]
        bad = [c for c in names if not 0 <= c < max(num_classes, 1)]
        if bad:
            raise ValueError(f"classes {bad} are outside 0..{max(num_classes, 1) - 1}")
        conds = values = torch.tensor(names, dtype=torch.long)
    k = len(names)
    if grid:
        per_class = int(cfg.per_class or DEFAULT_PER_CLASS)
        plan = Plan("grid", k * per_class, k, int(cfg.batch_size), int(cfg.seed), per_class)
    else:
        mode, n = cfg.labels, int(cfg.num_samples)
        if mode == "balanced" and n % k:
            what = "prompts" if prompts is not None else "classes"
            raise ValueError(f"labels=balanced needs num_samples divisible by the {k} {what}: {n} is not "
                             f"(e.g. num_samples={(n // k) * k} or {(n // k + 1) * k}, {n // k} or {n // k + 1} each), "
                             f"or use labels=uniform")
        plan = Plan(mode, n, k, int(cfg.batch_size), int(cfg.seed))

    pixels = manifest is None or manifest.vae == "none"
    clip_denoised = (pixels and cfg.vae is None) if cfg.clip_denoised is None else bool(cfg.clip_denoised)
    cfg_scale = dit_cfg_scale(s["cfg_scale"], s["cfg_convention"])
    if s["sampler"] == "ddim":  # DDIM's fixed stride must exist: fail now, not after the model is on the device
        space_timesteps(diffusion.num_timesteps, f"ddim{s['steps']}")
    decode = make_decoder(cfg, manifest, device, model.in_channels)
    settings_ = sample_settings(cfg, s, ckpt, step, clip_denoised, plan.mode, names)
    flow_settings = {} if isinstance(diffusion, Schedule) else {k: s[k] for k in FLOW_SAMPLER_KEYS}

    def sample_chunk(c: int) -> tuple[np.ndarray, np.ndarray]:
        span = plan.chunk(c)
        which = plan.cond_index(span)
        x = generate(model, diffusion, conds[which], null=null, sampler=s["sampler"], steps=int(s["steps"]),
                     cfg_scale=cfg_scale, guidance=s["guidance"], guidance_interval=s["guidance_interval"],
                     eta=cfg.eta, clip_denoised=clip_denoised, **flow_settings,
                     seed=int(cfg.seed), indices=torch.tensor(list(span)), batch_size=len(span),
                     precision=cfg.precision, device=device, classifier=classifier,
                     classifier_scale=float(s["classifier_scale"]))
        return to_uint8_images(decode(x)), values[which].numpy().astype(np.int64)

    solve = (f"atol {s['atol']}, rtol {s['rtol']}" if s["sampler"] == "dopri5" else f"{s['steps']} steps")
    interval = f" on [{s['guidance_interval'][0]}, {s['guidance_interval'][1]}]" if s["guidance_interval"] else ""
    judge = f", classifier scale {s['classifier_scale']}" if classifier is not None else ""
    what = (f"{s['sampler']}, {solve}, cfg {cfg_scale} in DiT's convention{interval}{judge}, {cfg.precision}, batch "
            f"{cfg.batch_size}")
    t0 = time.perf_counter()
    if grid:
        parts = [sample_chunk(c) for c in range(plan.num_chunks)]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        out.mkdir(parents=True, exist_ok=True)
        save_npz(out / "samples.npz", images, labels)
        if prompts is not None:
            (out / "prompts.txt").write_text("".join(f"{p}\n" for p in prompts))
        meta = summary(settings_, labels, images, plan.num_chunks, prompts)
        write_json_atomic(out / "samples.json", meta, indent=1)
        path = save_grid(images, rows=k, path=out / "grid.png")
        print(f"{len(images)} samples of {k} {'prompts' if prompts is not None else 'classes'} in "
              f"{time.perf_counter() - t0:.1f}s ({what}) -> {path}, {out / 'samples.npz'}", flush=True)
        return meta

    if complete(out, settings_, plan):
        print(f"rank {rank}/{world}: {out}/samples.npz is complete ({plan.n} samples, these settings): nothing to do",
              flush=True)
        return json.loads((out / "samples.json").read_text())
    check_resume(out, settings_)
    if prompts is not None and rank == 0:
        write_json_atomic(out / "parts" / "prompts.json", prompts)
    mine = range(rank, plan.num_chunks, world)
    todo = [c for c in mine if not chunk_path(out, c).is_file()]
    n_todo = sum(len(plan.chunk(c)) for c in todo)
    print(f"rank {rank}/{world}: {plan.n} samples ({plan.mode} labels over {k} {'prompts' if prompts else 'classes'}) "
          f"in {plan.num_chunks} chunks of {plan.batch}; {len(todo)} of this rank's {len(mine)} chunks "
          f"({n_todo} samples) to sample on {device} ({what}) -> {out}", flush=True)
    done, last_print = 0, time.perf_counter()
    for j, c in enumerate(todo):
        images, labels = sample_chunk(c)
        save_npz(chunk_path(out, c), images, labels)
        done += len(images)
        now = time.perf_counter()
        if rank == 0 and (j == 0 or j == len(todo) - 1 or now - last_print >= cfg.log_every_s):
            last_print = now
            rate = done / (now - t0)
            finished = sum(chunk_path(out, i).is_file() for i in range(plan.num_chunks))
            eta = (n_todo - done) / rate
            print(f"rank 0/{world}: chunk {j + 1}/{len(todo)} here, {finished}/{plan.num_chunks} chunks done in all; "
                  f"{rate:.2f} samples/s on this rank (~{rate * world:.1f}/s on {world}), "
                  f"ETA {hms(eta)}", flush=True)
    elapsed = time.perf_counter() - t0
    meta = finalize(out, plan, settings_, prompts)
    rate = f"{n_todo / elapsed:.2f} samples/s" if n_todo else "nothing sampled"
    if meta is None:
        print(f"rank {rank}/{world}: done in {elapsed:.1f}s ({rate}); chunks of other ranks are still missing, the "
              f"last rank to finish writes {out}/samples.npz", flush=True)
        return None
    print(f"rank {rank}/{world}: {plan.n} samples, {len(meta['label_counts'])} labels, images "
          f"{meta['image_shape']} -> {out}/samples.npz, samples.json ({elapsed:.1f}s here, {rate})", flush=True)
    return meta


def hms(seconds: float) -> str:
    m, sec = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{sec:02d}"


def prepare_submission(cfg: DictConfig) -> None:
    """Before submitting a job: check the keys, pin the checkpoint step and ``out``, make paths absolute, so every
    task samples the same checkpoint into the same folder whatever happens until it starts."""
    check_keys(cfg)
    ckpt, step = resolve_checkpoint(cfg)
    if cfg.out is None:
        cfg.out = str(default_out(cfg, ckpt))
    for key in ("run", "ckpt", "out", "embeddings"):
        if cfg[key] is not None:
            cfg[key] = os.path.abspath(str(cfg[key]))
    if cfg.run is not None:
        cfg.step = step


@hydra.main(config_path=CONFIG_DIR, config_name="sample", version_base=None)
def main(cfg: DictConfig) -> None:
    if cfg.get("launcher") is not None:
        prepare_submission(cfg)
    run_or_submit(cfg, __file__, run)  # launcher=slurm|local: a job whose tasks each sample their chunks


if __name__ == "__main__":
    main()
