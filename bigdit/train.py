"""``bigdit-train``: the one training entry point (a hydra app).

Runs as one process, or as one rank of a job when ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/
``MASTER_PORT``/``LOCAL_RANK`` are set (torchrun, srun, submitit). Rerunning the same command on the
same ``run.dir`` resumes from the latest checkpoint, exactly.

Reproducibility across interruptions and world sizes: the data order is a function of ``(run.seed, epoch)``
and each sample's timestep, noise and label dropout a function of ``(run.seed, step, sample index)``
(:func:`draw_samples`), so no random state has to be checkpointed, the loss of a step does not depend on
how the global batch is split, and each rank draws only its own samples.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image

import bigdit  # noqa: F401  (environment fixes before third-party imports)
from bigdit.batching import BatchPlan, stream_seed
from bigdit.checkpoint import Checkpointer, latest_checkpoint
from bigdit.data import Loader
from bigdit.diffusion import build_objective
from bigdit.diffusion.objective import Objective
from bigdit.ema import EMA, PowerEMA, build_ema
from bigdit.engine import Strategy, build_strategy
from bigdit.engine.base import full_numel
from bigdit.engine.blocks import apply_block_options
from bigdit.evaluation.during_training import TrainingEvaluation
from bigdit.metrics import MetricsLog, MetricsWindow, plot_loss, print_status, status_line
from bigdit.models import build_model
from bigdit.flops import train_flops_per_sample
from bigdit.loggers import Trackers, check_loggers
from bigdit.optim import build_adamw, lr_at
from bigdit.perf import datasheet_tflops, measured_matmul_tflops, peak_memory_gib
from bigdit.preemption import PreemptionGuard
from bigdit.profiling import StepProfiler
from bigdit.repa import HiddenTap, alignment_loss, alignment_weight, attach_projector, check_repa_data, repa_enabled
from bigdit.snapshots import Snapshots, check_snapshot_every
from bigdit.tasks import TaskLoss, check_task_matches_model, task_loss

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
#: run.nonfinite: skip a non-finite step (stop after run.max_skipped in a row), stop at the first, or no check
NONFINITE = ("skip", "stop", "off")


def check_model_matches_data(model_cfg: DictConfig, data: Loader, task: str = "diffusion") -> None:
    """Fail before any compute when the model cannot consume the data (or, for ``task="classifier"``, learn its
    labels). A model without ``num_classes`` (null or 0: an unconditional ADM) ignores the data's labels."""
    c, h, w = data.sample_shape
    if (model_cfg.in_channels, model_cfg.input_size, model_cfg.input_size) != (c, h, w):
        raise ValueError(
            f"model expects {model_cfg.in_channels}x{model_cfg.input_size}x{model_cfg.input_size} inputs but the data "
            f"gives {c}x{h}x{w}: set model.in_channels={c} model.input_size={h}"
        )
    context_dim = model_cfg.get("context_dim")
    if task == "classifier" and not data.num_classes:
        raise ValueError(f"task=classifier learns class labels, but {type(data).__name__} has none: train it on "
                         f"shards of a class-folder input (tools/encode_latents.py input=<folder with class sub-folders>)")
    if context_dim is None:
        if model_cfg.get("num_classes") and data.num_classes > model_cfg.num_classes:
            raise ValueError(f"data has {data.num_classes} classes but model.num_classes={model_cfg.num_classes}")
        return
    if data.text_dim is None:
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


def dropout_probability(cfg: DictConfig) -> float:
    """``cond.caption_dropout_prob`` for a text-to-image model, ``model.class_dropout_prob`` for labels, 0 for a
    classifier (its labels are its targets)."""
    if cfg.task.name == "classifier":
        return 0.0
    if cfg.model.get("context_dim") is None:
        return float(cfg.model.class_dropout_prob)
    prob = OmegaConf.select(cfg, "cond.caption_dropout_prob")
    if prob is None:
        raise ValueError(f"the text-to-image model (model.context_dim={cfg.model.context_dim}) drops captions with "
                         f"cond.caption_dropout_prob: train it with cond=text")
    return float(prob)


def check_run_dir(run_dir: Path) -> None:
    """Fail before any compute when ``run.dir`` cannot be created or written (checkpoints go there); creates
    nothing, so a run refused later leaves no directory behind."""
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    problem = ("is not a directory" if not existing.is_dir() else
               "is not writable" if not os.access(existing, os.W_OK) or os.statvfs(existing).f_flag & os.ST_RDONLY
               else None)
    if problem:
        raise ValueError(f"run.dir={run_dir} cannot be written: {existing} {problem}; choose another run.dir")


