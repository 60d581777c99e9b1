"""Run under torchrun by tests/test_scaling.py: payload bytes of the collectives one training step sends.

DDP's gradient all-reduces are counted with a comm hook; FSDP2's all-gathers and reduce-scatters by
wrapping the torch.distributed functions it calls. Prints one JSON line on rank 0.
"""

import json
import sys

import torch
import torch.distributed as dist

import bigdit  # noqa: F401
from bigdit.engine import build_strategy
from bigdit.models import build_model

sent: dict[str, int] = {"all_reduce": 0, "all_gather": 0, "reduce_scatter": 0}


def counting(name, fn):
    """Wrap ``fn(output, input, ...)``: count the full (unsharded) payload of the collective."""

    def wrapped(*args, **kwargs):
        output = args[0] if args else kwargs["output" if "output" in kwargs else "output_tensor"]
        inp = args[1] if len(args) > 1 else kwargs["input" if "input" in kwargs else "input_tensor"]
        full = output if name == "all_gather" else inp
        sent[name] += full.numel() * full.element_size()
        return fn(*args, **kwargs)

    return wrapped


def main(strategy_name: str) -> None:
    strategy = build_strategy(strategy_name)
    torch.manual_seed(0)
    model = build_model("DiT-S/2", input_size=8, in_channels=4, num_classes=10, depth=2)
    strategy.setup(model, lambda ps: torch.optim.AdamW(ps, lr=1e-4))
    if strategy_name == "ddp":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def hook(state, bucket):
            sent["all_reduce"] += bucket.buffer().numel() * bucket.buffer().element_size()
            return allreduce_hook(state, bucket)

        strategy.model.register_comm_hook(None, hook)
    else:
        # FSDP2 calls these through the torch.distributed module at each use, so wrapping them counts its traffic.
        dist.all_gather_single = counting("all_gather", dist.all_gather_single)
        dist.reduce_scatter_single = counting("reduce_scatter", dist.reduce_scatter_single)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([3, 4])
    strategy.model(x, t, y).square().mean().backward()
    strategy.optimizer_step(None)
    params = sum(p.numel() for p in strategy.module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in strategy.module.parameters() if not p.requires_grad)
    if strategy.is_main:
        print(json.dumps({"sent": sent, "trainable": params, "frozen": frozen}))
    strategy.teardown()


if __name__ == "__main__":
    main(sys.argv[1])
