"""Launching ``bigdit-train`` as a submitit job: one task per GPU on SLURM, or N local processes.

``launchers/submit.py`` composes ``configs/submit.yaml`` (the training config plus the ``launcher`` group)
and calls :func:`submit`. Each task of the job runs :class:`TrainTask`, which exports the
torch.distributed environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR`` = the job's first node, ``MASTER_PORT`` derived from the job id) and calls the same
:func:`bigdit.train.train` as ``bigdit-train``: everything else (resume, checkpoints, metrics) is the
training entry point's.

One run directory per run: ``run.dir`` holds ``config.yaml`` (training config), ``launcher.yaml``,
``metrics.jsonl``, ``checkpoints/``, ``submitit/`` (the sbatch script, pickled task and per-rank logs
``<job>_<rank>_log.{out,err}``) and ``heartbeats/`` (one small file per rank: who it is, its last step; a
rank whose collective times out names from them the ranks that hang). Preemption, ``scancel`` and time
limits: see :mod:`bigdit.preemption`.

Before anything is submitted or written, :func:`gpu_request_problem` asks ``sinfo`` whether the partition's nodes
have ``launcher.gpus_per_node`` GPUs: on a cluster or partition without them (the default asks for 8) the launcher
exits with a message naming the partition, its GPUs per node and the keys to set (``launcher.gpus_per_node=0
launcher.tasks_per_node=N`` for a CPU job), where sbatch would only say "Invalid generic resource (gres)
specification". ``launcher.dry_run`` contacts no cluster and so checks nothing.

The offline tools (``tools/encode_latents.py``, ``tools/cache_text.py``) launch the same way through
:func:`run_or_submit`: with ``launcher=slurm|local`` the tool submits itself as a job (or with
``launcher.array=N`` a job array of N such jobs) whose tasks each run the tool on their own slice; their
logs go to ``<out>/submitit/`` (loaders read the shards named in ``manifest.json``, never the folder).
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable
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

        env = submitit.JobEnvironment()
        os.environ.update(self.distributed_env())
        rank, world = os.environ["RANK"], os.environ["WORLD_SIZE"]
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0") or "0"
        where = f"rank {rank}/{world} on {socket.gethostname()}"
        if os.environ.get("SLURM_JOB_ID"):
            where += f" (SLURM job {os.environ['SLURM_JOB_ID']}, restart {restarts})"
        # Replaces submitit's handlers: USR2 would requeue at once from rank 0 without a collective save, and
        # TERM (scancel, a preemption) would be ignored until SIGKILL. Ours checkpoint at the next step.
        requeue_signal = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))
        signals = (requeue_signal, signal.SIGTERM)
        preemption.install((requeue_signal,), self.max_requeues, stop_signals=(signal.SIGTERM,),
                           job=f"{env.job_id}.{restarts}", log=str(env.paths.stdout))
        print(f"[bigdit] {where}: " + " ".join(f"{k}={os.environ[k]}" for k in
                                               ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "LOCAL_WORLD_SIZE")),
              flush=True)
        try:
            train(OmegaConf.create(self.cfg))
        except preemption.PreemptedError as err:
            _ignore(signals)
            print(f"[bigdit] {where}: {err}", file=sys.stderr, flush=True)
            raise
        except Exception as err:
            _ignore(signals)
            # Name the rank and host: with many tasks, the first failing one is what matters. A dead or hung
            # peer surfaces here as a collective timeout (strategy.timeout_s) or a connection error: the
            # heartbeats tell which peers never reached the collective.
            hint = ""
            if any(k in str(err).lower() for k in ("timeout", "timed out", "connection", "broken pipe", "gloo", "nccl")):
                lagging = preemption.hang_report(f"{type(err).__name__}: {err}")
                if lagging:
                    hint = " -- a collective failed; the ranks that did not fail with it:\n  " + "\n  ".join(lagging)
                else:
                    hint = (" -- a collective failed: another rank probably died or hangs; see the other ranks' logs "
                            f"in {Path(self.cfg['run']['dir']) / 'submitit'}")
            print(f"[bigdit] {where} failed: {type(err).__name__}: {err}{hint}", file=sys.stderr, flush=True)
            traceback.print_exc()
            sys.stderr.flush()
            raise RuntimeError(f"{where} failed: {type(err).__name__}: {err}{hint}") from err
        # Training is over: a signal arriving now (e.g. the pre-timeout one of a job that just made it) must not
        # kill the exiting process and turn a finished job into a failed one.
        _ignore(signals)
        return self.cfg["run"]["dir"]

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Used only if submitit's own handler fires before ours is installed: requeue as is; the rerun
        resumes from the last periodic checkpoint."""
        return submitit.helpers.DelayedSubmission(TrainTask(self.cfg, self.max_requeues, self.master_port))


