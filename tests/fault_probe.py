"""Run by tests/test_faults.py: ``python tests/fault_probe.py <point> <hydra overrides>`` trains like bigdit-train
and, at ``point`` of the second checkpoint it writes, sends itself SIGKILL (a real kill -9: no handler, no
cleanup). Points: ``before_rename`` (the step's files written, the directory not yet renamed into place),
``before_pointer`` (renamed, ``latest`` not yet switched), ``during_prune`` (``latest`` switched, an old
checkpoint half deleted), ``none`` (no fault: the reference run).
"""

import os
import shutil
import signal
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from bigdit import checkpoint
from bigdit.train import CONFIG_DIR, train

point, overrides = sys.argv[1], sys.argv[2:]
saves = {"n": 0}
real_replace, real_rmtree = os.replace, shutil.rmtree


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def replace(src, dst, *args, **kwargs):
    src, dst = Path(src), Path(dst)
    if src.name.startswith(".tmp-step-"):
        saves["n"] += 1
        if point == "before_rename" and saves["n"] == 2:
            die()
    if dst.name == checkpoint.LATEST and point == "before_pointer" and saves["n"] == 2:
        die()
    return real_replace(src, dst, *args, **kwargs)


def rmtree(path, *args, **kwargs):
    path = Path(path)
    if point == "during_prune" and path.name.startswith("step-") and path.is_dir():
        next(f for f in sorted(path.rglob("*")) if f.is_file()).unlink()  # part of the old checkpoint is gone
        die()
    return real_rmtree(path, *args, **kwargs)


os.replace, shutil.rmtree = replace, rmtree
with initialize_config_dir(CONFIG_DIR, version_base=None):
    cfg = compose("train", overrides=overrides)
train(cfg)
