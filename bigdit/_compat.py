"""Environment fixes applied once, when :mod:`bigdit` is imported.

CPU-only machines can only get a CUDA build of torchvision from PyPI. Its compiled ops fail to load next
to a CPU torch, and ``import torchvision`` then dies in ``_meta_registrations`` with "operator
torchvision::nms does not exist" because it registers fake kernels for ``nms``/``qnms`` unconditionally.
That breaks every library that imports torchvision on the way (open_clip, mosaicml-streaming, parts of
diffusers). Declaring the two op schemas first lets torchvision import; its compiled ops stay
unavailable, which nothing in bigdit uses.
"""

from __future__ import annotations

import importlib.util

import torch

# Kept alive for the life of the process: dropping a torch.library.Library removes its definitions.
_TORCHVISION_SHIM: list[torch.library.Library] = []


def _torchvision_is_cuda_build() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    for root in spec.submodule_search_locations:
        try:
            with open(f"{root}/version.py") as f:
                text = f.read()
        except OSError:
            continue
        return "+cu" in text
    return False


def patch_torchvision_for_cpu_torch() -> bool:
    """Declare torchvision's ``nms``/``qnms`` schemas when torch is a CPU build and torchvision a CUDA build.

    Returns True when the shim was installed. Safe to call more than once; does nothing when torchvision
    is already imported, when torch has CUDA, or when torchvision matches torch.
    """
    import sys

    if _TORCHVISION_SHIM or "torchvision" in sys.modules:
        return False
    if torch.version.cuda is not None or not _torchvision_is_cuda_build():
        return False
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_SHIM.append(lib)
    return True