def _ignore(signals: tuple[int, ...]) -> None:
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)


def work_slice(cfg: DictConfig) -> tuple[int, int]:
    """An offline tool's slice ``(rank, world_size)``: its ``rank``/``world_size`` keys, else the SLURM array task,
    else the torchrun/SLURM task environment; one process when none is set. Shard ``i`` is ``i % world_size``'s."""
    if cfg.rank is not None or cfg.world_size is not None:
        rank, world = int(cfg.rank or 0), int(cfg.world_size or 1)
    elif "SLURM_ARRAY_TASK_ID" in os.environ and "SLURM_ARRAY_TASK_COUNT" in os.environ:
        rank = int(os.environ["SLURM_ARRAY_TASK_ID"]) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))
        world = int(os.environ["SLURM_ARRAY_TASK_COUNT"])
    else:
        rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
        world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside 0..{world - 1}")
    return rank, world


class ToolTask:
    """The picklable callable every task of an offline tool's job runs: the tool's ``run(cfg)`` on its slice.

    ``script`` is the tool's file (imported by path: tools/ is no package), ``cfg`` its resolved config (a
    plain dict). Task ``global_rank`` of array job ``part`` (of ``parts``) takes slice
    ``part * num_tasks + global_rank`` of ``parts * num_tasks``, given to the tool as its ``rank`` and
    ``world_size`` keys.
    """

    def __init__(self, script: str, cfg: dict[str, Any], part: int = 0, parts: int = 1):
        self.script, self.cfg, self.part, self.parts = script, cfg, part, parts

    def __call__(self) -> None:
        env = submitit.JobEnvironment()
        rank, world = self.part * env.num_tasks + env.global_rank, self.parts * env.num_tasks
        os.environ["LOCAL_RANK"] = str(env.local_rank)  # device=auto: this task's GPU
        cfg = dict(self.cfg, rank=rank, world_size=world) if "world_size" in self.cfg else self.cfg
        script = Path(self.script)
        print(f"[bigdit] {script.stem} slice {rank}/{world} on {socket.gethostname()} (job {env.job_id})", flush=True)
        sys.path.insert(0, str(script.parent))
        importlib.import_module(script.stem).run(OmegaConf.create(cfg))

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """On a timeout or preemption signal submitit requeues the task as is: the tools skip finished shards."""
        return submitit.helpers.DelayedSubmission(ToolTask(self.script, self.cfg, self.part, self.parts))


def tasks_per_node(launcher: DictConfig) -> int:
    """One task per GPU on GPU nodes; ``launcher.tasks_per_node`` when set (CPU jobs)."""
    tasks = launcher.get("tasks_per_node") or launcher.get("gpus_per_node") or 1
    return int(tasks)


def num_tasks(launcher: DictConfig) -> int:
    """The tasks of one job (local jobs run on this one machine)."""
    return tasks_per_node(launcher) * (int(launcher.nodes) if launcher.name == "slurm" else 1)


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


def gres_gpus(gres: str) -> int:
    """The GPUs in a node's generic resources as sinfo prints them (``%G``): ``(null)`` -> 0, ``gpu:8`` -> 8,
    ``gpu:h100:8(S:0-1),mps:400`` -> 8, ``gpu:a100:2,gpu:v100:2`` -> 4, ``gpu`` or ``gpu:h100`` -> 1."""
    total = 0
    for item in re.split(r",(?![^(]*\))", gres):  # no split at the commas inside "(S:0,1)"
        parts = re.sub(r"\(.*?\)", "", item).strip().split(":")
        if parts[0] == "gpu":
            total += int(parts[-1]) if len(parts) > 1 and parts[-1].isdigit() else 1
    return total


def partition_gpus() -> tuple[str | None, dict[str, dict[str, tuple[int, int]]]] | None:
    """(the default partition, {partition: {node: (GPUs, CPUs)}}) from ``sinfo``; None when sinfo is absent or fails."""
    if shutil.which("sinfo") is None:
        return None
    try:
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%P|%N|%G|%c"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode:
        return None
    default, nodes = None, {}
    for line in proc.stdout.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 4:
            continue
        part, node, gres, cpus = fields
        if part.endswith("*"):
            part = default = part[:-1]
        nodes.setdefault(part, {})[node] = (gres_gpus(gres), int(cpus) if cpus.isdigit() else 0)
    return default, nodes


