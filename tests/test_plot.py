"""runs/plot.py draws any run's metrics.jsonl: every logged metric, several runs overlaid; text charts without
matplotlib."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "runs"))
import plot  # noqa: E402


def write_run(d, recs):
    os.makedirs(d)
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    return str(d)


def test_text_charts_overlay_runs_and_cover_every_logged_metric(tmp_path, capsys):
    rl = [{"step": 2 * i + 2, "reward": 0.1 * i, "rewards/sudoku_reward_func/mean": 0.1 * i, "kl": 0.01, "loss": 0.0,
           "lr": 3e-4, "grad_norm": 0.5, "clip_ratio/region_mean": 0.0} for i in range(10)]
    rl.insert(0, {"step": 0, "eval_accuracy": 0.2, "eval_reward": 0.5})
    a = write_run(tmp_path / "a", rl)
    b = write_run(tmp_path / "b", [{**r, "reward": 1 - r["reward"]} if "reward" in r else r for r in rl])
    assert plot.main([a, b, "--text"]) == []
    out = capsys.readouterr().out
    for metric in ("reward", "rewards/sudoku_reward_func/mean", "kl", "clip_ratio/region_mean", "grad_norm", "lr",
                   "eval_accuracy", "eval_reward"):
        assert f"\n{metric}\n" in "\n" + out
    assert "* a  o b" in out
    sft = write_run(tmp_path / "sft", [{"step": 0, "eval_loss": 5.0}] + [{"step": s, "loss": 1 / s, "lr": 1e-3,
                                                                           "grad_norm": 1.0} for s in range(1, 9)])
    curves = plot.series(plot.read_runs([sft]))
    assert set(curves) == {"eval_loss", "loss", "grad_norm", "lr"} and curves["loss"]["sft"][0] == list(range(1, 9))


def test_pngs_when_matplotlib_is_there(tmp_path):
    pytest.importorskip("matplotlib")
    a = write_run(tmp_path / "a", [{"step": s, "reward": s / 10} for s in range(1, 5)])
    written = plot.main([a, "--out", str(tmp_path / "png")])
    assert [os.path.basename(p) for p in written] == ["reward.png"] and os.path.getsize(written[0]) > 1000
