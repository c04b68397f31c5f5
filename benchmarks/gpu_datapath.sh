#!/usr/bin/env bash
# The GPU data-path figures of benchmarks/RESULTS.md ("The data path"), in one lease, from the
# repository root:
#     OUT=bench_out PART=1 bash benchmarks/gpu_datapath.sh   # step vs peers and peak; a stage fed from its cache
#     OUT=bench_out PART=2 bash benchmarks/gpu_datapath.sh   # stage=all vs stage=e2e, 4 and 8 layers
#     OUT=bench_out PART=3 bash benchmarks/gpu_datapath.sh   # the 4 x 512 host profile, fp8, 8 layers by auto
#     OUT=bench_out PART=4 bash benchmarks/gpu_datapath.sh   # 4 x 512 and fp8 fed and written, beside compute only
#     OUT=bench_out PART=5 bash benchmarks/gpu_datapath.sh   # 8 layers: stage=all (auto store) vs stage=e2e
#     OUT=bench_out PART=6 bash benchmarks/gpu_datapath.sh   # the weight files' writes; 8-layer e2e re-measured
#     OUT=bench_out PART=7 / PART=8 ...                        # 8 layers at 100 steps a stage: e2e / stage=all
#     OUT=bench_out PART=9 bash benchmarks/gpu_datapath.sh   # step vs peers at the mean mask rate; 4 x 512 fed
#     OUT=bench_out STEPS=60 PART=10 bash benchmarks/gpu_datapath.sh   # 8 layers, all vs e2e, STEPS a stage
# Writes machine.txt, log.txt and one JSON per benchmark under $OUT. Needs torch with CUDA,
# lightning, transformers, tensorboard, hydra-core and omegaconf importable.
set -u
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
PART=${PART:-1}
LOG="$OUT/log.txt"
ROOT=${ROOT:-/tmp/sw_datapath}

step() {  # step SECONDS_LIMIT COMMAND...: run, log, time
  local limit=$1; shift
  echo "=== \$ $*" | tee -a "$LOG"
  local t0; t0=$(date +%s.%N)
  timeout "$limit" "$@" 2>&1 | grep -v -e "Warning" -e "warn(" >>"$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== rc=$rc wall=$(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $t0}") s" | tee -a "$LOG"
}

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY -c "import sys, torch, lightning, transformers; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'lightning', lightning.__version__, 'transformers', transformers.__version__)"; nproc; free -g | head -2; df -h /tmp | tail -1; } >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

if [ "$PART" = 1 ]; then
# the CUDA-only tests: a training step that never waits for the GPU (sync debug mode "error")
step 120 $PY -m pytest -q -p no:warnings tests/test_step.py -k cuda
# the layer stage's step (compute only, batch on the device) beside the Hugging Face peers and the
# measured matmul peak, at the seed sizes, 8 x 2048 and 4 x 512, gqa and mla
step 150 $PY benchmarks/run.py --device cuda --model seed --seq-len 2048 --batch-size 8 --stages layer \
  --attention gqa,mla --compile both --steps 10 --cache-rows 0 --out "$OUT/step_8x2048.json"
step 100 $PY benchmarks/run.py --device cuda --model seed --seq-len 512 --batch-size 4 --stages layer \
  --attention gqa --compile both --steps 20 --cache-rows 0 --out "$OUT/step_4x512.json"
# stackwise-train stage=layer k=2 fed from its own cache, its caching pass, and the raw disk
step 280 $PY benchmarks/datapath.py --preset seed --batch-size 8 --seq-len 2048 --parts disk,feed \
  --layer-steps 60 --output-root "$ROOT" --out "$OUT/feed_8x2048.json"
rm -rf "$ROOT"
step 200 $PY benchmarks/datapath.py --preset seed --batch-size 4 --seq-len 512 --parts disk,feed \
  --layer-steps 400 --embed-steps 20 --output-root "$ROOT" --out "$OUT/feed_4x512.json"
rm -rf "$ROOT"
fi

if [ "$PART" = 3 ]; then
# what the seventh lease set left (benchmarks/RESULTS.md): the 4 x 512 layer stage's host time per
# step (cProfile of the stage's process: where the 0.73 goes), the fp8 cache fed and written, and
# stage=all (auto store) against a re-measured e2e at 8 layers, checkpoints off on both sides
step 200 $PY benchmarks/datapath.py --preset seed --batch-size 4 --seq-len 512 --parts feed,disk --profile \
  --no-compute-only --layer-steps 400 --embed-steps 20 --output-root "$ROOT" --out "$OUT/feed_4x512_profiled.json"
rm -rf "$ROOT"
step 200 $PY benchmarks/datapath.py --preset seed --batch-size 8 --seq-len 2048 --parts feed,disk --no-compute-only \
  --layer-steps 60 --embed-steps 15 --set cache.dtype=float8_e4m3 --output-root "$ROOT" --out "$OUT/feed_fp8.json"
