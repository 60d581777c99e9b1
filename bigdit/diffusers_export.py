"""A DiT run as a diffusers ``DiTPipeline``: ``tools/export.py format=diffusers``.

The pipeline holds a ``DiTTransformer2DModel`` with our weights, the VAE the run's shards were encoded with
(its ``scaling_factor`` set to the manifest's), a ``DDIMScheduler`` on the exact training betas and the
manifest's class names as ``id2label``; ``DiTPipeline.from_pretrained(out)`` loads it with stock diffusers.

Weight mapping (official DiT layout -> diffusers), checked numerically in tests/test_export_diffusers.py:

==========================================================  =================================================
ours                                                        diffusers
==========================================================  =================================================
``x_embedder.proj``                                         ``pos_embed.proj`` (the sin-cos table is recomputed)
``t_embedder.mlp.0`` / ``.2``                               ``transformer_blocks.N.norm1.emb.timestep_embedder
                                                            .linear_1`` / ``linear_2``, copied into every block
``y_embedder.embedding_table`` (``num_classes + 1`` rows)   ``transformer_blocks.N.norm1.emb.class_embedder
                                                            .embedding_table`` (1001 rows, see below), every block
``blocks.N.adaLN_modulation.1``                             ``transformer_blocks.N.norm1.linear`` (same chunk order:
                                                            shift, scale, gate of attention, then of the MLP)
``blocks.N.attn.qkv``                                       ``attn1.to_q`` / ``to_k`` / ``to_v`` (thirds of it)
``blocks.N.attn.proj``                                      ``attn1.to_out.0``
``blocks.N.mlp.fc1`` / ``fc2``                              ``ff.net.0.proj`` / ``ff.net.2``
``final_layer.adaLN_modulation.1``                          ``proj_out_1`` (shift, scale; diffusers conditions it
                                                            on block 0's embedder copy, the same vector as ours)
``final_layer.linear``                                      ``proj_out_2``
==========================================================  =================================================

Two things of diffusers' DiT port shape the export:

- ``DiTPipeline`` guides against the hard-coded null label 1000 (ImageNet's), so the label table is padded
  to 1001 rows: ours first, our null row at 1000 and in the unused rows between. Models with more than 1000
  classes cannot be guided by ``DiTPipeline`` and are refused.
- diffusers' timestep features use frequencies ``10000 ** (-i / 127)`` (``Timesteps(downscale_freq_shift=1)``
  inside ``CombinedTimestepLabelEmbeddings``), DiT's (and ours) ``10000 ** (-i / 128)``. No weight change
  compensates for that and no config switch exists, so the stock pipeline (like the hub's converted
  ``facebook/DiT-XL-2-256``) samples *close to*, not exactly as, the trained model;
  :func:`use_dit_timestep_embedding` (two lines, quoted in the model card) makes it exact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

#: the null label ``DiTPipeline`` guides against (hard-coded there: ImageNet's 1000 classes)
PIPELINE_NULL_LABEL = 1000
#: the diffusers DDIM settings that visit our DDIM timesteps (``space_timesteps(T, "ddimN")``) exactly
DDIM_SPACING = {"timestep_spacing": "leading", "steps_offset": 0, "set_alpha_to_one": True}


def _safetensors_hint(what: str) -> str:
    return (f"{what}: export it with format=safetensors (the default), whose ema.safetensors + "
            f"model_config.json load with bigdit's build_model(**config) + load_weights and tools/sample.py")


def check_exportable(model: nn.Module, name: str, vae: str | None, shift_factor: float = 0.0) -> None:
    """Raise ValueError (naming the backbone and the reason) unless ``model`` can become a ``DiTPipeline``.

    ``model`` may live on the meta device; ``vae`` is the VAE to bundle (None or "none" for a pixel-space run),
    ``shift_factor`` the latent shift of the run's codec.
    """
    from bigdit.models.dit import DiT

    if not isinstance(model, DiT):
        raise ValueError(_safetensors_hint(
            f"{name} ({type(model).__name__}) has no diffusers model class: diffusers' DiTPipeline / "
            f"DiTTransformer2DModel implement DiT only, not U-DiT, U-ViT or ADM"))
    if model.context_dim is not None:
        raise ValueError(_safetensors_hint(
            f"{name} is the text-to-image DiT form (cross-attention to CLIP tokens), which DiTTransformer2DModel "
            f"(class-conditional only) does not implement"))
    hidden = model.blocks[0].mlp.fc1.out_features if len(model.blocks) else 4 * model.hidden_size
    if hidden != 4 * model.hidden_size:
        raise ValueError(_safetensors_hint(
            f"{name} has mlp_ratio {hidden / model.hidden_size:g}; DiTTransformer2DModel's MLP is 4x wide"))
    if model.num_classes > PIPELINE_NULL_LABEL:
        raise ValueError(_safetensors_hint(
            f"{name} has {model.num_classes} classes; DiTPipeline guides against the hard-coded null label "
            f"{PIPELINE_NULL_LABEL}, which would be a real class of this model"))
    if vae is None or str(vae) == "none":
        raise ValueError(_safetensors_hint(
            f"{name} was trained in pixel space (vae=none): DiTPipeline always decodes its output with a VAE "
            f"(latents / vae.config.scaling_factor -> vae.decode), so it cannot hold a pixel-space model"))
    if shift_factor:
        raise ValueError(_safetensors_hint(
            f"{name}'s latents are shifted (shift_factor {shift_factor}): DiTPipeline only divides by "
            f"scaling_factor before decoding"))


def transformer_config(model: nn.Module) -> dict[str, Any]:
    """``DiTTransformer2DModel`` config of our DiT ``model``."""
    heads = model.blocks[0].attn.num_heads
    return dict(
        num_attention_heads=heads,
        attention_head_dim=model.hidden_size // heads,
        in_channels=model.in_channels,
        out_channels=model.out_channels,
        num_layers=len(model.blocks),
        sample_size=model.input_size,
        patch_size=model.patch_size,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=PIPELINE_NULL_LABEL,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        attention_bias=True,
    )


def padded_label_table(table: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Our label table (``num_classes`` rows, plus the null row when trained with label dropout) as diffusers'
    1001 rows: ours, then the null row (zeros without one) at ``PIPELINE_NULL_LABEL`` and every unused row."""
    null = table[num_classes] if table.shape[0] > num_classes else torch.zeros_like(table[0])
    out = null.expand(PIPELINE_NULL_LABEL + 1, table.shape[1]).clone()
    out[:num_classes] = table[:num_classes]
    return out


