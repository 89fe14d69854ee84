#!/usr/bin/env bash
# d1 on a laptop: the whole recipe with the tiny model on 4x4 Sudoku, through the real scripts, on CPU.
#   1. sft.py        masked SFT on a small FIXED set of labelled puzzles (256 puzzles, 600 steps; its held-out loss is
#                    still falling at the end: converging takes longer than this budget, see README "d1 on a laptop")
#   2. diffu_grpo.py torchrun, 2 processes (gloo): RL from that checkpoint on FRESH puzzles (--data-seed), reward only
#   3. sft.py        the control: the same SFT continued on the same labelled set (CONT_STEPS, about RL's wall-clock)
#   4. eval.py       all three on held-out puzzles whose solution grids were never seen in training, twice: greedy
#                    (the usual score) and sampled the way RL rolls out (the reward of the policy RL trains)
#   5. runs/tiny_report.py  the table (report.md) and the reward curve
# Every stage is seeded (SEED), so a rerun gives the same table; the timings are this machine's.
# Environment knobs (the slow test uses them to run a shortened version): OUT, SEED, SFT_N, SFT_STEPS, RL_BATCHES,
# CONT_STEPS, EVAL_N, PORT.
# Departures from d1's recipe, for the tiny model (measured, see README "d1 on a laptop"):
#  - one-step rollouts (--steps 1 over the whole canvas) at temperature 1: there the one-step estimator IS the
#    sampler's likelihood, and the tiny model gains little from more steps (53.6% vs 58.5% cells greedy);
#  - --p-mask-prompt 0: the tiny model's SFT never masks the prompt (LLaDA's SFT objective masks only the answer),
#    so a masked prompt is out of distribution for it (d1's 0.15 gave gradient norms ~30 and a collapse);
#  - full fine-tuning (no LoRA), lr 1e-4, beta 0 and mu 1: fresh puzzles cost nothing here, so each is used once.
set -e
cd "$(dirname "$0")/.."
source runs/setup.sh
export TOKENIZERS_PARALLELISM=false
OUT=${OUT:-out/tiny_sudoku}
SEED=${SEED:-0}
SFT_N=${SFT_N:-256}            # the fixed labelled set
SFT_STEPS=${SFT_STEPS:-600}
RL_BATCHES=${RL_BATCHES:-100}  # rollout batches of 2 ranks x 8 prompts x G=8 (mu = 1: one optimizer step each)
CONT_STEPS=${CONT_STEPS:-600}  # SFT-continued steps (about the RL stage's wall-clock on a 2-core CPU; see timings)
EVAL_N=${EVAL_N:-256}
PY=${PYTHON:-python3}
mkdir -p $OUT
ROLLOUT="--gen-length 48 --block-length 48 --steps 1 --temperature 1.0"  # how RL samples (and the sampled eval)
GREEDY="--gen-length 48 --block-length 16 --steps 24"                   # the usual evaluation: greedy, 24 steps

echo "== 1. SFT on $SFT_N labelled puzzles"
t0=$SECONDS
$PY sft.py --model tiny --task sudoku --prompt-style compact --max-length 96 --train-n $SFT_N --eval-n 64 \
  --batch-size 32 --micro-batch-size 32 --max-steps $SFT_STEPS --lr 3e-3 --warmup-steps 50 --eval-every 150 \
  --eps 0.2 --seed $SEED --save-every $SFT_STEPS --out-dir $OUT/sft
t_sft=$((SECONDS - t0))

echo "== 2. diffu-GRPO from the SFT model, 2 processes, fresh puzzles, reward only"
t0=$SECONDS
OMP_NUM_THREADS=1 $PY -m torch.distributed.run --nproc_per_node=2 --master_port=${PORT:-29533} diffu_grpo.py \
  --model $OUT/sft/final --task sudoku --prompt-style compact --data-seed $((SEED + 1)) $ROLLOUT --lora-r 0 \
  --beta 0 --p-mask-prompt 0 --num-generations 8 --prompts-per-step 8 --num-iterations 1 --lr 1e-4 \
  --max-grad-norm 1.0 --weight-decay 0 --micro-batch-size 64 --max-steps $RL_BATCHES --seed $SEED \
  --sample-every 0 --out-dir $OUT/grpo
t_rl=$((SECONDS - t0))

echo "== 3. control: SFT continued on the same labelled set"
t0=$SECONDS
$PY sft.py --model $OUT/sft/final --task sudoku --prompt-style compact --max-length 96 --train-n $SFT_N --eval-n 64 \
  --batch-size 32 --micro-batch-size 32 --max-steps $CONT_STEPS --lr 3e-4 --lr-schedule constant --warmup-steps 0 \
  --eval-every 0 --eps 0.2 --seed $((SEED + 1)) --lora-r 0 --out-dir $OUT/sft_cont
t_cont=$((SECONDS - t0))

echo "== 4. held-out evaluation (greedy, then sampled as in the rollouts)"
for m in sft sft_cont grpo; do
  $PY eval.py --model $OUT/$m/final --task sudoku --prompt-style compact $GREEDY --limit $EVAL_N --batch-size 64 \
    --out-dir $OUT/eval_$m
  $PY eval.py --model $OUT/$m/final --task sudoku --prompt-style compact $ROLLOUT --limit $EVAL_N --batch-size 64 \
    --seed $SEED --out-dir $OUT/eval_sampled_$m
done
cat > $OUT/timings.json <<EOF
{"sft": $t_sft, "grpo": $t_rl, "sft_cont": $t_cont,
 "seeds": "SFT $SEED, RL $SEED on puzzles of data seed $((SEED + 1)), SFT-continued $((SEED + 1)), test set 0, sampled eval $SEED",
 "machine": "$(nproc) CPU cores, $(uname -m)", "total": $SECONDS}
EOF
$PY runs/tiny_report.py $OUT
