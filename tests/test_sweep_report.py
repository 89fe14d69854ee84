"""runs/sweep_report.py: the statistics the README's sweep table is made of, checked on hand-made runs."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_run(root, name, sft, cont, grpo):
    """One run's results.json with (solved, accuracy, given, sampled_reward) per model."""
    keys = ("solved", "accuracy", "given", "sampled_reward")
    os.makedirs(root / name)
    (root / name / "results.json").write_text(json.dumps(
        {m: dict(zip(keys, v), n=512) for m, v in (("sft", sft), ("sft_cont", cont), ("grpo", grpo))}))


def test_sweep_report_gives_mean_spread_worst_run_and_count_of_wins(tmp_path):
    write_run(tmp_path, "native-seed0", (0.02, 0.40, 0.9, 0.30), (0.05, 0.45, 0.9, 0.40), (0.04, 0.50, 0.8, 0.45))
    write_run(tmp_path, "default-seed0", (0.04, 0.42, 1.0, 0.32), (0.03, 0.44, 1.0, 0.35), (0.02, 0.38, 0.7, 0.31))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "runs", "sweep_report.py"), str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    summary = json.loads((tmp_path / "sweep.json").read_text())["summary"]
    d = summary["rl_minus_sft"]  # solved points per run: +2.0 and -2.0
    assert abs(d["mean"]) < 1e-9 and abs(d["min"] + 2.0) < 1e-9 and abs(d["max"] - 2.0) < 1e-9
    assert abs(d["std"] - 2.0 * 2 ** 0.5) < 1e-9 and d["positive"] == 1 and d["n"] == 2
    c = summary["rl_minus_control"]  # -1.0 and -1.0
    assert abs(c["mean"] + 1.0) < 1e-9 and c["positive"] == 0
    assert abs(summary["rl_minus_sft_cells"]["mean"] - 3.0) < 1e-9  # +10 and -4 cell points
    assert summary["rl_minus_control_cells"]["positive"] == 1  # +5 and -6 cell points
    assert abs(summary["rl_minus_control_cells"]["min"] + 6.0) < 1e-9
    assert abs(summary["sft"]["solved"]["mean"] - 3.0) < 1e-9 and abs(summary["grpo"]["given"]["min"] - 70.0) < 1e-9
    assert "| RL - SFT, solved | +0.0 | 2.8 | -2.0 | +2.0 | 1 of 2 |" in out
    assert "percentages of 512 held-out puzzles" in out  # the evaluations' own count (EVAL_N)
    assert (tmp_path / "sweep.md").read_text() == out.rstrip("\n") + "\n"


def test_sweep_report_lists_each_runs_sft_curve_kept_step_and_timings(tmp_path):
    write_run(tmp_path, "native-seed0", (0.02, 0.40, 0.9, 0.30), (0.05, 0.45, 0.9, 0.40), (0.04, 0.50, 0.8, 0.45))
    write_run(tmp_path, "native-seed1", (0.02, 0.40, 0.9, 0.30), (0.05, 0.45, 0.9, 0.40), (0.04, 0.50, 0.8, 0.45))
    results = json.loads((tmp_path / "native-seed0" / "results.json").read_text())
    results["sft"].update(kept_step=50, validation_loss={"0": 5.0, "50": 0.4, "100": 0.45})  # as tiny_report.py writes
    (tmp_path / "native-seed0" / "results.json").write_text(json.dumps(results))
    (tmp_path / "native-seed0" / "timings.json").write_text(json.dumps(
        {"sft": 100, "grpo": 120, "sft_cont": 110, "total": 400}))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "runs", "sweep_report.py"), str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    assert "| native-seed0 | 50 | 5.000, 0.400, 0.450 | 100 / 120 / 110 / 400 |" in out
    assert "| native-seed1 | 50" not in out  # no SFT curve: left out of that table, kept in the others
