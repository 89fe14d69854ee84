#!/usr/bin/env bash
# The robustness protocol of the tiny demo: runs/tiny_sudoku.sh over several seeds x two kernel settings, then one
# table of mean, spread and worst run (runs/sweep_report.py -> OUT/sweep.md, OUT/sweep.json).
#   native   this machine's vector kernels
#   default  ATEN_CPU_CAPABILITY=default, PyTorch's portable kernels: they round like another CPU would (the thread
#            count alone does not change results here)
# A run whose results.json exists is skipped, so an interrupted sweep resumes. About 5-10 minutes per run on 2 cores.
# Each (kernel, seed) run has its own port, so two sweeps (one per kernel setting) can run side by side.
#   bash runs/tiny_sudoku_sweep.sh                       # 5 seeds x 2 kernels, the default SHAPE=same
#   SHAPE=d1 bash runs/tiny_sudoku_sweep.sh              # d1's shape: one-blank labels (runs/shape.sh)
#   SEEDS="0 1" KERNELS=native bash runs/tiny_sudoku_sweep.sh
set -e
cd "$(dirname "$0")/.."
source runs/setup.sh
# The default OUT names the model and the shape: a finished run is skipped, so a sweep of one shape must not find
# another's runs in its directory.
ROOT=${OUT:-out/tiny_sudoku_sweep/${MODEL:-tiny}-${SHAPE:-same}}
SEEDS=${SEEDS:-0 1 2 3 4}
KERNELS=${KERNELS:-native default}
mkdir -p $ROOT
for kernel in $KERNELS; do
  for seed in $SEEDS; do
    run=$ROOT/$kernel-seed$seed
    if [ -f $run/results.json ]; then echo "== $run: done"; continue; fi
    echo "== $run"
    rm -rf $run  # a run that did not finish starts over (its logs append)
    port=$((29600 + seed % 100))  # native: 296xx, any other setting: 297xx
    if [ "$kernel" = native ]; then cap=""; else cap=$kernel; port=$((port + 100)); fi
    if ! env ${cap:+ATEN_CPU_CAPABILITY=$cap} OUT=$run SEED=$seed PORT=$port bash runs/tiny_sudoku.sh \
        > $ROOT/$kernel-seed$seed.log 2>&1; then
      echo "== $run FAILED (see $ROOT/$kernel-seed$seed.log); the sweep goes on"
    fi
  done
done
python3 runs/sweep_report.py $ROOT
