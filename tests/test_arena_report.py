"""runs/arena_report.py and runs/fast_decoding.py --report on run folders written here: the numbers in their tables
are those of the files, combined as the headers say."""
import json
import os

from runs import arena_report, fast_decoding


def write_eval(path, solved_of_4, cells=(3, 4)):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "generations.jsonl"), "w") as f:
        for i in range(4):
            f.write(json.dumps({"correct": i < solved_of_4, "correct_cells": cells[0], "blank_cells": cells[1]}) + "\n")


def write_run(path, rewards, seconds, meta):
    os.makedirs(os.path.join(path, "final"), exist_ok=True)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for r in rewards:
            f.write(json.dumps({"reward": r, "step_time": seconds, "passes/rollout": 20, "passes/logp": 6,
                                "lr": 3e-4}) + "\n")
    with open(os.path.join(path, "final", "meta.json"), "w") as f:
        json.dump(meta, f)


def test_arena_report_gives_means_worst_runs_and_changes_against_the_start_and_the_control(tmp_path):
    # two runs: SFT start solves 1/4 and 2/4, the control 2/4 and 2/4, d1 3/4 and 1/4
    for run, (start, ctrl, d1) in {"native-0": (1, 2, 3), "default-0": (2, 2, 1)}.items():
        d = tmp_path / run
        os.makedirs(d / "sft" / "final")
        write_eval(d / "one" / "eval_sft", start)
        write_eval(d / "one" / "eval_sft_cont", ctrl)
        write_eval(d / "one" / "eval_d1", d1)
        write_run(d / "one" / "d1", [0.5, 0.7, 0.9], 2.0, {"train_seconds": 6.0, "last_step": 6})
        write_run(d / "one" / "sft_cont", [], 0, {"train_seconds": 6.0, "last_step": 40})
    text = arena_report.report(str(tmp_path), ["d1"], ["one"])
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "| 37.5 +- 17.7 (worst 25.0) | 75.0 +- 0.0 | - | - |" in rows["SFT start"]
    # d1 - start per run: +50 (native), -25 (default); d1 - control: +25, -25
    assert "| +12.5 +- 53.0 (worst -25.0, above in 1/2) | +0.0 +- 35.4 (worst -25.0, above in 1/2) | 3 | 2.00 | 20 + 6 | 3e-04 | " \
        "0.500 -> 0.900 |" in rows["d1"]
    assert "| native-0 | 25.0 (75.0) | 50.0 (75.0) | 75.0 (75.0) |" in text  # per run: sft, sft_cont, d1
    assert "(40)" in rows["SFT continued (control)"]
    res = json.load(open(tmp_path / "results.json"))
    assert res["one"]["d1"]["training"][0]["curve"] == [[2.0, 0.5], [4.0, 0.7], [6.0, 0.9]]


def test_fast_decoding_report_compares_each_setting_with_the_exact_sampler_on_the_same_blocks(tmp_path):
    for run, (exact, fast, t_exact, t_fast) in {"native-0": (50.0, 49.0, 12.0, 3.0),
                                                "default-0": (40.0, 41.0, 10.0, 4.0)}.items():
        os.makedirs(tmp_path / run / "decode")
        res = {"exact, block 40": dict(solved=exact, cells=80.0, seconds=t_exact, passes=20.0, n=4),
               "threshold 0.9 + prefix cache, block 40": dict(solved=fast, cells=79.0, seconds=t_fast, passes=7.0, n=4)}
        json.dump(res, open(tmp_path / run / "decode" / "decoding.json", "w"))
    text = fast_decoding.report([str(tmp_path / "native-0"), str(tmp_path / "default-0")])
    row = next(line for line in text.splitlines() if line.startswith("| threshold 0.9 + prefix cache, block 40"))
    # change: -1 and +1 -> mean 0, std 1.41, worst -1; speed-up 4x and 2.5x -> 3.25x (min 2.50x)
    assert "| 45.0 +- 5.7 | +0.00 +- 1.41 | -1.0 | 79.0 +- 0.0 | 3.5 | 7.0 | 3.25x (min 2.50x) |" in row
