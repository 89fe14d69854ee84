#!/usr/bin/env bash
# The estimator arena: d1, wd1, SPG and ESPO (methods.py --method) on the tiny Sudoku recipe, from the same SFT
# model, each for the same wall-clock budget (--time-budget), over seeds x CPU kernels, with one-step rollouts and
# with multi-step rollouts (d1's iterative decoding, where the one-step estimator is biased); the control: the same
# SFT continued on its labelled set for the same budget. Per run (OUT/$K-$SEED):
#   1. sft.py          the demo's SFT model (the tiny preset)                                       sft/
#   2. methods.py      for each MODE and METHOD, torchrun 2 processes, --time-budget BUDGET_$MODE   $MODE/$METHOD/
#   3. sft.py          the control, 1 process, the same budget                                      $MODE/sft_cont/
#   4. eval.py         every model (and the SFT start) on the held-out puzzles, greedy, decoded the way its mode
#                      rolls out                                                                    $MODE/eval_$ARM/
# then runs/arena_report.py writes the table and the reward curves (OUT/report.md). A stage whose output exists is
# skipped, so an interrupted arena continues where it stopped (delete OUT/... to redo a stage).
# Rough cost on 2 cores: 1.5 min SFT + per mode 5 x BUDGET + ~1.5 min of evaluation, per seed and kernel: with the
# defaults ~11 minutes each, ~2 hours for 5 seeds x 2 kernels.
#     bash runs/arena.sh                              SEEDS="0 1 2 3 4" KERNELS="native default" MODES="one multi"
#     SEEDS=0 KERNELS=native BUDGET_ONE=0.5 bash runs/arena.sh    # a quick look
#     OUT=out/arena_lr ARGS_wd1="--lr 3e-5" ARGS_spg="--lr 3e-5" bash runs/arena.sh   # a method's own flags
#     SHAPE=d1 OUT=out/arena_d1 bash runs/arena.sh    # d1's shape: one-blank labels (runs/shape.sh)
set -e
cd "$(dirname "$0")/.."
source runs/setup.sh
export TOKENIZERS_PARALLELISM=false
OUT=${OUT:-out/arena}
SEEDS=${SEEDS:-0 1 2 3 4}
KERNELS=${KERNELS:-native default}
MODES=${MODES:-one multi}
METHODS=${METHODS:-d1 wd1 spg espo}
BUDGET_one=${BUDGET_ONE:-1}       # minutes of training per run (rollouts included)
BUDGET_multi=${BUDGET_MULTI:-1}
source runs/shape.sh              # SHAPE=same|d1: what the labels are; SFT_N, the labelled set (the SFT
                                  # model's own, and the control's); at d1's shape RL_SHAPE sets lr 1e-4 for
                                  # every method (ARGS_<method> overrides it), CONT_LR the control's lr 1e-4
                                  # (3e-4 at SHAPE=same) and EVAL_N is 2,048
DECODE_one="--gen-length 40 --block-length 40 --steps 1"     # the tiny preset's one-step rollouts
DECODE_multi="--gen-length 40 --block-length 8 --steps 20"   # d1's: 2 tokens a step, in blocks
TASK="--task sudoku --prompt-style compact --blanks 3 6"     # for eval.py, which has no presets
PY=${PYTHON:-python3}
done_() { [ -f "$1/final/meta.json" ]; }
for SEED in $SEEDS; do      # seeds outside, kernels inside: an arena stopped early has both kernels of its seeds
  for K in $KERNELS; do
    D=$OUT/$K-$SEED
    mkdir -p $D
    if [ "$K" = native ]; then unset ATEN_CPU_CAPABILITY; else export ATEN_CPU_CAPABILITY=$K; fi
    done_ $D/sft || { echo "== $K seed $SEED: SFT"; $PY sft.py --model tiny --task sudoku --train-n $SFT_N $LABELS \
      --max-steps $SFT_STEPS --seed $SEED --out-dir $D/sft --overwrite; }
    for MODE in $MODES; do
      eval B=\$BUDGET_$MODE; eval DEC=\$DECODE_$MODE
      for METHOD in $METHODS; do
        done_ $D/$MODE/$METHOD && continue
        eval XA=\${ARGS_$METHOD:-}   # ARGS_<method>: extra flags for that method only (e.g. its own --lr)
        [ $METHOD = espo ] || XA="$RL_PROMPT $XA"   # ESPO never masks the prompt (its flag is refused)
        XA="$RL_SHAPE $XA"
        echo "== $K seed $SEED, $MODE-step rollouts: $METHOD for $B min"
        OMP_NUM_THREADS=1 $PY -m torch.distributed.run --nproc_per_node=2 --master_port=${PORT:-29551} methods.py \
          --model $D/sft/final --task sudoku --method $METHOD $DEC --data-seed $((SEED + 1)) --seed $SEED \
          --max-steps 100000 --time-budget $B --sample-every 0 --save-minutes 0 --out-dir $D/$MODE/$METHOD --overwrite $XA
      done
      done_ $D/$MODE/sft_cont || { echo "== $K seed $SEED, $MODE: SFT control for $B min"
        $PY sft.py --model $D/sft/final --task sudoku --train-n $SFT_N $LABELS --max-steps 100000 --lr $CONT_LR \
          --lr-schedule constant --warmup-steps 0 --eval-every 0 --no-keep-best --seed $((SEED + 1)) \
          --time-budget $B --save-minutes 0 --out-dir $D/$MODE/sft_cont --overwrite; }
      for ARM in sft sft_cont $METHODS; do
        M=$D/$MODE/$ARM; [ $ARM = sft ] && M=$D/sft
        [ -f $D/$MODE/eval_$ARM/summary.md ] || $PY eval.py --protocol clean --model $M/final $TASK $DEC \
          --limit $EVAL_N --batch-size 128 --out-dir $D/$MODE/eval_$ARM > /dev/null
      done
    done
  done
done
unset ATEN_CPU_CAPABILITY
$PY runs/arena_report.py $OUT --methods $METHODS --modes $MODES
