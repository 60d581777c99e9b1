#!/usr/bin/env bash
# One-machine launcher: `launchers/torchrun.sh NPROC key=value ...` starts NPROC ranks of bigdit-train
# (one per GPU, or CPU processes on gloo). Rerunning the same command resumes the run in run.dir.
set -euo pipefail
if [[ $# -lt 1 || ! $1 =~ ^[0-9]+$ ]]; then
  echo "usage: $0 NPROC [hydra overrides...]   e.g. $0 2 experiment=demo" >&2
  exit 2
fi
ranks=$1
shift
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-"$here/.venv/bin/python"}
[[ -x $python ]] || python=python3
exec "$python" -m torch.distributed.run --standalone --nproc_per_node="$ranks" -m bigdit.train "$@"