def check_resume_compatible(run_dir: Path, cfg: DictConfig) -> None:
    """A run directory holds one model: refuse to resume it with a different model, diffusion or REPA setup."""
    saved_path = run_dir / "config.yaml"
    if latest_checkpoint(run_dir / "checkpoints") is None or not saved_path.is_file():
        return
    saved = OmegaConf.to_container(OmegaConf.load(saved_path), resolve=True)
    for section in ("model", "diffusion", "repa"):
        if section == "repa" and section not in saved:  # runs from before REPA: none
            saved[section] = {"enabled": False}
        now = OmegaConf.to_container(cfg[section], resolve=True)
        # a switch added after the run was saved (e.g. model.qk_norm) reads as off in the older config
        was = {**{k: v for k, v in now.items() if v in (False, None)}, **saved.get(section, {})}
        if was != now:
            raise ValueError(
                f"{run_dir} was trained with {section}={saved.get(section)} but this command asks for {now}; "
                f"use a new run.dir or the original settings"
            )
    saved_ema, ema = saved.get("ema", {}).get("name", "ema"), cfg.ema.get("name", "ema")
    if saved_ema != ema:
        raise ValueError(f"{run_dir} was trained with ema={saved_ema} but this command asks for ema={ema}; "
                         f"use a new run.dir or ema={saved_ema}")


@dataclass(frozen=True)
class SampleDraws:
    """The random draws of a micro-batch's samples: time uniforms, noise and conditioning dropout."""

    #: uniform in [0, 1) per sample: the diffusion maps it to the sample's timestep
    u: torch.Tensor
    noise: torch.Tensor
    #: 1 where the sample's label (or caption) is dropped for guidance
    drop: torch.Tensor


def draw_samples(seed: int, step: int, span: slice, shape, drop_prob: float, device: torch.device) -> SampleDraws:
    """The draws of the global batch's samples ``span`` at ``step``, each from its own counter-based stream.

    Sample ``i``'s draws are a function of ``(seed, step, i)`` alone: the loss of a step does not depend on how
    the global batch is split over ranks and micro-batches, nothing random is checkpointed, and a rank draws only
    its own samples (its cost does not grow with the number of ranks).
    """
    u, noise, drop = [], [], []
    for i in range(span.start, span.stop):
        g = torch.Generator(device=device).manual_seed(stream_seed(seed, step, i, 1))
        u.append(torch.rand(1, generator=g, device=device))
        drop.append(torch.rand(1, generator=g, device=device) < drop_prob)
        noise.append(torch.randn(shape, generator=g, device=device))
    return SampleDraws(torch.cat(u), torch.stack(noise), torch.cat(drop).long())


