#!/usr/bin/env python
"""Post-hoc EMA (EDM2): ``python tools/phema.py run=<dir> sigma_rel=0.08 [step=N]`` or ``sweep=[0.05,0.08,0.12]``.

Reconstructs the EMA of relative width ``sigma_rel`` at snapshot ``step`` (default the last) of a run trained with
``ema=phema``: every power EMA of every snapshot up to that step, each consolidated in this process by the strategy
that wrote it, combined with the least-squares coefficients of ``bigdit.phema.solve_coefficients``
(:func:`bigdit.snapshots.reconstruct`). Writes it as ``tools/export.py format=safetensors`` does (the same code:
``ema.safetensors``, ``model_config.json``, ``ema.pt`` for DiT, a model card) plus ``phema.json`` (the inputs and
coefficients), to ``<run>/export/phema-step-<step>/sigma-<sigma_rel>/``. A finished width is skipped on rerun.

``sweep=[...]`` reconstructs each width; with ``eval.ref=<ADM reference batch>`` each is also sampled with
``tools/sample.py`` (``num_samples`` balanced labels, the run's sampler settings unless ``eval.sampler`` says
otherwise; resumable chunks) and scored by the evaluator of ``tools/evaluate.py``; FID per width is printed and
written to ``sweep.json``. Keys: configs/phema.yaml.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import bigdit  # noqa: F401
from bigdit.checkpoint import step_tag
from bigdit.export import (hydra_dict, param_shapes, safetensors_usage, sample_defaults, write_model_card,
                           write_safetensors)
from bigdit.fsio import write_json_atomic
from bigdit.model_card import run_manifest, sampler_settings
from bigdit.models import build_model
from bigdit.phema import sigma_rel_to_gamma
from bigdit.snapshots import Reconstruction, reconstruct, snapshots_until

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
RESULT_FILE = "phema.json"
TOOLS = Path(__file__).resolve().parent


def widths(cfg: DictConfig) -> list[float]:
    """The widths asked for (``sigma_rel`` or ``sweep``), each checked."""
    if (cfg.sigma_rel is None) == (cfg.sweep is None):
        raise ValueError("give exactly one of sigma_rel=<width, e.g. 0.08> or sweep=[<widths>]")
    out = [float(cfg.sigma_rel)] if cfg.sigma_rel is not None else [float(s) for s in cfg.sweep]
    for s in out:
        sigma_rel_to_gamma(s)  # raises naming the valid range
    return out


def export_width(cfg: DictConfig, run_dir: Path, run_cfg: DictConfig, sigma_rel: float, step: int, out: Path) -> Path:
    """Reconstruct one width and write its export directory (skipped when a finished one is there)."""
    if (out / RESULT_FILE).is_file() and (out / "ema.safetensors").is_file():
        print(f"phema: {out} is complete: skipped", flush=True)
        return out
    rec: Reconstruction = reconstruct(run_dir, param_shapes(run_cfg.model), sigma_rel, step)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(**run_cfg.model)
    write_safetensors(out, run_cfg.model, model, {"ema": rec.weights})
    defaults = sample_defaults(run_cfg)
    settings, _ = sampler_settings(run_cfg, defaults)
    _, manifest = run_manifest(run_cfg)
    usage = safetensors_usage(out, run_cfg, settings, manifest)
    snap_dir = run_dir / "phema" / step_tag(rec.step)
    notes = (f"### Post-hoc EMA\n\nThe EMA of relative width sigma_rel = {sigma_rel} at step {rec.step} ({rec.nimg:,} "
             f"images), reconstructed (EDM2's least squares) from {len(rec.terms)} power-EMA snapshots up to "
             f"{snap_dir}; inputs and coefficients in `{RESULT_FILE}`.\n")
    # the result file last: its presence marks a finished export
    write_model_card(out, run_dir=run_dir, run_cfg=run_cfg, model=model, ckpt=snap_dir, fmt="safetensors",
                     sample_defaults=defaults, usage=usage, notes=notes)
    write_json_atomic(out / RESULT_FILE, {"sigma_rel": sigma_rel, "step": rec.step, "nimg": rec.nimg,
                                          "terms": [{"step": st, "sigma_rel": sr, "coefficient": c}
                                                    for st, sr, c in rec.terms]}, indent=1)
    print(f"phema: sigma_rel {sigma_rel} at step {rec.step} from {len(rec.terms)} snapshot EMAs -> {out}", flush=True)
    return out


def sample_command(cfg: DictConfig, run_cfg: DictConfig, export: Path) -> list[str]:
    """The tools/sample.py command that samples an export for FID (``ckpt=`` with the run's settings and VAE)."""
    settings, _ = sampler_settings(run_cfg, sample_defaults(run_cfg))
    settings.update(OmegaConf.to_container(cfg.eval.sampler, resolve=True) if cfg.eval.sampler else {})
    _, manifest = run_manifest(run_cfg)
    args = [f"ckpt={export / 'ema.safetensors'}", f"model={hydra_dict(OmegaConf.to_container(run_cfg.model, resolve=True))}",
            f"num_samples={int(cfg.eval.num_samples)}", "labels=balanced", f"batch_size={int(cfg.eval.batch_size)}",
            f"precision={cfg.eval.precision}", f"out={export / 'samples'}",
            *(f"{k}={v}" for k, v in settings.items())]
    if manifest is not None and manifest.vae != "none":
        args += [f"vae={manifest.vae}", f"vae_scale={manifest.scaling_factor}"]
    n = int(cfg.eval.nproc_per_node)
    launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}"] if n > 1 else [sys.executable]
    return [*launch, str(TOOLS / "sample.py"), *args]


