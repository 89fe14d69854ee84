# What the labels are, for runs/tiny_sudoku.sh and runs/arena.sh (sourced; docs/demo.md). SHAPE=
#  same  labels for the very puzzles RL and the evaluation use (64 puzzles with 3-6 blanks, the mix objective): the
#        recipe end to end (the default), where continuing SFT beats RL in every run (docs/demo.md)
#  d1    d1's shape: d1's SFT data (s1K) holds no Sudoku, so here labels exist only for one-blank puzzles (4,000
#        rows on the training grids, about 2,500 of the 3,840 distinct ones), learned with d1's SFT objective (only
#        the answer masked, as d1 trains on s1K) until the one-blank skill saturates; RL trains with the reward alone
#        on 3-6-blank puzzles, which no label shows, and the evaluation uses those.
#        RL does not mask the prompt (--p-mask-prompt 0): a model that never saw a masked prompt in SFT gets its
#        log-probabilities from inputs unlike its training, and RL stalled with d1's 0.15
#        (docs/tiny_sudoku_rl_probes.md, section 7). SFT does not use the mix objective: a one-blank label with some
#        prompt cells masked is a many-blank label, so the labels would teach the target after all.
#        RL's lr is 1e-4, not the tiny preset's 3e-4: the SFT model sits at a near-zero loss, where Adam's steps are
#        lr-sized whatever the gradient's scale, and at 3e-4 the first step alone moved the policy to a KL of
#        0.2-0.95 from its start; in single-run probes 1e-4 was the one change that helped every run tried
#        (docs/tiny_sudoku_rl_probes.md, section 9).
#        The control trains at RL's lr too (CONT_LR): both arms continue the same converged model with the same
#        Adam lr. At 3e-4 the control random-walked around the SFT model's score (-5.9 to +6.4 points over 10 runs);
#        at 1e-4 it moved -1.5 to +4.5 over 20, and RL beat it in 19 of those 20, not all (docs/demo.md).
#        The evaluation uses 2,048 puzzles: the margins are a few points, and on 512 one puzzle is 0.2 of them.
#        RL runs 60 rollout batches, not 40: with the prompt unmasked every inner update sees the same input, so
#        diffu_grpo.py takes one reference pass per batch and no old pass (the same numbers), and 60 batches take
#        about the wall-clock 40 took without that: under the control's 650 steps in 9 of 10 sweep runs, over it
#        by 10 s in one whose batches ran slow (docs/demo.md; a margin for the control is still to be set).
# Sets LABELS (sft.py flags for SFT and the control), RL_SHAPE (diffu_grpo.py / methods.py flags every method takes)
# and RL_PROMPT (the prompt-masking flag, which ESPO refuses: it never masks the prompt), and the shape's defaults
# of SFT_N, SFT_STEPS, RL_BATCHES, CONT_STEPS, CONT_LR (the control's lr) and EVAL_N where the caller left them unset.
SHAPE=${SHAPE:-same}
if [ "$SHAPE" = d1 ]; then  # 650 control steps: about RL's 60 rollout batches' wall-clock (docs/demo.md)
  SFT_N=${SFT_N:-4000}; SFT_STEPS=${SFT_STEPS:-800}; CONT_STEPS=${CONT_STEPS:-650}; CONT_LR=${CONT_LR:-1e-4}
  EVAL_N=${EVAL_N:-2048}; RL_BATCHES=${RL_BATCHES:-60}
  LABELS="--blanks 1 1 --objective sft"; RL_SHAPE="--lr 1e-4"; RL_PROMPT="--p-mask-prompt 0"
elif [ "$SHAPE" = same ]; then  # a fixed labelled set of 64; the control's 450 steps are about RL's wall-clock
  SFT_N=${SFT_N:-64}; SFT_STEPS=${SFT_STEPS:-400}; CONT_STEPS=${CONT_STEPS:-450}; CONT_LR=${CONT_LR:-3e-4}
  EVAL_N=${EVAL_N:-512}; RL_BATCHES=${RL_BATCHES:-40}
  LABELS=""; RL_SHAPE=""; RL_PROMPT=""
else
  echo "SHAPE=$SHAPE: choose same or d1" >&2; exit 2
fi
