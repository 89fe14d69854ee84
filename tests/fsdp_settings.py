"""The tiny runs that tests/test_fsdp.py and tests/fsdp_two_ranks.py share."""
from conftest import TINY

SFT = ["--model", TINY, "--task", "sudoku", "--prompt-style", "compact", "--max-length", "80", "--train-n", "32",
       "--eval-n", "8", "--batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-3", "--warmup-steps", "2",
       "--objective", "sft", "--no-keep-best", "--blanks", "6", "10", "--eval-every", "3", "--max-steps", "6",
       "--save-every", "3", "--log-every", "100"]
RL = ["--model", TINY, "--task", "sudoku", "--prompt-style", "compact", "--train-n", "16", "--gen-length", "16",
      "--block-length", "8", "--steps", "4", "--num-generations", "3", "--prompts-per-step", "1",
      "--micro-batch-size", "3", "--lr", "1e-3", "--num-iterations", "2", "--max-steps", "4", "--sample-every", "0",
      "--log-every", "100", "--preset", "d1"]


def digits_reward(prompts, completions, **kw):
    """A reward that varies within a group even for a random model (so the advantages are not all zero)."""
    return [sum(ch.isdigit() for ch in c) / 10 for c in completions]
