#!/usr/bin/env bash
# Every GPU row of bench/RESULTS.md on one GPU, one JSON object per line:  bench/gpu.sh [out.jsonl]
# DiT-XL/2, U-DiT-B and U-DiT-L at 256px (4x32x32 latents), bf16 autocast, per-block torch.compile, batch
# 32..256 per GPU; DiT-XL/2 at 256 with activation checkpointing and eager at 128; a profile of the DiT-XL/2
# step (device busy fraction and idle gaps); VAE encode at 256 and 512. About 25 minutes on an H100.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-bench/gpu-$(date +%Y%m%d-%H%M%S).jsonl}
COMMON="data=synthetic run.precision=bf16 run.steps=60 bench.warmup_steps=20 bench.log_every=10"
row() { "$PY" tools/bench_train.py "$@" | tee -a "$OUT"; }  # a failing row (e.g. out of memory) does not stop the rest

for model in "model=dit model.name=DiT-XL/2" "model=udit model.name=U-DiT-B" "model=udit model.name=U-DiT-L"; do
  for batch in 32 64 128 256; do
    row $model $COMMON run.compile=true run.global_batch=$batch
  done
done
row model=dit model.name=DiT-XL/2 $COMMON run.compile=true run.global_batch=256 run.activation_checkpointing=true
row model=dit model.name=DiT-XL/2 $COMMON run.compile=false run.global_batch=128
row model=udit model.name=U-DiT-B $COMMON run.compile=false run.global_batch=128

PROFILE_DIR=$(mktemp -d)
"$PY" -m bigdit.train model=dit model.name=DiT-XL/2 data=synthetic run.precision=bf16 run.compile=true \
  run.global_batch=128 run.steps=10 run.log_every=10 run.profile=true run.dir="$PROFILE_DIR" >/dev/null &&
  "$PY" -c "import json,sys; s=json.load(open(sys.argv[1])); s.pop('steps'); print(json.dumps({'profile': 'DiT-XL/2 bf16 compile b128', **s}))" \
    "$PROFILE_DIR/profile/summary.json" | tee -a "$OUT"

"$PY" tools/bench_encode.py batch=32 | tee -a "$OUT"
echo "results: $OUT"
