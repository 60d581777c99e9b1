"""The CLIP text encoder shared by ``tools/cache_text.py`` (captions -> cached embeddings) and sampling from
prompts: the same open_clip tower, layer and post-processing, so a prompt at sampling time is embedded
exactly like the training captions were.
"""

from __future__ import annotations

import numpy as np
import torch


class TextEncoder:
    """An open_clip text tower returning per-token states (after ``ln_final``) and pooled embeddings."""

    def __init__(self, model: str, pretrained: str | None, layer: str = "last", device: str = "cpu",
                 model_config: str | None = None):
        import open_clip

        if layer not in ("last", "penultimate"):
            raise ValueError(f"layer={layer!r}: use last or penultimate")
        if model_config:  # a custom architecture (e.g. the tests' tiny tower): register its JSON config
            open_clip.add_model_config(model_config)
        self.model = open_clip.create_model(model, pretrained=pretrained or None, device=device).eval()
        self.tokenizer = open_clip.get_tokenizer(model)
        self.device = device
        self.layer = layer
        blocks = self.model.transformer.resblocks
        self._captured: list[torch.Tensor] = []
        # Hooks see the states the pooled embedding is computed from, so one encode_text call gives both.
        target = self.model.ln_final if layer == "last" else blocks[-2]
        target.register_forward_hook(lambda mod, args, out: self._captured.append(out))
        self.tokens = int(self.model.positional_embedding.shape[0])
        self.dim = int(self.model.ln_final.normalized_shape[0])

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(tokens (N, T, D), pooled (N, P)) float16 for a list of captions."""
        ids = self.tokenizer(texts).to(self.device)
        self._captured.clear()
        pooled = self.model.encode_text(ids)
        states = self._captured[-1]
        if not getattr(self.model.transformer, "batch_first", True):
            states = states.transpose(0, 1)
        if self.layer == "penultimate":
            states = self.model.ln_final(states)
        return states.float().cpu().half().numpy(), pooled.float().cpu().half().numpy()