def to_diffusers_state_dict(weights: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Our DiT state dict -> ``DiTTransformer2DModel``'s (see the module docstring for the mapping)."""
    w = {k: v.detach().float().cpu() for k, v in weights.items()}
    labels = padded_label_table(w["y_embedder.embedding_table.weight"], model.num_classes)
    out = {"pos_embed.proj.weight": w["x_embedder.proj.weight"], "pos_embed.proj.bias": w["x_embedder.proj.bias"]}
    for i in range(len(model.blocks)):
        ours, theirs = f"blocks.{i}.", f"transformer_blocks.{i}."
        emb = theirs + "norm1.emb."
        out[emb + "class_embedder.embedding_table.weight"] = labels.clone()
        for p in ("weight", "bias"):
            out[f"{emb}timestep_embedder.linear_1.{p}"] = w[f"t_embedder.mlp.0.{p}"].clone()
            out[f"{emb}timestep_embedder.linear_2.{p}"] = w[f"t_embedder.mlp.2.{p}"].clone()
            out[f"{theirs}norm1.linear.{p}"] = w[f"{ours}adaLN_modulation.1.{p}"]
            q, k, v = w[f"{ours}attn.qkv.{p}"].chunk(3, dim=0)
            out[f"{theirs}attn1.to_q.{p}"] = q.clone()
            out[f"{theirs}attn1.to_k.{p}"] = k.clone()
            out[f"{theirs}attn1.to_v.{p}"] = v.clone()
            out[f"{theirs}attn1.to_out.0.{p}"] = w[f"{ours}attn.proj.{p}"]
            out[f"{theirs}ff.net.0.proj.{p}"] = w[f"{ours}mlp.fc1.{p}"]
            out[f"{theirs}ff.net.2.{p}"] = w[f"{ours}mlp.fc2.{p}"]
    for p in ("weight", "bias"):
        out[f"proj_out_1.{p}"] = w[f"final_layer.adaLN_modulation.1.{p}"]
        out[f"proj_out_2.{p}"] = w[f"final_layer.linear.{p}"]
    return out


def build_transformer(model: nn.Module, weights: dict[str, torch.Tensor] | None = None):
    """A ``DiTTransformer2DModel`` computing what our DiT ``model`` computes (with ``weights``, default its own),
    up to diffusers' timestep frequencies (:func:`use_dit_timestep_embedding`)."""
    from diffusers import DiTTransformer2DModel

    transformer = DiTTransformer2DModel(**transformer_config(model))
    transformer.load_state_dict(to_diffusers_state_dict(weights or model.state_dict(), model), strict=True)
    # diffusers recomputes the sin-cos table; it must be ours (the official checkpoints store the same one)
    ours = (weights or model.state_dict())["pos_embed"].float().cpu()
    if not torch.allclose(transformer.pos_embed.pos_embed, ours, atol=1e-5):
        raise ValueError("the model's position embedding is not DiT's sin-cos table, which diffusers recomputes")
    return transformer.eval()


def use_dit_timestep_embedding(transformer) -> Any:
    """Switch a diffusers DiT's timestep features to DiT's frequencies ``10000 ** (-i / 128)`` (diffusers uses
    ``/ 127``): the transformer then computes exactly what the trained model does. Returns ``transformer``."""
    for block in transformer.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    return transformer


def ddim_scheduler(betas: Sequence[float] | np.ndarray):
    """diffusers DDIM on the exact training ``betas``, spaced as our ``ddimN`` (``leading``, no offset): it visits
    our timesteps whenever the step count divides the number of training steps (:func:`ddim_steps_that_match`)."""
    from diffusers import DDIMScheduler

    betas = np.asarray(betas, dtype=np.float64)
    return DDIMScheduler(num_train_timesteps=len(betas), trained_betas=betas.tolist(), clip_sample=False,
                         prediction_type="epsilon", **DDIM_SPACING)


def ddim_steps_that_match(num_train_timesteps: int) -> list[int]:
    """Step counts for which diffusers' DDIM timesteps (``DDIM_SPACING``) equal ours: the divisors of T (> 1)."""
    return [n for n in range(2, num_train_timesteps + 1) if num_train_timesteps % n == 0]


def build_pipeline(model: nn.Module, weights: dict[str, torch.Tensor], betas: np.ndarray, vae: str | Path,
                   scaling_factor: float | None, classes: Sequence[str] = ()):
    """The ``DiTPipeline`` of a DiT run: transformer, VAE (``scaling_factor`` None keeps the VAE's own),
    DDIM on ``betas`` and ``id2label`` from ``classes`` (saved in ``model_index.json``)."""
    from diffusers import AutoencoderKL, DiTPipeline

    autoencoder = AutoencoderKL.from_pretrained(str(vae))
    if autoencoder.config.latent_channels != model.in_channels:
        raise ValueError(f"VAE {vae} makes {autoencoder.config.latent_channels}-channel latents, the model takes "
                         f"{model.in_channels}")
    if scaling_factor is not None:
        autoencoder.register_to_config(scaling_factor=float(scaling_factor))
    id2label = {str(i): str(c) for i, c in enumerate(classes)} or None
    pipe = DiTPipeline(transformer=build_transformer(model, weights), vae=autoencoder.eval(),
                       scheduler=ddim_scheduler(betas), id2label=id2label)
    if id2label is not None:
        pipe.register_to_config(id2label=id2label)  # DiTPipeline does not record it itself
    return pipe
