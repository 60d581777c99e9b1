"""The model card (``README.md``) ``tools/export.py`` writes into every export directory.

It records what the weights are (backbone, parameter count, config), what they were trained on (the data
manifest's summary), how far (steps, images seen), how to sample them (the run preset's ``sample:`` section,
else tools/sample.py's defaults) and any evaluation results found in the run directory (every JSON file
``tools/eval_digits.py`` or an evaluation job left there: ``eval*.json`` at the top, any ``*.json`` under
``samples*/`` or ``eval*/``), generically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf

from bigdit.data.schema import Manifest

#: where evaluation results are looked for, relative to the run directory
EVAL_PATTERNS = ("eval*.json", "samples*/**/*.json", "eval*/**/*.json")
_MAX_EVAL_BYTES = 1 << 20


def run_manifest(run_cfg: DictConfig) -> tuple[str | None, Manifest | None]:
    """The training shards' root and manifest, when the run trained from shards."""
    root = run_cfg.get("data", {}).get("root")
    if root is None or not (Path(root) / "manifest.json").is_file():
        return root, None
    return root, Manifest.load(root)


def checkpoint_counters(ckpt: Path) -> dict[str, int | None]:
    """``step`` and ``nimg`` (images seen) of a checkpoint, from the counters the training loop saved (memory-mapped,
    nothing else loaded); the step from the directory name when they cannot be read."""
    ckpt = Path(ckpt)
    for name in ("extra.pt", "state.pt"):  # FSDP2 / DeepSpeed, DDP
        if (ckpt / name).is_file():
            try:
                state = torch.load(ckpt / name, map_location="cpu", weights_only=True, mmap=True)
                return {"step": int(state["step"]), "nimg": int(state["nimg"])}
            except (KeyError, RuntimeError, ValueError, TypeError):
                break
    try:
        step = int(ckpt.name.rsplit("-", 1)[-1])
    except ValueError:
        step = None
    return {"step": step, "nimg": None}


