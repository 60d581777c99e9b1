"""CLIP score of text-to-image samples: how well each image matches its prompt under an open_clip model.

``100 * cos(E_image, E_text)`` per sample, averaged, the mean clamped at 0 (torchmetrics' ``CLIPScore``:
``max(mean(100 * cos), 0)``). The model is an open_clip CLIP, by default the one the run's captions were
cached with (``tools/cache_text.py`` records it in the shards' manifest), images through that model's own
evaluation transform.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from bigdit.evaluation.stats import ieee_fp32


class CLIPScorer:
    """An open_clip model (name + pretrained tag or local weights file) scoring (image, prompt) pairs."""

    def __init__(self, model: str, pretrained: str | None = None, device: str | torch.device = "cpu",
                 model_config: str | None = None, batch_size: int = 100):
        import open_clip

        if model_config:  # a custom architecture (e.g. the tests' tiny tower): register its JSON config
            open_clip.add_model_config(model_config)
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            model, pretrained=pretrained or None, device=device)
        self.model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.name = f"{model}:{pretrained}" if pretrained else model

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings (N, E) float32."""
        out = []
        for a in range(0, len(texts), self.batch_size):
            with ieee_fp32():
                e = self.model.encode_text(self.tokenizer(texts[a : a + self.batch_size]).to(self.device)).float()
            out.append(e / e.norm(dim=-1, keepdim=True))
        return torch.cat(out)

    @torch.no_grad()
    def image_embeddings(self, images: np.ndarray) -> torch.Tensor:
        """Unit-norm image embeddings (N, E) float32 of uint8 images (N, H, W, 3)."""
        out = []
        for a in range(0, len(images), self.batch_size):
            x = torch.stack([self.preprocess(Image.fromarray(np.asarray(im))) for im in images[a : a + self.batch_size]])
            with ieee_fp32():
                e = self.model.encode_image(x.to(self.device)).float()
            out.append(e / e.norm(dim=-1, keepdim=True))
        return torch.cat(out)

    def scores(self, images: np.ndarray, texts: list[str]) -> torch.Tensor:
        """``100 * cos`` per (image, text) pair (N,)."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} prompts")
        if not len(texts):
            return torch.zeros(0, device=self.device)
        return 100 * (self.image_embeddings(images) * self.text_embeddings(texts)).sum(-1)


def clip_score(score_sum: float, count: int) -> float:
    """torchmetrics' reduction of per-sample scores: ``max(sum / count, 0)``."""
    if count == 0:
        raise ValueError("CLIP score of no samples")
    return max(score_sum / count, 0.0)
