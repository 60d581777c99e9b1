"""bigdit: training diffusion transformers (DiT, U-DiT, U-ViT) at scale."""

from bigdit._compat import patch_torchvision_for_cpu_torch

patch_torchvision_for_cpu_torch()

__version__ = "0.1.0"
