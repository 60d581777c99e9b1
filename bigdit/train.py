"""``bigdit-train``: the one training entry point (a hydra app).

Runs as one process, or as one rank of a job when ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/
``MASTER_PORT``/``LOCAL_RANK`` are set (torchrun, srun, submitit). Rerunning the same command on the
same ``run.dir`` resumes from the latest checkpoint, exactly.

Reproducibility across interruptions and world sizes: the data, timesteps, noise and label dropout of
a step are drawn for the whole global batch from generators seeded by ``(run.seed, step)`` and then
sliced per rank and micro-batch, so no random state has to be checkpointed and the loss of a step does
not depend on how the global batch is split.
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import bigdit  # noqa: F401  (environment fixes before third-party imports)
from bigdit.checkpoint import Checkpointer, latest_checkpoint
from bigdit.batching import BatchPlan, stream_seed
from bigdit.data import Loader
from bigdit.diffusion import make_schedule, q_sample, training_losses
from bigdit.ema import EMA
from bigdit.engine import build_strategy
from bigdit.engine.base import full_numel
from bigdit.engine.blocks import apply_block_options
from bigdit.metrics import MetricsLog, plot_loss, print_status, status_line
from bigdit.models import build_model
from bigdit.optim import build_adamw, lr_at
from bigdit.preemption import PreemptionGuard
from bigdit.profiling import StepProfiler
from bigdit.perf import datasheet_tflops, measured_matmul_tflops, peak_memory_gib
from bigdit.flops import train_flops_per_sample

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def check_model_matches_data(model_cfg: DictConfig, data: Loader) -> None:
    """Fail before any compute when the model cannot consume the data."""
    c, h, w = data.sample_shape
    if (model_cfg.in_channels, model_cfg.input_size, model_cfg.input_size) != (c, h, w):
        raise ValueError(
            f"model expects {model_cfg.in_channels}x{model_cfg.input_size}x{model_cfg.input_size} inputs but the data "
            f"gives {c}x{h}x{w}: set model.in_channels={c} model.input_size={h}"
        )
    context_dim = model_cfg.get("context_dim")
    if context_dim is None:
        if data.num_classes > (model_cfg.num_classes or 0):
            raise ValueError(f"data has {data.num_classes} classes but model.num_classes={model_cfg.num_classes}")
        return
    text_dim = getattr(data, "text_dim", None)
    if text_dim is None:
        raise ValueError(f"the text-to-image model (model.context_dim={context_dim}) needs CLIP token embeddings, but "
                         f"{type(data).__name__} has none: cache them with tools/cache_text.py and train with data=wds "
                         f"or data=mds on its output")
    tokens = tuple(data.empty_context.shape)
    if (model_cfg.get("context_tokens", 77), context_dim) != tokens:
        raise ValueError(f"the shards hold {tokens[0]}x{tokens[1]} CLIP tokens but the model expects "
                         f"{model_cfg.get('context_tokens', 77)}x{context_dim}: set model.context_tokens={tokens[0]} "
                         f"model.context_dim={tokens[1]}")


def conditioning(batch: dict[str, torch.Tensor], drop: torch.Tensor, empty_context: torch.Tensor | None,
                 device: torch.device) -> torch.Tensor:
    """The model's ``y``: class labels (the model drops those in ``drop`` to its null label), or CLIP tokens
    with the dropped captions replaced by the empty-prompt embedding (what guidance samples with)."""
    if empty_context is None:
        return batch["y"].to(device, non_blocking=True)
    tokens = batch["clip_tokens"].to(device, non_blocking=True).float()
    return torch.where(drop.bool()[:, None, None], empty_context, tokens)


def check_resume_compatible(run_dir: Path, cfg: DictConfig) -> None:
    """A run directory holds one model: refuse to resume it with a different model or diffusion."""
    saved_path = run_dir / "config.yaml"
    if latest_checkpoint(run_dir / "checkpoints") is None or not saved_path.is_file():
        return
    saved = OmegaConf.to_container(OmegaConf.load(saved_path), resolve=True)
    for section in ("model", "diffusion"):
        now = OmegaConf.to_container(cfg[section], resolve=True)
        if saved.get(section) != now:
            raise ValueError(
                f"{run_dir} was trained with {section}={saved.get(section)} but this command asks for {now}; "
                f"use a new run.dir or the original settings"
            )


class StepDraws:
    """The random draws of one optimizer step for the whole global batch, sliced per rank and micro-batch."""

    def __init__(self, seed: int, step: int, plan: BatchPlan, shape, num_timesteps: int, drop_prob: float, device):
        g = torch.Generator(device=device).manual_seed(stream_seed(seed, step, 1))
        n = plan.global_batch
        self.t = torch.randint(0, num_timesteps, (n,), generator=g, device=device)
        self.noise = torch.randn((n, *shape), generator=g, device=device)
        self.drop = (torch.rand(n, generator=g, device=device) < drop_prob).long()


def peak_device_tflops(device: torch.device, precision: str) -> float:
    """MFU denominator: the datasheet peak when the GPU is known, else a measured matmul peak."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return datasheet_tflops(device, dtype) or measured_matmul_tflops(device, dtype)