def gpu_request_problem(launcher: DictConfig) -> str | None:
    """Why the SLURM partition cannot run ``launcher.gpus_per_node`` GPUs on a node, with the keys to set, or None.

    sbatch itself only answers "Invalid generic resource (gres) specification" when, say, the default 8 GPUs per
    node meet a partition without GPUs. Checked with ``sinfo`` before anything is submitted or written; None (no
    opinion) when the request is for no GPUs, ``launcher.check_resources`` is false, or sinfo does not know the
    partition (sbatch then speaks for itself). The partition's largest node counts.
    """
    want = int(launcher.get("gpus_per_node") or 0)
    if launcher.name != "slurm" or want <= 0 or not launcher.get("check_resources", True):
        return None
    found = partition_gpus()
    if found is None:
        return None
    default, nodes = found
    names = str(launcher.partition).split(",") if launcher.get("partition") else [default]
    if None in names or any(name not in nodes for name in names):
        return None
    here = {node: info for name in names for node, info in nodes[name].items()}
    most = max(gpus for gpus, _ in here.values())
    if most >= want:
        return None
    which = f"partition '{','.join(names)}'" + ("" if launcher.get("partition") else " (the cluster's default)")
    per_node = sorted({gpus for gpus, _ in here.values()})
    has = (f"no GPUs on its {len(here)} node(s)" if most == 0 else
           f"at most {most} per node ({'/'.join(map(str, per_node))} GPUs on its {len(here)} node(s))")
    cpus = max(c for _, c in here.values())
    others = sorted(((max(g for g, _ in v.values()), p) for p, v in nodes.items() if p not in names), reverse=True)
    others = [(g, p) for g, p in others if g >= want][:5]
    lines = [f"launcher.gpus_per_node={want} asks for {want} GPUs per node, but {which} has {has} (sinfo); sbatch "
             f"would refuse the job (\"Invalid generic resource (gres) specification\"). Nothing was submitted."]
    if most == 0:
        lines.append("  A CPU job: launcher.gpus_per_node=0 launcher.tasks_per_node=N (N processes per node"
                     + (f"; its nodes have {cpus} CPUs)" if cpus else ")"))
    else:
        lines.append(f"  Fewer GPUs per node: launcher.gpus_per_node={most} (launcher.nodes for more in all)")
    if others:
        lines.append("  Or a partition with them: " + ", ".join(f"launcher.partition={p} ({g} GPUs per node)"
                                                             for g, p in others))
    lines.append("  (launcher.check_resources=false skips this check)")
    return "\n".join(lines)


def check_resources(launcher: DictConfig) -> int:
    """0, or 2 after printing :func:`gpu_request_problem`'s message: what submit/submit_tool run before sbatch."""
    problem = gpu_request_problem(launcher)
    if problem:
        print(f"[bigdit] {problem}", file=sys.stderr, flush=True)
        return 2
    return 0


def sbatch_script(executor: submitit.SlurmExecutor, array: int = 1) -> str:
    """The sbatch script ``executor`` would submit (the command is submitit's, as in a real submission); with
    ``array`` > 1, that of a job array of ``array`` such jobs."""
    if array > 1:  # what submitit's own array submission does: a copy of the executor with map_count set
        executor_copy = submitit.SlurmExecutor(executor.folder, executor.max_num_timeout)
        executor_copy.update_parameters(**executor.parameters)
        executor_copy.parameters["map_count"] = array
        executor = executor_copy
    return executor._make_submission_file_text(executor._submitit_command_str, "dry_run")


def _dry_run(executor: submitit.Executor, launcher: DictConfig, what: str, array: int = 1) -> int:
    if launcher.name == "slurm":
        print(sbatch_script(executor, array))
    else:
        print(f"would run {what} as local processes")
    return 0


def _announce(jobs: list[submitit.Job], launcher: DictConfig, what: str) -> str:
    """Print what was submitted and where its logs are; returns how the job is called in messages."""
    array = launcher.name == "slurm" and len(jobs) > 1  # local "arrays" are separate jobs
    kind = ("SLURM " if launcher.name == "slurm" else "local ") + ("array job" if array else "job")
    job_id = jobs[0].job_id.split("_")[0] if array else ", ".join(job.job_id for job in jobs)  # <job>_<index>
    print(f"submitted {kind} {job_id}: {what}", flush=True)
    per_task = "<job>_<array index>_<rank>" if array else "<job>_<rank>"
    print(f"follow:  tail -f {jobs[0].paths.stdout} {jobs[0].paths.stderr}   (one {per_task}_log.out/.err per task)")
    if launcher.name == "slurm":
        print(f"state:   squeue -j {job_id}   sacct -j {job_id}   cancel: scancel {job_id}", flush=True)
    return f"{kind} {job_id}"


