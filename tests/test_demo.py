import json
import os
import subprocess

import pytest

import model as M
from conftest import blank_cell_probability, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_tiny_sudoku_demo_runs_every_stage_and_rl_raises_the_held_out_reward(tmp_path):
    """runs/tiny_sudoku.sh shortened: the full SFT stage (64 puzzles, early-stopped on its validation loss), 100 of
    the 180 rollout batches of 2-process diffu-GRPO, a short SFT-continued control, and evaluations on 256 held-out
    puzzles. Every stage runs, the report's numbers are the evaluations' numbers, and RL raised the held-out reward:
    greedy, and the expected reward of the policy it trains (one-step sampling at temperature 1), measured without
    sampling noise."""
    env = {**os.environ, "OUT": str(tmp_path), "RL_BATCHES": "100", "CONT_STEPS": "20", "EVAL_N": "256",
           "PORT": str(free_port()), "PYTHONUNBUFFERED": "1"}
    out = subprocess.run(["bash", os.path.join(ROOT, "runs", "tiny_sudoku.sh")], env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = (tmp_path / "report.md").read_text()
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"sft", "sft_cont", "grpo"}
    for key, name in [("sft", "| SFT |"), ("sft_cont", "| SFT continued"), ("grpo", "| SFT + diffu-GRPO |")]:
        assert name in report
        summary = (tmp_path / f"eval_{key}" / "summary.md").read_text()
        assert f"| {100 * results[key]['accuracy']:.1f} | {100 * results[key]['solved']:.1f} |" in summary
        assert results[key]["n"] == 256
        assert f"| {results[key]['sampled_reward']:.3f} |" in report
    assert "rollout batch 1 .. 100" in report  # the reward curve covers the RL stage
    assert "with 3-6 blanks" in report
    assert "SFT ran 500 steps and kept step 400's weights" in report  # early stopping, as in the full run
    assert results["grpo"]["reward"] > results["sft"]["reward"] + 0.01  # greedy, held out
    from data import load_task
    held_out = list(load_task("sudoku", "test", style="compact", n=256, min_blanks=3, max_blanks=6))
    tok = M.tiny_tokenizer()
    before = blank_cell_probability(M.load_model(str(tmp_path / "sft" / "final")), tok, held_out, gen_length=40)
    after = blank_cell_probability(M.load_model(str(tmp_path / "grpo" / "final")), tok, held_out, gen_length=40)
    assert after > before + 0.02, (before, after)  # full run (180 batches): 0.498 -> 0.566
