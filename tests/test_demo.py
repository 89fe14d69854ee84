import json
import os
import subprocess

import pytest

from conftest import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_tiny_sudoku_demo_runs_every_stage_and_writes_its_table(tmp_path):
    """runs/tiny_sudoku.sh shortened (a few steps per stage): SFT, 2-process diffu-GRPO, the SFT-continued control,
    three evaluations and the report all run, and the report's numbers are the evaluations' numbers. (Whether RL
    beats SFT is measured by the full-length command, see README; at this length nothing is learned.)"""
    env = {**os.environ, "OUT": str(tmp_path), "SFT_STEPS": "20", "RL_BATCHES": "1", "MU": "2", "CONT_STEPS": "5",
           "EVAL_N": "8", "PORT": str(free_port()), "PYTHONUNBUFFERED": "1"}
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
        assert results[key]["n"] == 8
    assert "rollout batch 1 .. 1" in report  # the reward curve covers the RL stage
