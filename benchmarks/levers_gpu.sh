#!/usr/bin/env bash
# The "closing the gap" sweep of the README: every lever of issue 5 on the shipped corpus with the
# small model, each combination run as stage=all then stage=e2e (the baseline at the same token
# budget: e2e's max_steps defaults to the layer-wise total, fine-tune included). Five Hydra sweeps
# share one GPU side by side (the small model leaves it mostly idle). From the repository root:
#     OUT=levers_out bash benchmarks/levers_gpu.sh
# then, wherever $OUT/results.tgz lands:
#     mkdir levers && tar xzf results_AB.tgz -C levers && stackwise-report levers --out levers/report
# SWEEPS="A B" (default "A B C") runs only those sweeps; one 10-minute device command fits A + B, or C, or S.
# A, B and C pin the settings that were the defaults when they ran (their experiment folders in
# benchmarks/results/2026-11-25-levers-h100 are named without those pins).
set -u
OUT=${OUT:-levers_out}
ROOT=${ROOT:-/tmp/levers}
PY=${PY:-python3}
LIMIT=${LIMIT:-560}
mkdir -p "$OUT" "$ROOT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{ date -u; nvidia-smi --query-gpu=name,memory.total --format=csv; $PY -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"; } >"$ROOT/machine.txt" 2>&1

# sample.enabled=false: the sample is not a measurement. The report is written afterwards from results.json.
common="hardware=gpu trainer.enable_progress_bar=false sample.enabled=false output_root=$ROOT"
inits="layerwise.init=random,identity,previous"
# A, B and C ran before their winners became the defaults: these pin the settings they ran with
then="layerwise.embed_budget=1 trainer.val_check_interval=50"
sweep() {  # sweep NAME OVERRIDES...: one Hydra multirun in the background
  local name=$1; shift
  timeout "$LIMIT" $PY -m stackwise.cli.train -m $common "$@" stage=all,e2e >"$ROOT/log_$name.txt" 2>&1 &
}
SWEEPS=${SWEEPS:-A B C}  # one device command (10 min) fits A + B, or C
t0=$(date +%s)
for g in $SWEEPS; do case $g in
# A: how layer k >= 2 starts x the fusion fine-tune (80 steps = 9% of 880), 200 steps a stage
A) sweep a0 $then trainer.max_steps=200 $inits fusion.finetune_steps=0
   sweep a80 $then trainer.max_steps=200 $inits fusion.finetune_steps=80 ;;
# B: the per-stage budget moved towards stage 1 (embeddings + layer 1): 320 + 3 x 160 = 800
B) sweep b0 $then $inits +stages.embed.trainer.max_steps=320 +stages.layer.trainer.max_steps=160 fusion.finetune_steps=0
   sweep b80 $then $inits +stages.embed.trainer.max_steps=320 +stages.layer.trainer.max_steps=160 fusion.finetune_steps=80 ;;
# C: twice the budget (400 steps a stage), fine-tune 160 steps (9%)
C) for init in random identity previous; do
     sweep "c160_$init" $then layerwise.init=$init trainer.max_steps=400 fusion.finetune_steps=160
   done ;;
# S: seed variance of the winner (the defaults since) and of plain greedy layer-wise training,
#    and the winner in fp32 on the GPU (to compare with the CPU's fp32 run of the same settings)
S) for seed in 0 1 2; do
     sweep "s_default_$seed" seed=$seed
   done
   for seed in 1 2; do
     sweep "s_plain_$seed" seed=$seed layerwise.init=random layerwise.embed_budget=1 fusion.finetune_steps=0 \
       trainer.max_steps=200
   done
   sweep s_default_fp32 trainer.precision=32-true cache.dtype=float32 ;;
# R: sweeps A (no fine-tune) and B (with it) again with seeds 1 and 2, every init
R) for seed in 1 2; do
     sweep "r_a0_$seed" seed=$seed $then trainer.max_steps=200 layerwise.init=identity,previous fusion.finetune_steps=0
     sweep "r_b80_$seed" seed=$seed $then $inits +stages.embed.trainer.max_steps=320 \
       +stages.layer.trainer.max_steps=160 fusion.finetune_steps=80
   done ;;
# V: the activation cache sized to what the next stage reads (cache.train_sequences=auto), with one
#    view per sequence or two, seeds 0-2 (the defaults otherwise)
V) for seed in 0 1 2; do
     sweep "v1_$seed" seed=$seed cache.views=1 cache.train_sequences=auto
     sweep "v2_$seed" seed=$seed cache.views=2 cache.train_sequences=auto
   done ;;
esac; done
wait
echo "wall $(( $(date +%s) - t0 )) s" >>"$ROOT/machine.txt"
cat "$ROOT/machine.txt"
grep -h "error" "$ROOT"/log_*.txt | head -20
cd "$ROOT" && tar czf "$OUT/results_${SWEEPS// /}.tgz" machine.txt log_*.txt */results.json */hydra/*/.hydra/overrides.yaml
