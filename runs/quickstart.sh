#!/usr/bin/env bash
# The tiny model end to end on a CPU, through the same code the 8B model uses. Installs what is missing first.
# The tiny preset of sft.py (its PRESETS table) sets the laptop recipe; --help shows every value it changes.
set -e
cd "$(dirname "$0")/.."
source runs/setup.sh
export TOKENIZERS_PARALLELISM=false
OUT=${OUT:-out/quickstart}
echo "== 1. the tiny model and its tokenizer"
python3 model.py
echo "== 2. sampling from the (untrained) tiny model"
python3 sample.py --model tiny --prompt "sudoku 1030020040000301" --gen-length 48 --block-length 16 --steps 24
echo "== 3. masked SFT with the tiny preset: 64 labelled puzzles with 3-6 blanks, 400 steps (about a minute)"
python3 sft.py --model tiny --task sudoku --out-dir $OUT/sft --overwrite
rm -rf $OUT/eval
echo "== 4. evaluation on held-out puzzles (solution grids never seen in training)"
python3 eval.py --protocol clean --model $OUT/sft/final --task sudoku --prompt-style compact --blanks 3 6 \
  --gen-length 40 --block-length 40 --steps 1 --limit 256 --batch-size 64 --out-dir $OUT/eval
