#!/usr/bin/env python
"""Submit ``bigdit-train`` as a job: ``python launchers/submit.py launcher=slurm experiment=<preset> ...``.

    python launchers/submit.py launcher=slurm experiment=<preset> launcher.nodes=8 launcher.gpus_per_node=8 \
        launcher.partition=<p> launcher.account=<a> launcher.time_min=1440
    python launchers/submit.py launcher=local launcher.tasks_per_node=2 experiment=demo   # CPU/gloo or one box
    python launchers/submit.py launcher=slurm ... launcher.dry_run=true                   # print the sbatch script
    python launchers/submit.py launcher=slurm launcher.gpus_per_node=0 launcher.tasks_per_node=2 ...  # CPU nodes

Before sbatch the launcher checks with sinfo that the partition's nodes have launcher.gpus_per_node GPUs (the
default is 8); if not it exits with status 2, naming the partition and the keys to set.

Any training key can be overridden as with ``bigdit-train``; ``launcher.*`` keys are in configs/launcher/.
Resubmitting the same command resumes the run in ``run.dir``.
"""

import sys

import hydra
from omegaconf import DictConfig

import bigdit  # noqa: F401  (environment fixes before third-party imports)
from bigdit.launch import submit
from bigdit.train import CONFIG_DIR


@hydra.main(config_path=CONFIG_DIR, config_name="submit", version_base=None)
def main(cfg: DictConfig) -> None:
    code = submit(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
