#!/usr/bin/env bash
# Fast decoding on the tiny Sudoku demo, over seeds x CPU kernels:
#   1. sft.py                  the demo's SFT model (its tiny preset) for each SEED
#   2. runs/fast_decoding.py   that model decoded exactly (blocks of 8, 20 steps) and with each fast setting:
#                              solve rate, cells, seconds, forward passes
#   3. diffu_grpo.py           (RL=1) RL from it with multi-step rollouts, exact and fast (FAST_RL), each then
#                              decoded the way it rolled out, and the RL stage's wall-clock
# then one table over all runs (OUT/report.md). Kernels: native and ATEN_CPU_CAPABILITY=default (portable kernels
# that round like another CPU would). About 3 minutes per seed and kernel without RL, 10 with it, on 2 cores.
#     bash runs/fast_decoding.sh                    SEEDS="0 1 2" KERNELS="native default" RL=1
set -e
cd "$(dirname "$0")/.."
source runs/setup.sh
export TOKENIZERS_PARALLELISM=false
OUT=${OUT:-out/fast}
SEEDS=${SEEDS:-0 1 2}
KERNELS=${KERNELS:-native default}
RL=${RL:-1}
RL_BATCHES=${RL_BATCHES:-40}
EVAL_N=${EVAL_N:-512}
MULTI="--gen-length 40 --block-length 8 --steps 20"     # d1's decoding: steps = half the length, 2 tokens a step
FAST_RL=${FAST_RL:---threshold 0.9 --prefix-cache}
PY=${PYTHON:-python3}
for K in $KERNELS; do
  for SEED in $SEEDS; do
    D=$OUT/$K-$SEED
    mkdir -p $D
    if [ "$K" = native ]; then unset ATEN_CPU_CAPABILITY; else export ATEN_CPU_CAPABILITY=$K; fi
    echo "== $K seed $SEED: SFT"
    [ -f $D/sft/final/meta.json ] || $PY sft.py --model tiny --task sudoku --seed $SEED --out-dir $D/sft --overwrite
    echo "== $K seed $SEED: decoding settings"
    [ -f $D/decode/decoding.json ] || $PY runs/fast_decoding.py --model $D/sft/final --out-dir $D/decode --limit $EVAL_N
    if [ "$RL" = 1 ]; then
      for R in exact fast; do
        FLAGS=$MULTI; [ $R = fast ] && FLAGS="$MULTI $FAST_RL"
        if [ ! -f $D/rl_$R/final/meta.json ]; then
          echo "== $K seed $SEED: RL with $R multi-step rollouts ($FLAGS)"
          t0=$SECONDS
          OMP_NUM_THREADS=1 $PY -m torch.distributed.run --nproc_per_node=2 --master_port=${PORT:-29541} \
            diffu_grpo.py --model $D/sft/final --task sudoku --data-seed $((SEED + 1)) --seed $SEED $FLAGS \
            --max-steps $((RL_BATCHES * 2)) --sample-every 0 --out-dir $D/rl_$R --overwrite
          echo "{\"seconds\": $((SECONDS - t0))}" > $D/rl_$R/wallclock.json
        fi
      done
      $PY runs/fast_decoding.py --rl $D --limit $EVAL_N --fast-rl "$FAST_RL"
    fi
  done
done
unset ATEN_CPU_CAPABILITY
$PY runs/fast_decoding.py --report $OUT/*-*/ | tee $OUT/report.md