def peak_device_tflops(device: torch.device, precision: str) -> float:
    """MFU denominator: the datasheet peak when the GPU is known, else a measured matmul peak."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return datasheet_tflops(device, dtype) or measured_matmul_tflops(device, dtype)


@dataclass
class Session:
    """What :func:`setup` builds for the loop: the components and the counters restored from the checkpoint."""

    cfg: DictConfig
    strategy: Strategy
    plan: BatchPlan
    data: Loader
    #: the diffusion kind's time draw, noised input and loss (cfg.diffusion)
    objective: Objective
    ema: EMA | PowerEMA
    ckpt: Checkpointer
    #: the cached empty-prompt CLIP tokens on the device (text-to-image), None for class labels
    empty_context: torch.Tensor | None
    #: label dropout (to the model's null label) or caption dropout (to the empty prompt), for guidance
    drop_prob: float
    #: the micro-batch loss of ``task.name`` (bigdit.tasks)
    loss_fn: TaskLoss
    step: int = 0
    nimg: int = 0
    #: optimizer steps skipped for a non-finite loss or gradient, over the whole run (checkpointed)
    skipped_steps: int = 0
    #: consecutive skipped steps up to now (a fresh process starts at 0)
    skipped_in_a_row: int = 0
    #: REPA's projected hidden state (repa.enabled), None without REPA
    repa: HiddenTap | None = None

    def checkpoint(self) -> None:
        """Write a checkpoint of the current step (collective)."""
        extra = {"data": self.data.state_dict(), "step": self.step, "nimg": self.nimg,
                 "skipped_steps": self.skipped_steps, "config": OmegaConf.to_container(self.cfg, resolve=True)}
        self.ckpt.save(self.step, extra, self.ema.state_dict(), self.ema.extra_states())

    def count_skip(self, applied: bool) -> str | None:
        """Count a step whose update was (not) applied; return why training must stop now, or None. The same on
        every rank: the skip decision comes from the global gradient norm."""
        self.skipped_steps += not applied
        self.skipped_in_a_row = 0 if applied else self.skipped_in_a_row + 1
        run = self.cfg.run
        if applied or (run.nonfinite == "skip" and self.skipped_in_a_row < run.max_skipped):
            return None
        return (f"step {self.step}: {self.skipped_in_a_row} consecutive step(s) with a non-finite loss or gradient "
                f"(run.nonfinite={run.nonfinite}, run.max_skipped={run.max_skipped}), their updates skipped; stopped "
                f"with the last good weights checkpointed at step {self.step} in {run.dir}/checkpoints."
                f" Lower optim.lr, "
                f"set optim.grad_clip, check the data (shards with inf/NaN values), or go back to an earlier "
                f"checkpoint with run.resume_step=N")


def build_loader(cfg: DictConfig, plan: BatchPlan, rank: int) -> Loader:
    """This rank's ``cfg.data`` loader; with REPA it also delivers the shards' REPA features (``repa_feats``)."""
    make = instantiate(cfg.data, _partial_=True)  # _partial_ keeps hydra from turning the BatchPlan into a config
    extra = {}
    if repa_enabled(cfg):
        if "repa_feats" not in inspect.signature(make.func).parameters:
            raise ValueError(f"REPA aligns to features stored in shards, but data={cfg.data._target_} reads "
                             f"none: encode with tools/encode_latents.py repa_encoder={cfg.repa.encoder} and train "
                             f"with data=wds or data=mds on its output (or repa=none)")
        extra["repa_feats"] = True
    return make(plan=plan, rank=rank, seed=cfg.run.seed, **extra)


def setup(cfg: DictConfig) -> Session:
    """Everything before the loop: strategy, data, model, optimizer, EMA, resume."""
    if cfg.run.precision not in ("fp32", "bf16"):
        raise ValueError(f"run.precision must be fp32 or bf16, got {cfg.run.precision!r}")
    if cfg.run.nonfinite not in NONFINITE or cfg.run.max_skipped < 1:
        raise ValueError(f"run.nonfinite must be one of {', '.join(NONFINITE)} (got {cfg.run.nonfinite!r}) and "
                         f"run.max_skipped >= 1 (got {cfg.run.max_skipped})")
    loss_fn = task_loss(cfg.task.name)
    if cfg.task.name == "classifier" and (cfg.eval.every or cfg.eval.grid_every):
        raise ValueError("eval=fid samples the model being trained, and task=classifier trains no denoiser: use "
                         "eval=none (guide a denoiser with it in tools/sample.py classifier=<run dir>)")
    check_loggers(cfg.run.loggers)
    objective = build_objective(OmegaConf.to_container(cfg.diffusion, resolve=True),
                                bool(cfg.model.get("learn_sigma", False)))
    strategy = build_strategy(**cfg.strategy, precision=cfg.run.precision)
    plan = BatchPlan.from_config(cfg.run.global_batch, cfg.run.micro_batch, strategy.info.world_size)
    check_snapshot_every(cfg.ema, plan.global_batch)
    run_dir = Path(cfg.run.dir)
    check_run_dir(run_dir)
    check_resume_compatible(run_dir, cfg)
    data = build_loader(cfg, plan, strategy.info.rank)
    check_model_matches_data(cfg.model, data, cfg.task.name)

    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    model = build_model(**cfg.model)
    check_task_matches_model(cfg.task.name, model, objective)
    tap = None
    if repa_enabled(cfg):  # the projector joins the model before any strategy wraps it
        check_repa_data(cfg.repa, data.repa, attach_projector(model, cfg.repa), cfg.data._target_)
        tap = HiddenTap(model, int(cfg.repa.depth))
    model = apply_block_options(model, cfg.run.activation_checkpointing, cfg.run.compile)
    strategy.setup(model, lambda params: build_adamw(params, cfg.optim.lr, cfg.optim.weight_decay,
                                                     cfg.optim.betas, cfg.optim.eps, cfg.optim.fused),
                   plan=plan, grad_clip=cfg.optim.grad_clip)
    text = cfg.model.get("context_dim") is not None
    s = Session(cfg, strategy, plan, data, objective, build_ema(cfg.ema, strategy.ema_targets()),
                Checkpointer(run_dir / "checkpoints", strategy, cfg.run.keep_ckpts),
                data.empty_context.to(strategy.device) if text else None, dropout_probability(cfg), loss_fn, repa=tap)
    restored = s.ckpt.load_latest(cfg.run.resume_step)
    if restored is not None:
        extra, ema_state = restored
        s.ema.load_state_dict(ema_state, s.ckpt.load_extra_emas(list(s.ema.extra_states()), cfg.run.resume_step))
        data.load_state_dict(extra["data"])
        s.step, s.nimg, s.skipped_steps = extra["step"], extra["nimg"], extra.get("skipped_steps", 0)
    if strategy.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        n_params = sum(full_numel(p) for p in strategy.module.parameters())
        print_status(f"{cfg.model.name}: {n_params:,} parameters | {strategy.info.world_size} rank(s) on "
                     f"{strategy.device.type} | global batch {plan.global_batch} = {plan.world_size} x "
                     f"{plan.accum_steps} x {plan.micro_batch} | "
                     + (f"resumed at step {s.step}" if s.step else "from scratch"))
        mib = {k: f"{v / 2**20:.1f}" for k, v in strategy.state_bytes().items()}
        print_status(f"{cfg.strategy.name} state per rank (MiB): " + ", ".join(f"{k} {v}" for k, v in mib.items()))
    return s


def alignment(s: Session, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """REPA's alignment loss of a micro-batch: the projected hidden state of its forward against its features."""
    target = batch["repa_feats"].to(s.strategy.device, non_blocking=True).float()
    return alignment_loss(s.repa.take().float(), target).mean()