def check_scorable(run_cfg: DictConfig) -> None:
    """FID needs class-conditional RGB samples: refuse text-to-image runs and pixel runs of other channel counts
    before anything is reconstructed or sampled."""
    if run_cfg.model.get("context_dim") is not None:
        raise ValueError("sweep FID is for class-conditional runs; sample a text-to-image export with prompts "
                         "(tools/sample.py ckpt=... prompts=...) and score it with tools/evaluate.py")
    _, manifest = run_manifest(run_cfg)
    if (manifest is None or manifest.vae == "none") and run_cfg.model.in_channels != 3:
        raise ValueError(f"the run's samples are {run_cfg.model.in_channels}-channel pixels: Inception scores RGB "
                         f"images (a latent run decodes to RGB); leave eval.ref unset to only reconstruct")


def fid_of(cfg: DictConfig, run_cfg: DictConfig, export: Path) -> dict:
    """Sample ``export`` (resumable) and score it against ``eval.ref``: the evaluator's JSON result."""
    from bigdit.evaluation.runner import evaluate
    from bigdit.inference import resolve_device

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TOOLS.parent), os.environ.get("PYTHONPATH")]))}
    subprocess.run(sample_command(cfg, run_cfg, export), check=True, env=env)
    return evaluate(export / "samples" / "samples.npz", cfg.eval.ref, inception_weights=cfg.eval.inception_weights,
                    device=resolve_device(cfg.eval.device), num_samples=int(cfg.eval.num_samples),
                    batch_size=int(cfg.eval.batch_size), fid_method=cfg.eval.fid_method,
                    out=export / "samples" / f"eval-{Path(cfg.eval.ref).stem}.json", progress=False)


def run(cfg: DictConfig) -> dict[float, dict]:
    """Reconstruct (and with ``sweep`` + ``eval.ref``, score) every width asked for: ``{sigma_rel: result}``."""
    sigma_rels = widths(cfg)
    if cfg.eval.ref is not None and not Path(cfg.eval.ref).is_file():
        raise FileNotFoundError(f"eval.ref={cfg.eval.ref}: no such reference batch")
    run_dir = Path(cfg.run)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir}/config.yaml not found: run= must be a bigdit run directory")
    run_cfg = OmegaConf.load(run_dir / "config.yaml")
    if cfg.sweep is not None and cfg.eval.ref is not None:
        check_scorable(run_cfg)
    step = snapshots_until(run_dir, cfg.step)[-1].step  # fails here, naming the snapshot steps
    base = Path(cfg.out) if cfg.out else run_dir / "export" / f"phema-{step_tag(step)}"
    results: dict[float, dict] = {}
    for sigma_rel in sigma_rels:
        out = base / f"sigma-{sigma_rel:.3f}" if cfg.sweep is not None or cfg.out is None else base
        export_width(cfg, run_dir, run_cfg, sigma_rel, step, out)
        results[sigma_rel] = {"export": str(out)}
        if cfg.sweep is not None and cfg.eval.ref is not None:
            scores = fid_of(cfg, run_cfg, out)
            results[sigma_rel].update(fid=scores["fid"], eval=scores["out"])
            print(f"phema: sigma_rel {sigma_rel:.3f}  FID {scores['fid']:.3f}", flush=True)
    if cfg.sweep is not None:
        write_json_atomic(base / "sweep.json", {f"{k:.3f}": v for k, v in results.items()}, indent=1)
        if cfg.eval.ref is not None:
            print("sigma_rel  FID\n" + "\n".join(f"{k:.3f}      {v['fid']:.3f}" for k, v in results.items()), flush=True)
    return results


@hydra.main(config_path=CONFIG_DIR, config_name="phema", version_base=None)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
