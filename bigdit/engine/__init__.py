"""Distributed strategies behind one interface; ``build_strategy`` picks one from the ``strategy`` config."""

from __future__ import annotations

from typing import Any

from bigdit.engine.base import RankInfo, Strategy, init_distributed, rank_info_from_env
from bigdit.engine.ddp import DDPStrategy
from bigdit.engine.deepspeed import DeepSpeedStrategy
from bigdit.engine.fsdp import FSDP2Strategy

STRATEGIES = {"ddp": DDPStrategy, "fsdp2": FSDP2Strategy, "deepspeed": DeepSpeedStrategy}


def build_strategy(name: str, precision: str = "fp32", timeout_s: float = 600.0, **options: Any) -> Strategy:
    """Join the job described by the environment and build strategy ``name`` with its ``options``."""
    if name not in STRATEGIES:
        raise KeyError(f"unknown strategy {name!r}; available: {', '.join(sorted(STRATEGIES))}")
    cls = STRATEGIES[name]
    info = rank_info_from_env()
    device = init_distributed(info, timeout_s=timeout_s, always=cls.needs_process_group)
    return cls(info, device, precision=precision, **options)


__all__ = ["STRATEGIES", "RankInfo", "Strategy", "build_strategy", "init_distributed", "rank_info_from_env"]