def _wait(jobs: list[submitit.Job], name: str, result: str) -> int:
    """Block until ``jobs`` end; 1 (with the failing tasks' error and logs) if any failed, else 0."""
    failed = 0
    for job in jobs:
        try:
            job.results()
        except Exception as err:  # submitit re-raises the first failing task's error with its traceback
            failed += 1
            which = f"{name} ({job.job_id})" if len(jobs) > 1 else name
            print(f"{which} failed: {err}\nper-task logs: {job.paths.folder}/{job.job_id}_*_log.*", file=sys.stderr)
    if failed:
        return 1
    print(f"{name} finished: {result}", flush=True)
    return 0


def submit(cfg: DictConfig) -> int:
    """Submit (or with ``launcher.dry_run``, print) the training job described by ``cfg``; returns an exit code."""
    launcher = cfg.launcher
    if launcher.get("array"):
        raise ValueError("launcher.array is for the offline tools: a training run is one job (launcher.nodes)")
    run_dir = Path(cfg.run.dir).resolve()
    train_cfg = OmegaConf.to_container(cfg, resolve=True)
    launch_cfg = train_cfg.pop("launcher")
    train_cfg["run"]["dir"] = str(run_dir)
    folder = run_dir / "submitit"
    executor = make_executor(launcher, folder, job_name=f"bigdit-{cfg.run.name}")
    ntasks = num_tasks(launcher)
    if launcher.dry_run:
        return _dry_run(executor, launcher, f"{ntasks} task(s) of bigdit.train (one rank per process) in {run_dir}")
    if check_resources(launcher):
        return 2

    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(launch_cfg), run_dir / "launcher.yaml")
    port = _free_port() if launcher.name == "local" else launcher.master_port
    job = executor.submit(TrainTask(train_cfg, int(launcher.max_requeues), port))
    name = _announce([job], launcher, f"{ntasks} task(s)")
    print(f"run dir: {run_dir}  (config.yaml, metrics.jsonl, checkpoints/, submitit/)", flush=True)
    return _wait([job], name, str(run_dir)) if launcher.wait else 0


def submit_tool(cfg: DictConfig, script: str) -> int:
    """Submit (or with ``launcher.dry_run``, print) the offline tool ``script`` with its config ``cfg`` as a job of
    ``nodes`` x ``tasks_per_node`` tasks, or with ``launcher.array=N`` as a job array of N such jobs (at most
    ``launcher.array_parallelism`` at a time); each task runs the tool on its own slice (:class:`ToolTask`).
    Logs go to ``<out>/submitit/``. Returns an exit code (with ``launcher.wait``, non-zero when a task failed)."""
    launcher, name = cfg.launcher, Path(script).stem
    if cfg.get("out") is None:
        raise ValueError(f"give out=<dir>: {name} writes there, and its job logs go to <out>/submitit/")
    tool_cfg = OmegaConf.to_container(cfg, resolve=True)
    tool_cfg.pop("launcher")
    out = Path(cfg.out).resolve()
    parts, ntasks = int(launcher.get("array") or 1), num_tasks(launcher)
    if parts * ntasks > 1 and "world_size" not in tool_cfg:
        raise ValueError(f"{name} does not split its work between tasks (it has no rank/world_size keys): launch it "
                         f"as one task (launcher.gpus_per_node=1 or launcher.tasks_per_node=1, no launcher.array)")
    executor = make_executor(launcher, out / "submitit", job_name=f"bigdit-{name}")
    if launcher.name == "slurm" and parts > 1:
        executor.update_parameters(array_parallelism=int(launcher.array_parallelism))
    what = (f"{parts} array job(s) of {ntasks} task(s)" if parts > 1 else f"{ntasks} task(s)") + \
        f" of {name}, each on slice <rank>/{parts * ntasks} of the work"
    if launcher.dry_run:
        return _dry_run(executor, launcher, what, parts)
    if check_resources(launcher):
        return 2

    (out / "submitit").mkdir(parents=True, exist_ok=True)
    tasks = [ToolTask(str(Path(script).resolve()), tool_cfg, part, parts) for part in range(parts)]
    with executor.batch():  # one sbatch --array for several parts, a plain sbatch for one
        jobs = [executor.submit(task) for task in tasks]
    job_name = _announce(jobs, launcher, what)
    return _wait(jobs, job_name, str(out)) if launcher.wait else 0


def run_or_submit(cfg: DictConfig, script: str, run: Callable[[DictConfig], Any]) -> None:
    """An offline tool's entry point: ``run(cfg)`` in this process, or with ``launcher=slurm|local`` submit the
    tool ``script`` as a job (:func:`submit_tool`), exiting non-zero when a job it waited for failed."""
    if cfg.get("launcher") is None:
        run(cfg)
        return
    code = submit_tool(cfg, script)
    if code:
        sys.exit(code)
