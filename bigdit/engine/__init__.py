"""Distributed strategies behind one interface; ``build_strategy`` picks one from the ``strategy`` config.

``STRATEGIES`` maps each strategy's ``name`` (the ``strategy.name`` config value, also recorded in every
checkpoint it writes) to the module and class of the strategy to resume or consolidate that checkpoint with.
"""

from __future__ import annotations

import importlib
from typing import Any

from bigdit.engine.base import RankInfo, Strategy, init_distributed, rank_info_from_env

#: Imported on first use, like DeepSpeed itself: FSDP2's module loads torch.distributed.checkpoint and
#: torch.distributed.tensor, ~1.2 s in every process of a run or tool that never uses them.
STRATEGIES: dict[str, tuple[str, str]] = {
    "ddp": ("bigdit.engine.ddp", "DDPStrategy"),
    "fsdp2": ("bigdit.engine.fsdp", "FSDP2Strategy"),
    "deepspeed": ("bigdit.engine.deepspeed", "DeepSpeedStrategy"),
}


def strategy_class(name: str) -> type[Strategy]:
    """The strategy class registered as ``name``."""
    if name not in STRATEGIES:
        raise KeyError(f"unknown strategy {name!r}; available: {', '.join(sorted(STRATEGIES))}")
    module, cls = STRATEGIES[name]
    return getattr(importlib.import_module(module), cls)


def build_strategy(name: str, precision: str = "fp32", timeout_s: float = 600.0, **options: Any) -> Strategy:
    """Join the job described by the environment and build strategy ``name`` with its ``options``."""
    cls = strategy_class(name)
    info = rank_info_from_env()
    device = init_distributed(info, timeout_s=timeout_s, always=cls.needs_process_group)
    return cls(info, device, precision=precision, **options)


__all__ = ["STRATEGIES", "RankInfo", "Strategy", "build_strategy", "init_distributed", "rank_info_from_env",
           "strategy_class"]
