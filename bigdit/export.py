"""Consolidate a training checkpoint of any strategy into full weights, offline and in one process, and write
them as an export directory (safetensors + ``model_config.json`` + model card), for ``tools/export.py`` and
``tools/phema.py``.

The checkpoint names the strategy that wrote it (:func:`bigdit.checkpoint.checkpoint_strategy`), and that
strategy's ``consolidate`` reads its own format back; this module only supplies the model's parameter
shapes, built on the meta device (no memory, no weights initialised).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf

from bigdit.checkpoint import checkpoint_strategy
from bigdit.engine import strategy_class
from bigdit.models import build_model
from bigdit.repa import PROJECTOR


def param_shapes(model_cfg: DictConfig) -> dict[str, torch.Size]:
    """Parameter name -> shape of the model ``model_cfg`` describes."""
    with torch.device("meta"):
        model = build_model(**model_cfg)
    return {n: p.shape for n, p in model.named_parameters()}


def consolidated_weights(ckpt_dir: str | Path, model_cfg: DictConfig, which: str = "ema") -> dict[str, torch.Tensor]:
    """Full (unsharded) fp32 ``ema`` or ``model`` weights of the model ``model_cfg`` from the checkpoint directory
    ``ckpt_dir``; training-only modules (REPA's projector, :data:`bigdit.repa.PROJECTOR`) are dropped."""
    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
    ckpt_dir = Path(ckpt_dir)
    strategy = strategy_class(checkpoint_strategy(ckpt_dir)["name"])
    weights = strategy.consolidate(ckpt_dir, param_shapes(model_cfg), which)
    return {k: v for k, v in weights.items() if not k.startswith(f"{PROJECTOR}.")}


CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def sample_defaults(run_cfg: DictConfig) -> dict[str, Any]:
    """tools/sample.py's sampler defaults for the run's diffusion kind (what it uses when a run preset has no
    ``sample:`` section), and DDIM's eta for Gaussian runs."""
    from bigdit.diffusion import build_diffusion
    from bigdit.inference import default_settings

    defaults = default_settings(build_diffusion(run_cfg.get("diffusion")))
    if defaults["sampler"] == "sde":
        return defaults
    return {**defaults, "eta": OmegaConf.load(CONFIG_DIR / "sample.yaml").eta}


def hydra_dict(cfg: Mapping[str, Any]) -> str:
    """``{name: DiT-S/2, input_size: 8, ...}``: a model config as a tools/sample.py ``model=`` override."""
    def value(v):
        return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
    return "{" + ", ".join(f"{k}: {value(v)}" for k, v in cfg.items()) + "}"


def official_layout(model_cfg: dict) -> bool:
    """Whether the official code loads the state dict as it is (``ema.pt``): DiT's, and ADM's (guided-diffusion's
    plain state dicts, denoisers and classifiers) unless label dropout added a null row to its label table."""
    if model_cfg["name"].startswith("DiT-"):
        return True
    return model_cfg["name"].startswith("ADM-") and not model_cfg.get("class_dropout_prob")


def write_safetensors(out: Path, model_cfg: DictConfig, model: torch.nn.Module,
                      weights: dict[str, dict[str, torch.Tensor]]) -> None:
    """``model_config.json`` and ``<which>.safetensors`` for each of ``weights`` (``ema``, ``model``) into ``out``;
    DiT and ADM models also get ``ema.pt``, the official checkpoint format (:func:`official_layout`). Each set
    must load into ``model`` strictly: a partial export is refused."""
    from safetensors.torch import save_file

    config = OmegaConf.to_container(model_cfg, resolve=True)
    (out / "model_config.json").write_text(json.dumps(config, indent=2) + "\n")
    for which, state in weights.items():
        model.load_state_dict(state, strict=True)
        save_file({k: v.contiguous() for k, v in state.items()}, out / f"{which}.safetensors")
        if which == "ema" and official_layout(config):
            torch.save(state, out / "ema.pt")


def safetensors_usage(out: Path, run_cfg: DictConfig, settings: Mapping[str, Any], manifest,
                      run_dir: Path | None = None) -> str:
    """The model card's usage section of a safetensors export: loading it, and sampling it with tools/sample.py
    (also as ``run=<run_dir>`` when given: the export holds the run's checkpoint EMA)."""
    config = OmegaConf.to_container(run_cfg.model, resolve=True)
    # with ckpt= tools/sample.py knows neither the run's preset nor its shards: the card spells them out
    args = " ".join(f"{k}={v}" for k, v in settings.items() if v is not None)
    if "diffusion" in run_cfg and run_cfg.diffusion.get("kind") == "flow":
        args += f" 'diffusion={hydra_dict(OmegaConf.to_container(run_cfg.diffusion, resolve=True))}'"
    if manifest is not None and manifest.vae != "none":
        args += f" vae={manifest.vae} vae_scale={manifest.scaling_factor}"
    return f"""```python
import json
from bigdit.models import build_model, load_weights

model = load_weights(build_model(**json.load(open("model_config.json"))), "ema.safetensors").eval()
```

or `python tools/sample.py ckpt={out}/ema.safetensors 'model={hydra_dict(config)}' {args}`""" + (
        f",\nor `python tools/sample.py run={run_dir}` where the run is at hand." if run_dir is not None else ".")


def write_model_card(out: Path, *, run_dir: Path, run_cfg: DictConfig, model: torch.nn.Module, ckpt: Path, fmt: str,
                     sample_defaults: Mapping[str, Any], usage: str, notes: str = "") -> Path:
    """``README.md`` (:func:`bigdit.model_card.model_card`) listing every file already in ``out``."""
    from bigdit.model_card import model_card

    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != "README.md")
    path = out / "README.md"
    path.write_text(model_card(run_dir=run_dir, run_cfg=run_cfg, model=model, ckpt=ckpt, fmt=fmt,
                               files=[*files, "README.md"], sample_defaults=sample_defaults, usage=usage, notes=notes))
    return path
