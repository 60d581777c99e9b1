#!/usr/bin/env bash
# The GPU rows of bench/RESULTS.md on one GPU, sized to a GPU loan (~15 minutes in all, at most 10 per command):
#
#   bench/gpu.sh [quick] [out.jsonl]       # the default: 7 minutes on one H100/H200, compilation included
#   bench/gpu.sh full1|full2|full3 [out]   # the rest of the rows, in parts of at most 9 minutes each
#   bench/gpu.sh full [N] [out]            # part N (full 2 = full2); without N every part, one after another
#   bench/gpu.sh all [out]                 # quick, then every full part (a machine without a time limit)
#
# One JSON object per line, appended (and fsynced) the moment its row is measured, so a run cut off keeps every
# row before the cut: row, part, device, commit, command, wall_s (start-up and compilation included), then the
# tool's numbers, peak memory among them (bench_train: peak_mem_gib_rank0; VAE, sampling: peak_mem_gib). A row
# that fails (out of memory, say) is written with "error" and the tail of its stderr and the next row runs; each
# row has a cap, and each part a budget (7 or 9 minutes, BENCH_BUDGET_S): a row is killed at its cap or at the
# budget's end, and a row that no longer fits is written as "skipped", so a part always ends inside its budget.
# The rows' stderr goes to <out>.log. Default out: bench/gpu-<part>-<date>.jsonl.
#
# On the GPU machine (no network, its own Python 3.12 and CUDA torch, no hydra/omegaconf/diffusers): carry the
# wheelhouse/ that `make wheelhouse` builds here (see bench/wheelhouse.py); before the first row this script
# installs from it, with pip --no-index --no-deps --target, only the distributions that Python lacks, and puts
# that folder and the repo on PYTHONPATH (the machine's torch is never touched). Commit: BENCH_COMMIT, else
# git in this tree (+dirty with uncommitted changes), else the commit `make wheelhouse` recorded, else unknown.
# PY picks the interpreter (default: .venv/bin/python when present, else python3).
#
# Budget per row on one H100/H200 (estimates, not measurements: no GPU was lent while this was written). The
# training rows (tools/bench_train.py, bf16 autocast, synthetic 4x32x32 latents, DDP on one process) run 30 steps:
# 10 warm-up, 20 timed (2 log windows of 10). Each costs ~15 s of start-up (two Python processes, CUDA, the model
# and AdamW), ~60 s of torch.compile when compiled (one block, first use of its shapes: every batch size and the
# checkpointed graph compile anew, ~1 min each), 30 steps (DiT-XL/2 ~0.1 s at batch 128, ~0.3 s at 256 with
# checkpointing; U-DiT far less) and the final checkpoint every run writes (DiT-XL/2: ~11 GB of weights, EMA and
# AdamW state; to /dev/shm when it has room, see BENCH_TMP below).
#
#   quick (budget 420 s)                                              estimate  cap
#     setup: wheelhouse install, device/commit                          ~10 s
#     vae-256       VAE encode 256px, batch 32, 5 timed batches           ~20 s    90 s
#     sample-xl     DiT-XL/2 random init, DDIM 25 steps, batch 64,        ~30 s   120 s
#                   guidance 4.0 (128 per network call), fp32 and bf16
#     xl-eager-128  DiT-XL/2 eager, batch 128                             ~45 s   120 s
#     xl-128        DiT-XL/2 compiled, batch 128, + the step profile     ~100 s   210 s
#                   (steps 5-8: busy fraction, idle gaps; inside warm-up)
#     xl-256-ac     DiT-XL/2 compiled, batch 256, activation checkpoint  ~105 s   210 s
#     udit-b-256    U-DiT-B compiled, batch 256                          ~100 s   210 s
#                                                                 total ~410 s (6.8 min)
#   full1 (540 s): xl-32, xl-64, xl-256 compiled (~95 s each), udit-b-eager-128 (~40 s), vae-512 (~25 s),
#                  adm-256-eager-16 (ADM-256 in pixels, 3x256x256, batch 16, eager: ~45 s)                 ~7 min
#   full2 (540 s): udit-b-32, udit-b-64, udit-b-128 compiled (~100 s each), udit-l-32 (~110 s)          ~7 min
#   full3 (540 s): udit-l-64, udit-l-128, udit-l-256 compiled (~110-125 s each)                       ~6 min
#
# CPU smoke test of the script itself: BENCH_SMOKE=1 bench/gpu.sh quick (tiny models, 8 steps, batch 4, fp32, no
# compile unless BENCH_SMOKE_COMPILE=1; about 2 minutes on 2 cores). It checks the plumbing, not the numbers.
set -uo pipefail
set -f  # no globbing: hydra list overrides such as +model.depth=[1,1,1,1,1] stay as written
cd "$(dirname "$0")/.."
REPO=$PWD
T0=$(date +%s)