rm -rf "$ROOT"
step 560 $PY benchmarks/datapath.py --preset seed --batch-size 8 --seq-len 2048 --parts all --layers 8 \
  --stores auto --sides all,e2e --set callbacks=none --output-root "$ROOT" --out "$OUT/all_8L.json"
rm -rf "$ROOT"
fi

if [ "$PART" = 4 ]; then
# the eighth lease set: later stages cache in cache.batch_size batches (hardware=gpu: 16), an fp8
# cache is decoded on the GPU; the CUDA-only tests, then each stage fed and its caching pass, beside
# the compute-only step and the raw disk of the same run
step 150 $PY -m pytest -p no:warnings tests/test_cache_io.py tests/test_step.py -k cuda
step 200 $PY benchmarks/datapath.py --preset seed --batch-size 4 --seq-len 512 --parts disk,feed \
  --layer-steps 400 --embed-steps 20 --output-root "$ROOT" --out "$OUT/feed_4x512.json"
rm -rf "$ROOT"
step 200 $PY benchmarks/datapath.py --preset seed --batch-size 8 --seq-len 2048 --parts disk,feed \
  --layer-steps 60 --embed-steps 15 --set cache.dtype=float8_e4m3 --output-root "$ROOT" --out "$OUT/feed_fp8_8x2048.json"
rm -rf "$ROOT"
fi

if [ "$PART" = 5 ]; then
step 560 $PY benchmarks/datapath.py --preset seed --batch-size 8 --seq-len 2048 --parts all --layers 8 \
  --stores auto --sides all,e2e --set callbacks=none --output-root "$ROOT" --out "$OUT/all_8L.json"
rm -rf "$ROOT"
fi

if [ "$PART" = 6 ]; then
# what the eighth lease set left: the weight files' writes beside the raw disk (layer_1.pt and the
# fp32 fine-tuned model at the seed's shapes), e2e re-measured with its model built on the GPU, and
# 8 layers at 100 steps a layer stage (fixed costs amortised), e2e and stage=all in separate calls
step 120 $PY benchmarks/save_files.py --dir /tmp --layers 4 --repeats 2 --out "$OUT/save_files.json"
step 300 $PY benchmarks/datapath.py --preset seed --batch-size 8 --seq-len 2048 --parts all --layers 8 \
  --sides e2e --set callbacks=none --output-root "$ROOT" --out "$OUT/e2e_8L.json"
rm -rf "$ROOT"
fi

if [ "$PART" = 7 ] || [ "$PART" = 8 ]; then
# 8 layers at 100 steps a layer stage (200 for stage 1): PART=7 the e2e side (~450 s), PART=8 stage=all
SIDE=$([ "$PART" = 7 ] && echo e2e || echo all)
step 560 $PY benchmarks/datapath.py --preset seed --batch-size 8 --seq-len 2048 --parts all --layers 8 \
  --all-steps 100 --stores auto --sides $SIDE --set callbacks=none --output-root "$ROOT" --out "$OUT/${SIDE}_8L_100.json"
rm -rf "$ROOT"
fi

if [ "$PART" = 9 ]; then
# the ninth lease set: the compute-only step's batch at the stages' mean mask rate (0.525, was one
# random draw: 0.426 at 4 x 512, 0.562 at 8 x 2048); the step beside its peers and the measured peak
# at 8 x 2048, and the 4 x 512 stage fed from its cache beside its compute-only step
step 200 $PY benchmarks/run.py --device cuda --model seed --seq-len 2048 --batch-size 8 --stages layer \
  --attention gqa,mla --compile both --steps 10 --cache-rows 0 --out "$OUT/step_8x2048.json"
step 300 $PY benchmarks/datapath.py --preset seed --batch-size 4 --seq-len 512 --parts disk,feed \
  --layer-steps 400 --embed-steps 20 --output-root "$ROOT" --out "$OUT/feed_4x512.json"
rm -rf "$ROOT"
fi

if [ "$PART" = 10 ]; then
# 8 layers, stage=all (auto store) against stage=e2e on the same tokens, STEPS per layer stage (twice
# that for stage 1), an 8-step fine-tune, checkpoints off on both sides
step ${LIMIT:-560} $PY benchmarks/datapath.py --preset seed --batch-size 8 --seq-len 2048 --parts all --layers 8 \
  --all-steps ${STEPS:-20} --stores auto --sides all,e2e --set callbacks=none --output-root "$ROOT" \
  --out "$OUT/all_8L_${STEPS:-20}.json"
rm -rf "$ROOT"
fi

if [ "$PART" = 2 ]; then
# stage=all (every stage, caching, fusion, an 8-step fine-tune) vs stage=e2e on the same tokens:
# 40 steps for stage 1, 20 per layer stage, T 2048, B 8
step ${LIMIT:-560} $PY benchmarks/datapath.py --preset seed --batch-size 8 --seq-len 2048 --parts all --layers ${LAYERS:-4,8} \
  --all-steps 20 --finetune-steps 8 --stores ${STORES:-disk} --output-root "$ROOT" --out "$OUT/all_vs_e2e.json"
rm -rf "$ROOT"
fi