def sampler_settings(run_cfg: DictConfig, defaults: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """(settings, where they come from): the run preset's ``sample:`` section over tools/sample.py's ``defaults``."""
    preset = run_cfg.get("sample")
    preset = OmegaConf.to_container(preset, resolve=True) if preset is not None else {}
    settings = {k: preset.get(k, v) for k, v in defaults.items()}
    settings.update({k: v for k, v in preset.items() if k not in settings})
    missing = [k for k, v in defaults.items() if k not in preset and v is not None]  # unset options: not used
    if not preset:
        source = "tools/sample.py's defaults (the run preset has no `sample:` section)"
    else:
        source = "the run preset's `sample:` section" + (
            f" (tools/sample.py's defaults for {', '.join(missing)})" if missing else "")
    return settings, source


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [kv for k, v in value.items() for kv in _flatten(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(value, list) and len(value) > 8:
        return [(prefix, f"[{len(value)} values]")]
    return [(prefix, value)]


def eval_results(run_dir: Path) -> dict[str, list[tuple[str, Any]]]:
    """Every evaluation JSON file under ``run_dir`` (``EVAL_PATTERNS``), relative path -> flattened (key, value)s."""
    run_dir = Path(run_dir)
    found: dict[str, list[tuple[str, Any]]] = {}
    for pattern in EVAL_PATTERNS:
        for path in sorted(run_dir.glob(pattern)):
            rel = path.relative_to(run_dir).as_posix()
            if rel in found or not path.is_file() or path.stat().st_size > _MAX_EVAL_BYTES:
                continue
            try:
                data = json.loads(path.read_text())
            except (ValueError, UnicodeDecodeError):
                continue
            found[rel] = _flatten(data) if isinstance(data, dict) else [("value", data)]
    return found


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "—" if v is None else str(v)


def _table(rows: list[tuple[str, Any]], head: tuple[str, str] = ("", "")) -> str:
    lines = [f"| {head[0]} | {head[1]} |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v).replace('|', '/')} |" for k, v in rows]
    return "\n".join(lines)


def model_card(*, run_dir: Path, run_cfg: DictConfig, model: torch.nn.Module, ckpt: Path, fmt: str,
               files: list[str], sample_defaults: Mapping[str, Any], usage: str, notes: str = "") -> str:
    """The Markdown model card of an export (``usage``: how to load this format; ``notes``: format specifics)."""
    from bigdit.diffusion import dit_cfg_scale

    model_cfg = OmegaConf.to_container(run_cfg.model, resolve=True)
    name = model_cfg["name"]
    n_params = sum(p.numel() for p in model.parameters())
    counters = checkpoint_counters(ckpt)
    root, manifest = run_manifest(run_cfg)
    settings, source = sampler_settings(run_cfg, sample_defaults)
    conditioning = ("text-to-image" if model_cfg.get("context_dim") else
                    "class-conditional" if model_cfg.get("num_classes") else "unconditional")
    tags = ["bigdit", name.split("/")[0].rsplit("-", 1)[0].lower(), conditioning, "diffusion"]
    front = ["---", *(["library_name: diffusers"] if fmt == "diffusers" else []),
             "tags:", *[f"- {t}" for t in tags], "---", ""]

    model_rows = [("backbone", name), ("parameters", f"{n_params:,}"), ("conditioning", conditioning),
                  ("weights", "EMA" if fmt == "diffusers" else "EMA (`ema.*`), raw with raw=true (`model.*`)"),
                  ("checkpoint", ckpt.name)]
    train_rows = [("optimizer steps", counters["step"]), ("images seen (nimg)",
                                                          f"{counters['nimg']:,}" if counters["nimg"] else None)]
    run = run_cfg.get("run", {})
    train_rows += [("global batch", run.get("global_batch")), ("precision", run.get("precision")),
                   ("EMA decay", run_cfg.get("ema", {}).get("decay"))]
    diffusion = run_cfg.get("diffusion")
    if diffusion is not None:
        d = OmegaConf.to_container(diffusion, resolve=True)
        train_rows.append(("diffusion", ", ".join(f"{k} {v}" for k, v in d.items())))

    if manifest is not None:
        data_rows = [("shard root", root), ("format", manifest.format), ("samples", f"{manifest.count:,}"),
                     ("shards", len(manifest.shards)), ("resolution", manifest.resolution),
                     ("latent shape", "x".join(map(str, manifest.latent_shape))), ("vae", manifest.vae),
                     ("scaling factor", manifest.scaling_factor), ("shift factor", manifest.shift_factor),
                     ("classes", manifest.num_classes)]
        if manifest.classes:
            shown = ", ".join(manifest.classes[:10]) + (", ..." if manifest.num_classes > 10 else "")
            data_rows.append(("class names", shown))
        if manifest.text:
            t = manifest.text
            data_rows.append(("text model", " ".join(str(x) for x in (t.get("model"), t.get("pretrained"))
                                                     if x) + f" ({t.get('layer', 'last')} layer, "
                                                     f"{t.get('tokens')}x{t.get('dim')} tokens)"))
        data = _table(data_rows)
    else:
        target = run_cfg.get("data", {}).get("_target_", "?")
        source_cfg = run_cfg.get("data", {}).get("source", {})
        data = (f"No shard manifest (the run read `{target}`"
                + (f" over `{source_cfg.get('_target_')}`" if source_cfg else "") + "), so no VAE: pixel space.")

    sample_rows = [(k, v) for k, v in settings.items() if v is not None]  # unset options (no guidance interval)
    try:
        sample_rows.append(("guidance scale in DiT's convention (1 = none)",
                            dit_cfg_scale(settings["cfg_scale"], settings.get("cfg_convention", "dit"))))
    except (KeyError, TypeError, ValueError):
        pass

    evals = eval_results(run_dir)
    if evals:
        metrics = "\n\n".join(f"`{path}`\n\n" + _table(rows, ("metric", "value")) for path, rows in evals.items())
    else:
        metrics = "No evaluation results in the run directory (looked for " + \
                  ", ".join(f"`{p}`" for p in EVAL_PATTERNS) + ")."

    config = json.dumps(model_cfg, indent=2)
    sections = [
        f"# {run_cfg.get('run', {}).get('name', run_dir.name)}: {name}\n",
        f"{conditioning.capitalize()} {name} trained with bigdit (run `{run_dir}`), exported as **{fmt}**.\n",
        "## Model\n", _table(model_rows), "", "```json", config, "```\n",
        "## Training\n", _table(train_rows), "",
        "## Data\n", data, "",
        "## Sampling\n", f"Settings of `tools/sample.py run=<run>` for this run, from {source}:\n",
        _table(sample_rows), "",
        "## Evaluation\n", metrics, "",
        "## Usage\n", usage.strip(), "",
    ]
    if notes:
        sections += [notes.strip(), ""]
    sections += ["## Files\n", *[f"- `{f}`" for f in sorted(files)], ""]
    return "\n".join(front + sections)
