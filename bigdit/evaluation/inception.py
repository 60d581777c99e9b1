"""The Inception network of FID, sFID, IS and precision/recall: the 2015-12-05 TensorFlow Inception v3.

Built on torch-fidelity's ``FeatureExtractorInceptionV3``, a TF-faithful PyTorch port of that graph
(``classify_image_graph_def.pb``, which ADM's evaluator runs) with TF 1.x's bilinear resize to 299x299 and
its ``(x - 128) / 128`` input normalisation; torch-fidelity documents its FID as within 1e-6 (relative) of
TF's. Weights are torch-fidelity's conversion of the TF graph, the file torchmetrics also uses.

Tensor of the TF graph            here
================================  ==============================================================
``pool_3:0`` (FID, P/R)           torch-fidelity's ``'2048'`` feature (N, 2048)
``mixed_6/conv:0`` (sFID)         output of ``Mixed_6d.branch1x1`` (conv + BN + ReLU), (N, 192, 17, 17);
                                  ADM keeps its first 7 channels, flattened channels-last: (N, 2023)
``softmax/logits/MatMul`` (IS)    torch-fidelity's ``'logits_unbiased'``: pool_3 @ W, no bias (N, 1008)
================================  ==============================================================

``mixed_6`` is the TF graph's seventh mixed block, the third 17x17 one: torch-fidelity's weight conversion
maps ``mixed_6/conv/*`` to ``Mixed_6d.branch1x1.*``; the op named ``mixed_6/conv`` is the ReLU that ends
that branch (what ``mixed_6/join`` concatenates).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bigdit.evaluation.stats import ieee_fp32

WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_NAME}"
POOL_DIM = 2048
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023
NUM_LOGITS = 1008


def spatial_features(mixed_6_conv: torch.Tensor) -> torch.Tensor:
    """ADM's sFID features from the ``mixed_6/conv`` map (N, 192, 17, 17) NCHW: the first 7 channels in NHWC
    order, flattened: feature ``(h * 17 + w) * 7 + c`` is channel ``c`` at ``(h, w)``. (N, 2023) float32."""
    x = mixed_6_conv[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)
    return x.reshape(len(x), -1).float()


def default_weights_path() -> Path:
    """Where torch-fidelity's own download keeps the weights (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_NAME


def resolve_weights(weights: str | Path | None) -> Path:
    """The weights file: ``weights`` when given (it must exist), else torch hub's cached copy, downloaded
    first when missing. Raises with where to get the file when there is none."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"inception_weights={weights}: no such file. It is torch-fidelity's conversion of the 2015-12-05 "
                f"TF Inception ({WEIGHTS_NAME}, 91 MB, also used by torchmetrics): download {WEIGHTS_URL} on a "
                f"machine with internet and pass its path")
        return path
    path = default_weights_path()
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(WEIGHTS_URL, str(path), progress=False)
    except Exception as e:  # no network (URLError, timeouts, proxies): say what to do instead
        raise FileNotFoundError(
            f"no Inception weights: inception_weights= was not given and downloading {WEIGHTS_URL} to {path} "
            f"failed ({type(e).__name__}: {e}). Download that file where there is internet and pass "
            f"inception_weights=<path to {WEIGHTS_NAME}>") from e
    return path


def _base():
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3


class InceptionV3(_base()):
    """torch-fidelity's Inception v3 returning ADM's three tensors (see the module docstring).

    ``features(images)`` takes uint8 images (N, H, W, 3) NHWC, as ADM's ``.npz`` stores them (numpy or
    torch), any size (resized to 299 inside, as the TF graph does).
    """

    def __init__(self, weights_path: str | Path, batch_size: int = 100):
        try:
            super().__init__("bigdit-inception-v3-compat", ["2048", "logits_unbiased"],
                             feature_extractor_weights_path=str(weights_path))
        except RuntimeError as e:
            raise ValueError(f"{weights_path} is not torch-fidelity's Inception state dict ({WEIGHTS_NAME}): "
                             f"{str(e).splitlines()[0]}") from e
        self.batch_size = int(batch_size)
        self._spatial: torch.Tensor | None = None
        self.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, args, output) -> None:
        self._spatial = output

    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

    @torch.no_grad()
    def features(self, images: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"pool": (N, 2048), "spatial": (N, 2023), "logits": (N, 1008)}`` float32 on this network's device."""
        x = torch.as_tensor(images)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected uint8 images (N, H, W, 3), got {x.dtype} {tuple(x.shape)}")
        out: dict[str, list[torch.Tensor]] = {"pool": [], "spatial": [], "logits": []}
        for batch in x.split(self.batch_size):
            batch = batch.to(self.device).permute(0, 3, 1, 2)
            with ieee_fp32():
                pool, logits = self(batch)
            out["pool"].append(pool)
            out["spatial"].append(spatial_features(self._spatial))
            out["logits"].append(logits)
            self._spatial = None
        if not len(x):
            return {"pool": torch.zeros(0, POOL_DIM, device=self.device),
                    "spatial": torch.zeros(0, SPATIAL_DIM, device=self.device),
                    "logits": torch.zeros(0, NUM_LOGITS, device=self.device)}
        return {k: torch.cat(v) for k, v in out.items()}


def load_inception(weights: str | Path | None = None, device: str | torch.device = "cpu",
                   batch_size: int = 100) -> InceptionV3:
    """The evaluation Inception on ``device``, weights from ``weights`` (a local
    ``weights-inception-2015-12-05-6726825d.pth``) or, when None, torch hub's cached download."""
    return InceptionV3(resolve_weights(weights), batch_size).to(device)
