"""
The table of runs/tiny_sudoku_sweep.sh.

    python runs/sweep_report.py out/tiny_sudoku_sweep

Every run's results.json (runs/tiny_report.py) -> per-model mean, spread
(standard deviation, min, max) and worst run, and the differences that matter (RL - SFT, RL - control) per run.
Writes OUT/sweep.md and OUT/sweep.json.
"""

import glob
import json
import os
import statistics
import sys

MODELS = [("sft", "SFT"), ("sft_cont", "SFT continued (control)"), ("grpo", "SFT + diffu-GRPO")]
METRICS = [("solved", "solved %"), ("accuracy", "cells %"), ("given", "given cells copied %"),
           ("sampled_reward", "reward sampled as in RL, %")]
# (key, label, metric, the model RL is compared with): solved is the goal; cells is d1's own Sudoku score; the
# sampled reward is what diffu-GRPO optimises (its rollouts sample at temperature 1)
DIFFS = [("rl_minus_sft", "RL - SFT, solved", "solved", "sft"),
         ("rl_minus_control", "RL - control, solved", "solved", "sft_cont"),
         ("rl_minus_sft_cells", "RL - SFT, cells", "accuracy", "sft"),
         ("rl_minus_control_cells", "RL - control, cells", "accuracy", "sft_cont"),
         ("rl_minus_sft_sampled_reward", "RL - SFT, sampled reward", "sampled_reward", "sft")]


def stats(xs):
    return {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "min": min(xs),
            "max": max(xs)}


def sft_table(root, runs):
    """Per run: the SFT step whose weights were kept and SFT's validation loss at every evaluation (results.json, from
    runs/tiny_report.py), and the stages' wall-clock (timings.json). Runs without them are left out."""
    rows = []
    for name, r in runs.items():
        timings = os.path.join(root, name, "timings.json")
        if "kept_step" not in r["sft"] or not os.path.exists(timings):
            continue
        with open(timings) as f:
            t = json.load(f)
        rows.append(f"| {name} | {r['sft']['kept_step']} | " +
                    ", ".join(f"{loss:.3f}" for loss in r["sft"]["validation_loss"].values()) +
                    f" | {t['sft']} / {t['grpo']} / {t['sft_cont']} / {t['total']} |")
    return ["", "SFT per run: the step whose weights were kept, the validation loss at each evaluation, and the "
            "wall-clock in seconds (SFT / RL / control / whole demo with evaluations):", "",
            "| run | kept step | validation loss | seconds |", "|---|---|---|---|"] + rows if rows else []


def main(root):
    runs = {}
    for path in sorted(glob.glob(os.path.join(root, "*", "results.json"))):
        with open(path) as f:
            runs[os.path.basename(os.path.dirname(path))] = json.load(f)
    if not runs:
        sys.exit(f"no results.json under {root}")
    n = sorted({r["sft"]["n"] for r in runs.values()})  # EVAL_N: 512, or 2,048 at d1's shape (runs/shape.sh)
    lines = [f"{len(runs)} runs of runs/tiny_sudoku.sh ({', '.join(runs)}); percentages of "
             f"{' or '.join(map(str, n))} held-out puzzles, "
             "greedy one-step decoding.", "", "Per run:", "",
             "| run | SFT solved / cells | control solved / cells | RL solved / cells | RL - SFT solved | "
             "RL - control solved |", "|---|---|---|---|---|---|"]
    for name, r in runs.items():
        cell = lambda k: f"{100 * r[k]['solved']:.1f} / {100 * r[k]['accuracy']:.1f}"
        lines.append(f"| {name} | {cell('sft')} | {cell('sft_cont')} | {cell('grpo')} | "
                     f"{100 * (r['grpo']['solved'] - r['sft']['solved']):+.1f} | "
                     f"{100 * (r['grpo']['solved'] - r['sft_cont']['solved']):+.1f} |")
    summary = {}
    lines += ["", "Over all runs (mean +- standard deviation [min, max]):", "",
              "| model | " + " | ".join(m for _, m in METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for key, label in MODELS:
        summary[key] = {m: stats([100 * r[key].get(m, float("nan")) for r in runs.values()]) for m, _ in METRICS}
        lines.append(f"| {label} | " + " | ".join(
            f"{s['mean']:.1f} +- {s['std']:.1f} [{s['min']:.1f}, {s['max']:.1f}]"
            for s in (summary[key][m] for m, _ in METRICS)) + " |")
    lines += ["", "| difference, points | mean | std | worst run | best run | runs > 0 |", "|---|---|---|---|---|---|"]
    for key, label, metric, other in DIFFS:
        d = [100 * (r["grpo"][metric] - r[other][metric]) for r in runs.values()]
        summary[key] = {**stats(d), "positive": sum(x > 0 for x in d), "n": len(d)}
        s = summary[key]
        lines.append(f"| {label} | {s['mean']:+.1f} | {s['std']:.1f} | {s['min']:+.1f} | {s['max']:+.1f} | "
                     f"{s['positive']} of {len(d)} |")
    lines += sft_table(root, runs)
    text = "\n".join(lines) + "\n"
    with open(os.path.join(root, "sweep.md"), "w") as f:
        f.write(text)
    with open(os.path.join(root, "sweep.json"), "w") as f:
        json.dump({"runs": runs, "summary": summary}, f, indent=2)
    print(text)
    return summary


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