def setup(cfg: DictConfig):
    """Everything before the loop: strategy, data, model, optimizer, EMA, resume."""
    if cfg.run.precision not in ("fp32", "bf16"):
        raise ValueError(f"run.precision must be fp32 or bf16, got {cfg.run.precision!r}")
    strategy = build_strategy(**cfg.strategy, precision=cfg.run.precision)
    plan = BatchPlan.from_config(cfg.run.global_batch, cfg.run.micro_batch, strategy.info.world_size)
    run_dir = Path(cfg.run.dir)
    check_resume_compatible(run_dir, cfg)
    # _partial_ keeps hydra from turning the BatchPlan dataclass into a config node.
    data: Loader = instantiate(cfg.data, _partial_=True)(plan=plan, rank=strategy.info.rank, seed=cfg.run.seed)
    check_model_matches_data(cfg.model, data)
    schedule = make_schedule(**cfg.diffusion)

    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    model = apply_block_options(build_model(**cfg.model), cfg.run.activation_checkpointing, cfg.run.compile)
    strategy.setup(model, lambda params: build_adamw(params, cfg.optim.lr, cfg.optim.weight_decay,
                                                     cfg.optim.betas, cfg.optim.eps, cfg.optim.fused),
                   plan=plan, grad_clip=cfg.optim.grad_clip)
    ema = EMA(strategy.ema_targets(), cfg.ema.decay)

    ckpt = Checkpointer(run_dir / "checkpoints", strategy, cfg.run.keep_ckpts)
    restored = ckpt.load_latest()
    step = nimg = 0
    if restored is not None:
        extra, ema_state = restored
        ema.load_state_dict(ema_state)
        data.load_state_dict(extra["data"])
        step, nimg = extra["step"], extra["nimg"]
    if strategy.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        n_params = sum(full_numel(p) for p in strategy.module.parameters())
        print_status(f"{cfg.model.name}: {n_params:,} parameters | {strategy.info.world_size} rank(s) on "
                     f"{strategy.device.type} | global batch {plan.global_batch} = {plan.world_size} x "
                     f"{plan.accum_steps} x {plan.micro_batch} | "
                     + (f"resumed at step {step}" if step else "from scratch"))
        mib = {k: f"{v / 2**20:.1f}" for k, v in strategy.state_bytes().items()}
        print_status(f"{cfg.strategy.name} state per rank (MiB): " + ", ".join(f"{k} {v}" for k, v in mib.items()))
    return strategy, plan, data, schedule, ema, ckpt, step, nimg


