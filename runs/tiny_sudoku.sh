#!/usr/bin/env bash
# d1 on a laptop: the whole recipe with the tiny model on 4x4 Sudoku, through the real scripts, on CPU (~6-7 minutes
# on 2 cores), with d1's own diffu-GRPO knobs (random prompt masking p_mask 0.15, mu 2 inner updates, beta 0.04).
#   1. sft.py        masked SFT on a small FIXED set of labelled puzzles (64 puzzles) for SFT_STEPS steps, with
#                    --objective mix: half the sequences get LLaDA's SFT objective (answer masked), half its
#                    pre-training objective (every token maskable), so a partly masked prompt, which diffu-GRPO's
#                    p_mask shows the model, is in distribution. It exports the weights of its best validation loss
#                    (--keep-best; validation puzzles use grids no labelled puzzle uses). The tiny model starts from
#                    fan-in init (model.py: init_weights): with a fixed 0.02 it sat on a loss plateau (~0.55, digits
#                    learned, given cells not yet copied) until a step that depended on the CPU's float rounding
#   2. diffu_grpo.py torchrun, 2 processes (gloo): RL from that checkpoint on FRESH puzzles (--data-seed), reward only,
#                    d1's p_mask 0.15, mu 2 and beta 0.04
#   3. sft.py        the control: the same SFT continued on the same labelled set for about RL's wall-clock
#   4. eval.py       all three on held-out puzzles whose solution grids were never seen in training: greedy (solve
#                    rate, cell accuracy, given cells copied as a health check) and sampled the way RL rolls out
#   5. runs/tiny_report.py  the table (report.md, results.json) and the reward curve
# A rerun of the demo starts every stage over (--overwrite): OUT is the demo's own directory.
# Every stage is seeded (SEED), so a rerun on the same machine gives the same table. Another CPU rounds differently
# and gives another table inside the spread that runs/tiny_sudoku_sweep.sh measures (README).
# Environment knobs (the slow test and the sweep use them): OUT, SEED, SFT_N, SFT_STEPS, RL_BATCHES, CONT_STEPS,
# CONT_LR (the control's lr: 3e-4; RL's 1e-4 at d1's shape),
# EVAL_N (512; 2,048 at d1's shape), PORT, MODEL (tiny, or tiny-dream: the same recipe on the tiny Dream), and SHAPE
# (runs/shape.sh: same, or d1 = labels only for one-blank puzzles, RL with the reward alone and the evaluation on
# 3-6 blanks; docs/demo.md has its sweep).
# The trainers' tiny presets (PRESETS in sft.py and diffu_grpo.py, applied to --model tiny and to its exports) ARE
# this recipe; the commands below write only what differs from them. Choices for the tiny model (measured, see docs/):
#  - puzzles with 3-6 blanks (--blanks 3 6): with d1-sized 6-10 blanks every tiny model solves 0-2% of puzzles;
#  - one-step generation (--steps 1 over the whole answer) for rollouts AND evaluation: there the one-step
#    log-prob estimator IS the sampler's likelihood, so RL optimises exactly the policy that is scored;
#  - full fine-tuning (no LoRA), RL lr 3e-4 (5e-4 and 1e-3 collapsed in earlier designs).
set -e
cd "$(dirname "$0")/.."
source runs/setup.sh
export TOKENIZERS_PARALLELISM=false
OUT=${OUT:-out/tiny_sudoku}
SEED=${SEED:-0}
MODEL=${MODEL:-tiny}
source runs/shape.sh           # SHAPE=same (default) or d1: what the labels are (runs/shape.sh)
# RL_BATCHES (40; 60 at d1's shape): rollout batches of 2 ranks x 8 prompts x G=8, each used for mu = 2 optimizer steps
PY=${PYTHON:-python3}
mkdir -p $OUT
# The compact prompt is 46 tokens and the answer "<answer>DDDDDDDDDDDDDDDD</answer>" 33, so SFT's canvas is
# 46 + 40 = 86 tokens: an answer region of 40 (the rest EOS), the same 40 that RL and evaluation generate.
TASK="--task sudoku --prompt-style compact --blanks 3 6"   # for eval.py, which has no presets
ONE_STEP="--gen-length 40 --block-length 40 --steps 1"

echo "== 1. SFT on $SFT_N labelled puzzles"
t0=$SECONDS
$PY sft.py --model $MODEL --task sudoku --train-n $SFT_N $LABELS --max-steps $SFT_STEPS --seed $SEED \
  --out-dir $OUT/sft --overwrite
t_sft=$((SECONDS - t0))

echo "== 2. diffu-GRPO from the SFT model, 2 processes, fresh puzzles, reward only"
t0=$SECONDS
OMP_NUM_THREADS=1 $PY -m torch.distributed.run --nproc_per_node=2 --master_port=${PORT:-29533} diffu_grpo.py \
  --model $OUT/sft/final --task sudoku --data-seed $((SEED + 1)) --max-steps $((RL_BATCHES * 2)) --seed $SEED \
  --sample-every 0 --out-dir $OUT/grpo --overwrite $RL_SHAPE $RL_PROMPT
t_rl=$((SECONDS - t0))

echo "== 3. control: SFT continued on the same labelled set"
t0=$SECONDS
$PY sft.py --model $OUT/sft/final --task sudoku --train-n $SFT_N $LABELS --max-steps $CONT_STEPS --lr $CONT_LR \
  --lr-schedule constant --warmup-steps 0 --eval-every 0 --no-keep-best --seed $((SEED + 1)) --out-dir $OUT/sft_cont \
  --overwrite
t_cont=$((SECONDS - t0))

echo "== 4. held-out evaluation (greedy, then sampled as in the rollouts)"
rm -rf $OUT/eval_*  # eval.py would reuse the records of a previous demo's models
for m in sft sft_cont grpo; do
  $PY eval.py --protocol clean --model $OUT/$m/final $TASK $ONE_STEP --limit $EVAL_N --batch-size 128 --out-dir $OUT/eval_$m
  $PY eval.py --protocol clean --model $OUT/$m/final $TASK $ONE_STEP --temperature 1.0 --limit $EVAL_N --batch-size 128 \
    --seed $SEED --out-dir $OUT/eval_sampled_$m
done
cat > $OUT/timings.json <<EOF
{"sft": $t_sft, "grpo": $t_rl, "sft_cont": $t_cont,
 "seeds": "SFT $SEED, RL $SEED on puzzles of data seed $((SEED + 1)), SFT-continued $((SEED + 1)), test set 0, sampled eval $SEED",
 "shape": "$SHAPE", "labels": "$SFT_N puzzles, ${LABELS:-the RL and test distribution}",
 "machine": "$(nproc) CPU cores, $(uname -m), kernels ${ATEN_CPU_CAPABILITY:-native}", "total": $SECONDS}
EOF
$PY runs/tiny_report.py $OUT