MODE=${1:-quick}
if [[ $MODE == *.jsonl ]]; then MODE=quick; else shift $(( $# > 0 ? 1 : 0 )); fi  # bench/gpu.sh out.jsonl: quick
if [[ $MODE == full && ${1:-} =~ ^[0-9]+$ ]]; then MODE=full$1; shift; fi
case $MODE in
  quick|full1|full2|full3) PARTS=$MODE ;;
  full) PARTS="full1 full2 full3" ;;
  all) PARTS="quick full1 full2 full3" ;;
  *) echo "usage: bench/gpu.sh [quick|full1|full2|full3|full [N]|all] [out.jsonl]" >&2; exit 2 ;;
esac
OUT=${1:-bench/gpu-$MODE-$(date +%Y%m%d-%H%M%S).jsonl}
mkdir -p "$(dirname "$OUT")"
export BENCH_LOG=${OUT%.jsonl}.log
if [[ -z ${PY:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONUNBUFFERED=1

# --- setup: the wheelhouse (only what this Python lacks), PYTHONPATH, commit, device ------------------------------
SITE=${BENCH_SITE:-${TMPDIR:-/tmp}/bigdit-bench-site}
export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
if [[ -d wheelhouse ]]; then
  "$PY" bench/wheelhouse.py install --wheelhouse wheelhouse --target "$SITE" || exit 1
elif ! "$PY" -c "import hydra, omegaconf, diffusers" 2>/dev/null; then
  echo "bench/gpu.sh: $PY lacks hydra-core, omegaconf or diffusers and there is no wheelhouse/: run 'make wheelhouse'" \
       "on a machine with PyPI access and carry wheelhouse/ along" >&2
  exit 1
fi

COMMIT=${BENCH_COMMIT:-}
if [[ -z $COMMIT ]] && command -v git >/dev/null && c=$(git rev-parse --short HEAD 2>/dev/null); then
  git diff --quiet HEAD 2>/dev/null || c+="+dirty"
  COMMIT=$c
fi
if [[ -z $COMMIT && -f wheelhouse/wheelhouse.json ]]; then
  COMMIT="$("$PY" -c 'import json; print(json.load(open("wheelhouse/wheelhouse.json"))["commit"])') (recorded by make wheelhouse)"
fi
export BENCH_COMMIT=${COMMIT:-unknown}
BENCH_DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
export BENCH_DEVICE=${BENCH_DEVICE:-CPU ($(uname -m), $(nproc) cores)}

# Each training row's run directory (and its final ~11 GB DiT-XL/2 checkpoint) and inductor's cache go to one
# folder of this run, removed at the end (a row killed at its cap leaves its run directory behind): in RAM when
# /dev/shm has 48 GiB free, else in TMPDIR (BENCH_TMPDIR overrides).
tmp_root=${BENCH_TMPDIR:-${TMPDIR:-/tmp}}
if [[ -z ${BENCH_TMPDIR:-} && -d /dev/shm && $(df -Pk /dev/shm 2>/dev/null | awk 'NR==2 {print $4}') -ge $((48 * 1024 * 1024)) ]]; then
  tmp_root=/dev/shm
fi
BENCH_TMP=$(mktemp -d "$tmp_root/bigdit-bench.XXXXXX") || exit 1
trap 'rm -rf "$BENCH_TMP"' EXIT
export TMPDIR=$BENCH_TMP

# --- the rows ------------------------------------------------------------------------------------------------------
XL="model=dit model.name=DiT-XL/2"
UB="model=udit model.name=U-DiT-B"
UL="model=udit model.name=U-DiT-L"
# ADM-256 on 3x256x256 synthetic pixels (1,120 GMACs per forward: batch 16 keeps its activations well inside
# the GPU's memory); eager, as per-block compilation of its ~40 distinct block shapes would take minutes.
ADM="model=dit model.name=ADM-256 model.input_size=256 model.in_channels=3 model.class_dropout_prob=0 \
data.source.shape=[3,256,256] data.source.size=256"
STEPS="run.steps=30 bench.warmup_steps=10 bench.log_every=10"
PRECISION=run.precision=bf16
COMPILE=run.compile=true
VAE_ARGS="batch=32 iters=5"
SAMPLE_ARGS="model=DiT-XL/2 sampler=ddim steps=25 batch=64 cfg_scale=4.0 precisions=fp32,bf16"
b() { echo "$1"; }
if [[ ${BENCH_SMOKE:-0} == 1 ]]; then  # tiny models on a CPU: the same rows, commands and JSON, other sizes
  XL="model=dit model.name=DiT-S/2 +model.depth=1"
  UB="model=udit model.name=U-DiT-S +model.depth=[1,1,1,1,1] +model.hidden_size=32 +model.num_heads=2"
  UL=$UB
  ADM="model=dit model.name=ADM-64 model.input_size=32 model.in_channels=3 model.class_dropout_prob=0 \
+model.model_channels=64 +model.num_res_blocks=1 data.source.shape=[3,32,32] data.source.size=16"
  STEPS="run.steps=8 bench.warmup_steps=4 bench.log_every=4"  # the profile needs steps 5-8
  PRECISION=run.precision=fp32  # bf16 autocast on a CPU is ~10x slower than fp32
  [[ ${BENCH_SMOKE_COMPILE:-0} == 1 ]] || COMPILE=run.compile=false
  VAE_ARGS="batch=1 iters=1"
  SAMPLE_ARGS="model=DiT-S/2 model.depth=1 sampler=ddim steps=2 batch=2 cfg_scale=4.0 precisions=fp32,bf16"
  b() { echo 4; }
fi

FAILED=0
row() {  # row NAME CAP NEED CMD...: one JSON line in $OUT (bench/row.py)
  local name=$1 cap=$2 need=$3
  shift 3
  "$PY" bench/row.py --out "$OUT" --name "$name" --cap "$cap" --need "$need" --deadline "$DEADLINE" -- "$@" ||
    FAILED=$((FAILED + 1))
}
train() {  # train NAME CAP NEED OVERRIDES...: a tools/bench_train.py row, bf16, synthetic latents
  local name=$1 cap=$2 need=$3
  shift 3
  row "$name" "$cap" "$need" "$PY" tools/bench_train.py data=synthetic $PRECISION $STEPS "$@"
}

part_quick() {
  row vae-256 90 20 "$PY" tools/bench_encode.py resolutions=$([[ ${BENCH_SMOKE:-0} == 1 ]] && echo 32 || echo 256) $VAE_ARGS
  row sample-xl 120 30 "$PY" tools/bench_sample.py $SAMPLE_ARGS
  train xl-eager-128 120 40 $XL run.compile=false run.global_batch=$(b 128)
  train xl-128 210 90 $XL $COMPILE run.global_batch=$(b 128) run.profile=true
  train xl-256-ac 210 90 $XL $COMPILE run.global_batch=$(b 256) run.activation_checkpointing=true
  train udit-b-256 210 90 $UB $COMPILE run.global_batch=$(b 256)
}
part_full1() {
  train xl-32 180 80 $XL $COMPILE run.global_batch=$(b 32)
  train xl-64 180 80 $XL $COMPILE run.global_batch=$(b 64)
  train xl-256 210 90 $XL $COMPILE run.global_batch=$(b 256)
  train udit-b-eager-128 120 40 $UB run.compile=false run.global_batch=$(b 128)
  row vae-512 90 20 "$PY" tools/bench_encode.py resolutions=$([[ ${BENCH_SMOKE:-0} == 1 ]] && echo 64 || echo 512) $VAE_ARGS
  train adm-256-eager-16 150 60 $ADM run.compile=false run.global_batch=$(b 16)
}
part_full2() {
  train udit-b-32 180 80 $UB $COMPILE run.global_batch=$(b 32)
  train udit-b-64 180 80 $UB $COMPILE run.global_batch=$(b 64)
  train udit-b-128 180 80 $UB $COMPILE run.global_batch=$(b 128)
  train udit-l-32 200 90 $UL $COMPILE run.global_batch=$(b 32)
}
part_full3() {
  train udit-l-64 200 90 $UL $COMPILE run.global_batch=$(b 64)
  train udit-l-128 200 90 $UL $COMPILE run.global_batch=$(b 128)
  train udit-l-256 210 90 $UL $COMPILE run.global_batch=$(b 256)
}

echo "bench/gpu.sh $MODE: $BENCH_DEVICE, commit $BENCH_COMMIT, $PY -> $OUT (stderr: $BENCH_LOG)"
for part in $PARTS; do
  if [[ $part == quick ]]; then budget=${BENCH_BUDGET_S:-420}; else budget=${BENCH_BUDGET_S:-540}; fi
  # the quick part's budget counts from the script's start (the setup is in it); 10 s are kept for the last kill
  if [[ $part == quick ]]; then start=$T0; else start=$(date +%s); fi
  DEADLINE=$((start + budget - 10))
  export BENCH_PART=$part
  "part_$part"
  echo "bench/gpu.sh: part $part done after $(( $(date +%s) - start )) s (budget $budget s)"
done
echo "bench/gpu.sh: $(grep -c . "$OUT" 2>/dev/null || echo 0) rows in $OUT, $FAILED failed, $(( $(date +%s) - T0 )) s in all"