def train_step(s: Session, step: int) -> tuple[torch.Tensor, torch.Tensor, float, bool, dict[str, torch.Tensor]]:
    """Optimizer step ``step`` over this rank's micro-batches, then the EMA update. Returns this rank's mean
    (diffusion) loss and the global gradient norm as device tensors, the learning rate used, whether the update
    was applied (False: a non-finite loss or gradient, the optimizer and EMA updates skipped on every rank), and
    further per-rank losses by name (REPA's ``repa_loss``)."""
    cfg, strategy, plan = s.cfg, s.strategy, s.plan
    device, rank = strategy.device, strategy.info.rank
    lr = lr_at(step, cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.schedule, cfg.run.steps, cfg.optim.min_lr)
    for group in strategy.optimizer.param_groups:
        group["lr"] = lr
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.run.precision == "bf16")
    mean_loss, mean_align = torch.zeros((), device=device), torch.zeros((), device=device)
    # After repa.stop_step the weight is 0 but the term stays in the graph: every strategy then still sees the
    # projector's parameters used (DDP would stop on unused ones), and repa_loss keeps being logged.
    weight = alignment_weight(step, cfg.repa.coeff, cfg.repa.stop_step) if s.repa else 0.0
    def forward(*args, **kwargs) -> torch.Tensor:  # the network under autocast; the task's loss stays fp32
        with autocast:
            return strategy.model(*args, **kwargs)

    for micro, batch in enumerate(s.data.micro_batches(step)):
        draws = draw_samples(cfg.run.seed, step, plan.span(rank, micro), s.data.sample_shape, s.drop_prob, device)
        x0 = batch["x"].to(device, non_blocking=True)
        y = conditioning(batch, draws.drop, s.empty_context, device)
        t = s.objective.time(draws.u)
        with strategy.no_sync(micro < plan.accum_steps - 1), s.repa.capture() if s.repa else contextlib.nullcontext():
            loss = s.loss_fn(s.objective, forward, x0, y, t, draws.noise, draws.drop)
        align = alignment(s, batch) if s.repa else None
        strategy.backward((loss if align is None else loss + weight * align) / plan.accum_steps)
        mean_loss += loss.detach() / plan.accum_steps
        if align is not None:
            mean_align += align.detach() / plan.accum_steps
    grad_norm, applied = strategy.optimizer_step(cfg.optim.grad_clip, skip_nonfinite=cfg.run.nonfinite != "off")
    if applied:
        s.ema.update([tensor for _, tensor in strategy.ema_targets()], step + 1)
    return mean_loss, grad_norm, lr, applied, ({"repa_loss": mean_align} if s.repa else {})


