# What the labels are, for runs/tiny_sudoku.sh and runs/arena.sh (sourced; docs/demo.md). SHAPE=
#  same  labels for the puzzles RL and the evaluation use (3-6 blanks): the recipe end to end (the default)
#  d1    d1's shape: labels exist only for one-blank puzzles (4,000 rows on the training grids, about 2,500 of the
#        3,840 distinct ones), learned with d1's SFT objective (only the answer masked, as d1 trains on s1K) until
#        the one-blank skill saturates; RL trains with the reward alone on 3-6-blank puzzles, which no label shows,
#        and the evaluation uses those. RL does not mask the prompt (--p-mask-prompt 0): a model that never saw a
#        masked prompt in SFT gets its log-probabilities from inputs unlike its training, and RL stalled with d1's
#        0.15 (docs/tiny_sudoku_rl_probes.md, section 7). Under the mix objective a one-blank label with some
#        prompt cells masked is a many-blank label, so the labels would teach the target after all.
# Sets LABELS (sft.py flags for SFT and the control) and RL_SHAPE (diffu_grpo.py / methods.py flags), and the
# shape's defaults of SFT_N, SFT_STEPS and CONT_STEPS where the caller left them unset.
SHAPE=${SHAPE:-same}
if [ "$SHAPE" = d1 ]; then  # 650 control steps: about RL's 40 rollout batches' wall-clock or more (docs/demo.md)
  SFT_N=${SFT_N:-4000}; SFT_STEPS=${SFT_STEPS:-800}; CONT_STEPS=${CONT_STEPS:-650}
  LABELS="--blanks 1 1 --objective sft"; RL_SHAPE="--p-mask-prompt 0"
elif [ "$SHAPE" = same ]; then  # a fixed labelled set of 64; the control's 450 steps are about RL's wall-clock
  SFT_N=${SFT_N:-64}; SFT_STEPS=${SFT_STEPS:-400}; CONT_STEPS=${CONT_STEPS:-450}
  LABELS=""; RL_SHAPE=""
else
  echo "SHAPE=$SHAPE: choose same or d1" >&2; exit 2
fi