def train(cfg: DictConfig) -> None:
    """Train ``cfg.model`` on ``cfg.data`` until ``cfg.run.steps`` optimizer steps are done."""
    strategy, plan, data, schedule, ema, ckpt, step, nimg = setup(cfg)
    run, device, rank = cfg.run, strategy.device, strategy.info.rank
    log = MetricsLog(Path(run.dir) / "metrics.jsonl", step) if strategy.is_main else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.precision == "bf16")
    flops_per_img = train_flops_per_sample(strategy.module)  # None for backbones without a formula yet
    peak_tflops = (run.peak_tflops or peak_device_tflops(device, run.precision)) if flops_per_img else None
    drop_prob = float(cfg.model.class_dropout_prob)  # label or caption dropout, for classifier-free guidance
    empty_context = None if cfg.model.get("context_dim") is None else data.empty_context.to(device)
    sums = torch.zeros(3, device=device)  # loss, grad-norm, steps since the last log
    t_window = time.perf_counter()
    profiler = StepProfiler(run.profile and strategy.is_main, Path(run.dir) / "profile", device)
    guard = PreemptionGuard.for_strategy(strategy, run.dir)  # inert unless started by bigdit.launch (SLURM/submitit)

    def checkpoint(at_step: int) -> None:
        container = OmegaConf.to_container(cfg, resolve=True)
        ckpt.save(at_step, {"data": data.state_dict(), "step": at_step, "nimg": nimg, "config": container},
                  ema.state_dict())

    while step < run.steps:
        lr = lr_at(step, cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.schedule, run.steps, cfg.optim.min_lr)
        for group in strategy.optimizer.param_groups:
            group["lr"] = lr
        draws = StepDraws(run.seed, step, plan, data.sample_shape, schedule.num_timesteps, drop_prob, device)
        for micro, batch in enumerate(data.micro_batches(step)):
            span = plan.span(rank, micro)
            x0 = batch["x"].to(device, non_blocking=True)
            y = conditioning(batch, draws.drop[span], empty_context, device)
            t, noise = draws.t[span], draws.noise[span]
            xt = q_sample(schedule, x0, t, noise)
            with strategy.no_sync(micro < plan.accum_steps - 1), autocast:
                out = strategy.model(xt, t, y, force_drop_ids=draws.drop[span])
            loss = training_losses(schedule, out.float(), x0, xt, t, noise, cfg.model.learn_sigma)["loss"].mean()
            strategy.backward(loss / plan.accum_steps)
            sums[0] += loss.detach() / plan.accum_steps
        sums[1] += strategy.optimizer_step(cfg.optim.grad_clip)
        sums[2] += 1
        ema.update([tensor for _, tensor in strategy.ema_targets()])
        step, nimg = step + 1, nimg + plan.global_batch
        profiler.step()

        if step % run.log_every == 0 or step == run.steps:
            loss_sum, grad_sum, n = strategy.all_reduce_mean(sums.clone()).tolist()
            elapsed = time.perf_counter() - t_window
            img_per_s = plan.global_batch * n / elapsed
            record = {"step": step, "nimg": nimg, "loss": loss_sum / n, "lr": lr, "grad_norm": grad_sum / n,
                      "img_per_s": img_per_s, "step_time_s": elapsed / n, "peak_mem_gib": peak_memory_gib(device)}
            if hasattr(data, "bad_samples"):  # streaming loaders with data.skip_bad_samples=true
                bad = torch.tensor(float(data.bad_samples), device=device)
                record["bad_samples"] = int(strategy.all_reduce_mean(bad).item() * strategy.info.world_size)
            if flops_per_img:
                record["tflops_per_gpu"] = img_per_s * flops_per_img / strategy.info.world_size / 1e12
                record["mfu"] = record["tflops_per_gpu"] / peak_tflops
            if log is not None:
                log.write(record)
                print_status(status_line(record, run.steps))
            sums.zero_()
            t_window = time.perf_counter()
        stop = guard.stop_requested(step)  # preemption/timeout signal on any rank (all ranks get the same answer)
        if step % run.ckpt_every == 0 or step == run.steps or stop:
            checkpoint(step)
        if stop and step < run.steps:
            guard.stop(step, run.dir)  # requeue the job (or exit with how to resume); the next one resumes here

    profiler.close()
    if strategy.is_main:
        plot_loss(Path(run.dir) / "metrics.jsonl", Path(run.dir) / "loss.png")
        print_status(f"done: {run.dir} (config.yaml, metrics.jsonl, loss.png, checkpoints/)")
    strategy.teardown()


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base=None)
def main(cfg: DictConfig) -> None:
    """Console script ``bigdit-train``: ``bigdit-train experiment=<preset> key=value ...``."""
    train(cfg)


if __name__ == "__main__":
    main()