def log_record(s: Session, window: dict[str, float], lr: float, flops_per_img: float | None,
               peak_tflops: float | None) -> dict[str, float]:
    """The metrics.jsonl record of a log step from the metrics window's means."""
    img_per_s = s.plan.global_batch * window["steps"] / window["seconds"]
    record = {"step": s.step, "nimg": s.nimg, "loss": window["loss"], "lr": lr, "grad_norm": window["grad_norm"],
              "img_per_s": img_per_s, "step_time_s": window["seconds"] / window["steps"],
              "peak_mem_gib": peak_memory_gib(s.strategy.device), "bad_samples": window["bad_samples"],
              "skipped_steps": s.skipped_steps, **window["extra"]}
    if flops_per_img:
        record["tflops_per_gpu"] = img_per_s * flops_per_img / s.strategy.info.world_size / 1e12
        record["mfu"] = record["tflops_per_gpu"] / peak_tflops
    return record


def train(cfg: DictConfig) -> None:
    """Train ``cfg.model`` on ``cfg.data`` until ``cfg.run.steps`` optimizer steps are done."""
    s = setup(cfg)
    run, strategy = cfg.run, s.strategy
    log = MetricsLog(Path(run.dir) / "metrics.jsonl", s.step) if strategy.is_main else None
    trackers = Trackers(run.loggers if strategy.is_main else [], run.dir, OmegaConf.to_container(cfg, resolve=True),
                        s.step, OmegaConf.to_container(run.wandb, resolve=True))
    window = MetricsWindow(strategy.device, strategy.all_reduce_mean, strategy.info.world_size,
                           extra=("repa_loss",) if s.repa else ())
    flops_per_img = train_flops_per_sample(strategy.module)  # None for backbones without a formula
    peak_tflops = (run.peak_tflops or peak_device_tflops(strategy.device, run.precision)) if flops_per_img else None
    evaluation = (TrainingEvaluation(cfg, strategy, s.ema, s.objective.diffusion, on_grid=trackers.log_image)
                  if cfg.eval.every or cfg.eval.grid_every else None)
    profiler = StepProfiler(run.profile and strategy.is_main, Path(run.dir) / "profile", strategy.device)
    guard = PreemptionGuard.for_strategy(strategy, run.dir)  # inert unless started by bigdit.launch (SLURM/submitit)
    snapshots = (Snapshots(run.dir, strategy, s.ema, cfg.ema.snapshot_every, s.plan.global_batch, run.steps)
                 if isinstance(s.ema, PowerEMA) else None)

    while s.step < run.steps:
        loss, grad_norm, lr, applied, extra = train_step(s, s.step)
        window.add(loss, grad_norm, applied, extra)
        s.step, s.nimg = s.step + 1, s.nimg + s.plan.global_batch
        halt = s.count_skip(applied)  # why non-finite steps stop the run now, or None
        profiler.step()
        if snapshots is not None:
            snapshots.maybe_write(s.step, s.nimg)
        evaluated = evaluation(s.step, run.dir) if evaluation and evaluation.due(s.step) else {}
        window.exclude(evaluated.get("eval_s", 0.0))  # throughput counts training only
        if s.step % run.log_every == 0 or s.step == run.steps or halt:
            record = log_record(s, window.read(s.data.bad_samples), lr, flops_per_img, peak_tflops) | evaluated
            if log is not None:
                log.write(record)
                trackers.log(record)
                print_status(status_line(record, run.steps))
        stop = guard.stop_requested(s.step)  # preemption/timeout signal on any rank (all ranks get the same answer)
        if s.step % run.ckpt_every == 0 or s.step == run.steps or stop or halt:
            s.checkpoint()
        if halt:
            strategy.teardown()
            raise SystemExit(halt)
        if stop and s.step < run.steps:
            guard.stop(s.step, run.dir)  # requeue the job (or exit with how to resume); the next one resumes here

    profiler.close()
    if strategy.is_main:
        plot = plot_loss(Path(run.dir) / "metrics.jsonl", Path(run.dir) / "loss.png")
        trackers.log_image("loss_plot", np.asarray(Image.open(plot).convert("RGB")), s.step)
        print_status(f"done: {run.dir} (config.yaml, metrics.jsonl, loss.png, checkpoints/)")
    trackers.close()
    strategy.teardown()


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base=None)
def main(cfg: DictConfig) -> None:
    """Console script ``bigdit-train``: ``bigdit-train experiment=<preset> key=value ...``."""
    train(cfg)


if __name__ == "__main__":
    main()
