"""Launching ``bigdit-train`` as a submitit job: one task per GPU on SLURM, or N local processes.

``launchers/submit.py`` composes ``configs/submit.yaml`` (the training config plus the ``launcher`` group)
and calls :func:`submit`. Each task of the job runs :class:`TrainTask`, which exports the
torch.distributed environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR`` = the job's first node, ``MASTER_PORT`` derived from the job id) and calls the same
:func:`bigdit.train.train` as ``bigdit-train``: everything else (resume, checkpoints, metrics) is the
training entry point's.

One run directory per run: ``run.dir`` holds ``config.yaml`` (training config), ``launcher.yaml``,
``metrics.jsonl``, ``checkpoints/`` and ``submitit/`` (the sbatch script, pickled task and per-rank logs
``<job>_<rank>_log.{out,err}``). Preemption and time limits: see :mod:`bigdit.preemption`.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import traceback
from pathlib import Path
from typing import Any

import submitit
from omegaconf import DictConfig, OmegaConf

LAUNCHERS = ("slurm", "local")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def job_master_port(job_id: str, restarts: int = 0) -> int:
    """A port every task of a job derives alike from the job id, outside the usual ephemeral range.

    It moves with each requeue so a new allocation never meets the previous one's socket in TIME_WAIT.
    """
    digits = "".join(c for c in str(job_id) if c.isdigit()) or "0"
    return 20000 + (int(digits) + 101 * restarts) % 20000


class TrainTask:
    """The picklable callable every task of the job runs: one rank of ``bigdit-train``.

    ``cfg`` is the resolved training config (a plain dict, ``run.dir`` absolute). Rerunning it (a requeued
    allocation) resumes from ``run.dir/checkpoints/latest``.
    """

    def __init__(self, cfg: dict[str, Any], max_requeues: int, master_port: int | None = None):
        self.cfg = cfg
        self.max_requeues = max_requeues
        self.master_port = master_port

    def distributed_env(self) -> dict[str, str]:
        """The torch.distributed variables of this task, from submitit's view of the job."""
        env = submitit.JobEnvironment()
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        port = self.master_port or job_master_port(env.job_id, restarts)
        return {
            "RANK": str(env.global_rank),
            "WORLD_SIZE": str(env.num_tasks),
            "LOCAL_RANK": str(env.local_rank),
            "LOCAL_WORLD_SIZE": str(env.num_tasks // max(1, env.num_nodes)),
            "MASTER_ADDR": env.hostnames[0],
            "MASTER_PORT": str(port),
        }

    def __call__(self) -> str:
        from bigdit import preemption
        from bigdit.train import train

        os.environ.update(self.distributed_env())
        rank, world = os.environ["RANK"], os.environ["WORLD_SIZE"]
        where = f"rank {rank}/{world} on {socket.gethostname()}"
        if os.environ.get("SLURM_JOB_ID"):
            where += f" (SLURM job {os.environ['SLURM_JOB_ID']}, restart {os.environ.get('SLURM_RESTART_COUNT', 0)})"
        # Replaces submitit's handler, which would requeue at once from rank 0 without a collective save.
        sig = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))
        preemption.install((sig,), self.max_requeues)
        print(f"[bigdit] {where}: MASTER_ADDR={os.environ['MASTER_ADDR']} MASTER_PORT={os.environ['MASTER_PORT']}",
              flush=True)
        try:
            train(OmegaConf.create(self.cfg))
        except Exception as err:
            signal.signal(sig, signal.SIG_IGN)
            # Name the rank and host: with many tasks, the first failing one is what matters. A dead or hung
            # peer surfaces here as a collective timeout (strategy.timeout_s) or a connection error.
            hint = ""
            if any(k in str(err).lower() for k in ("timeout", "timed out", "connection", "broken pipe", "gloo", "nccl")):
                hint = (" -- a collective failed: another rank probably died or hangs; see the other ranks' logs in "
                        f"{Path(self.cfg['run']['dir']) / 'submitit'}")
            print(f"[bigdit] {where} failed: {type(err).__name__}: {err}{hint}", file=sys.stderr, flush=True)
            traceback.print_exc()
            sys.stderr.flush()
            raise RuntimeError(f"{where} failed: {type(err).__name__}: {err}{hint}") from err
        # Training is over: a signal arriving now (e.g. the pre-timeout one of a job that just made it) must not
        # kill the exiting process and turn a finished job into a failed one.
        signal.signal(sig, signal.SIG_IGN)
        return self.cfg["run"]["dir"]

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Used only if submitit's own handler fires before ours is installed: requeue as is; the rerun
        resumes from the last periodic checkpoint."""
        return submitit.helpers.DelayedSubmission(TrainTask(self.cfg, self.max_requeues, self.master_port))


def tasks_per_node(launcher: DictConfig) -> int:
    """One task per GPU on GPU nodes; ``launcher.tasks_per_node`` when set (CPU jobs)."""
    tasks = launcher.get("tasks_per_node") or launcher.get("gpus_per_node") or 1
    return int(tasks)


def make_executor(launcher: DictConfig, folder: Path, job_name: str) -> submitit.Executor:
    """The submitit executor for ``launcher`` (the ``launcher`` config group)."""
    if launcher.name not in LAUNCHERS:
        raise ValueError(f"unknown launcher {launcher.name!r}; use launcher=slurm or launcher=local")
    ntasks = tasks_per_node(launcher)
    if launcher.name == "local":
        ex = submitit.LocalExecutor(folder=folder, max_num_timeout=int(launcher.max_requeues))
        ex.update_parameters(tasks_per_node=ntasks, timeout_min=int(launcher.time_min),
                             signal_delay_s=int(launcher.signal_delay_s))
        return ex
    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=int(launcher.max_requeues))
    extra = {"requeue": True, **OmegaConf.to_container(launcher.sbatch_extra, resolve=True)}
    params: dict[str, Any] = dict(
        job_name=job_name,
        nodes=int(launcher.nodes),
        ntasks_per_node=ntasks,
        time=int(launcher.time_min),
        signal_delay_s=int(launcher.signal_delay_s),
        setup=list(launcher.setup),
        additional_parameters=extra,
        # A task that exits with an error ends the whole step at once instead of leaving the others waiting
        # in a collective until its timeout.
        srun_args=["--kill-on-bad-exit=1", *launcher.srun_args],
        stderr_to_stdout=False,
    )
    if launcher.gpus_per_node:
        params["gpus_per_node"] = int(launcher.gpus_per_node)
    optional = {"partition": "partition", "account": "account", "qos": "qos", "cpus_per_task": "cpus_per_task",
                "mem": "mem", "constraint": "constraint"}
    for key, param in optional.items():
        if launcher.get(key) not in (None, ""):
            params[param] = launcher[key] if key != "cpus_per_task" else int(launcher[key])
    if launcher.get("exclusive"):
        params["exclusive"] = True
    ex.update_parameters(**params)
    return ex


def sbatch_script(executor: submitit.SlurmExecutor) -> str:
    """The sbatch script ``executor`` would submit (the command is submitit's, as in a real submission)."""
    return executor._make_submission_file_text(executor._submitit_command_str, "dry_run")


def submit(cfg: DictConfig) -> int:
    """Submit (or with ``launcher.dry_run``, print) the training job described by ``cfg``; returns an exit code."""
    launcher = cfg.launcher
    run_dir = Path(cfg.run.dir).resolve()
    train_cfg = OmegaConf.to_container(cfg, resolve=True)
    launch_cfg = train_cfg.pop("launcher")
    train_cfg["run"]["dir"] = str(run_dir)
    folder = run_dir / "submitit"
    executor = make_executor(launcher, folder, job_name=f"bigdit-{cfg.run.name}")
    ntasks = tasks_per_node(launcher) * (int(launcher.nodes) if launcher.name == "slurm" else 1)

    if launcher.dry_run:
        if launcher.name == "slurm":
            print(sbatch_script(executor))
        else:
            print(f"would run {ntasks} local task(s) of bigdit.train (gloo/nccl, one per process) in {run_dir}")
        return 0

    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(launch_cfg), run_dir / "launcher.yaml")
    port = _free_port() if launcher.name == "local" else launcher.master_port
    job = executor.submit(TrainTask(train_cfg, int(launcher.max_requeues), port))
    kind = "SLURM job" if launcher.name == "slurm" else "local job"
    print(f"submitted {kind} {job.job_id}: {ntasks} task(s)", flush=True)
    print(f"run dir: {run_dir}  (config.yaml, metrics.jsonl, checkpoints/, submitit/)")
    print(f"follow:  tail -f {folder}/{job.job_id}_0_log.out {folder}/{job.job_id}_0_log.err   "
          f"(one <job>_<rank>_log.out/.err per rank)")
    if launcher.name == "slurm":
        print(f"state:   squeue -j {job.job_id}   sacct -j {job.job_id}   cancel: scancel {job.job_id}", flush=True)
    if not launcher.wait:
        return 0
    try:
        job.results()
    except Exception as err:  # submitit re-raises the first failing task's error with its traceback
        print(f"{kind} {job.job_id} failed: {err}\nper-rank logs: {folder}/{job.job_id}_*_log.*", file=sys.stderr)
        return 1
    print(f"{kind} {job.job_id} finished: {run_dir}", flush=True)
    return 0
