#!/usr/bin/env bash
# Every GPU measurement of benchmarks/RESULTS.md, in one go, from the repository root:
#     OUT=bench_out bash benchmarks/gpu_session.sh
#     OUT=bench_out PART=2 bash benchmarks/gpu_session.sh     # only the second part
# Writes machine.txt, log.txt (everything printed) and one JSON per benchmark under $OUT.
# Needs torch with CUDA, lightning, hydra-core and omegaconf importable (PYTHONPATH=$PWD works
# without installing the package).
set -u
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
PART=${PART:-all}
LOG="$OUT/log.txt"

step() {  # step SECONDS_LIMIT COMMAND...: run, log, time
  local limit=$1; shift
  echo "=== \$ $*" | tee -a "$LOG"
  local t0; t0=$(date +%s.%N)
  timeout "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "=== rc=$rc wall=$(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $t0}") s" | tee -a "$LOG"
}

{ date -u; nvidia-smi; $PY -c "import sys, torch, lightning; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'lightning', lightning.__version__); print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory / 2**30, 'GiB')"; df -h /tmp; } >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

if [ "$PART" = all ] || [ "$PART" = 1 ]; then
# (a)(b)(c) at the small (CPU default) model size
step 60 $PY benchmarks/run.py --device cuda --model small --seq-len 128 --batch-size 32 --cache-rows 4096 \
  --workers 0,4 --out "$OUT/small.json"

# the real CLI on one GPU: every layer-wise stage + fusion, then the e2e baseline (default steps)
step 150 $PY -m stackwise.cli.train hardware=gpu data=shakespeare name=gpu_smoke output_root=/tmp/sw_out \
  trainer.enable_progress_bar=false
step 80 $PY -m stackwise.cli.train hardware=gpu data=shakespeare name=gpu_smoke output_root=/tmp/sw_out \
  trainer.enable_progress_bar=false stage=e2e

# the seed sizes (d_model 4096, 8 layers, vocab 128000), T = 2048; largest batch per stage (gqa)
step 190 $PY benchmarks/run.py --device cuda --model seed --seq-len 2048 --batch-size 4 --steps 10 \
  --max-batch gqa --cache-rows 256 --shard-size 64 --workers 0,4 --cache-dir /tmp/sw_cache --out "$OUT/seed.json"

# a mid size: d_model 2048, 8 layers, vocab 32000, T = 1024
step 80 $PY benchmarks/run.py --device cuda --model seed --d-model 2048 --n-heads 16 --n-kv-heads 4 --d-ff 5632 \
  --vocab-size 32000 --mla-rq 512 --mla-rkv 256 --seq-len 1024 --batch-size 16 --steps 10 --cache-rows 0 \
  --out "$OUT/mid.json"
fi

if [ "$PART" = all ] || [ "$PART" = 2 ]; then
# seed sizes with the batch that fills the GPU (found by --max-batch in part 1): layer B=32, e2e B=8
step 150 $PY benchmarks/run.py --device cuda --model seed --seq-len 2048 --stages layer --batch-size 32 --steps 5 \
  --cache-rows 256 --cache-batch-size 4 --shard-size 64 --workers 0,4,8 --cache-dir /tmp/sw_cache \
  --out "$OUT/seed_fill.json"
step 100 $PY benchmarks/run.py --device cuda --model seed --seq-len 2048 --stages e2e --batch-size 8 --steps 5 \
  --cache-rows 0 --out "$OUT/seed_fill_e2e.json"
fi
