"""
The table and reward curves of runs/arena.sh: RL methods from the same SFT model at equal wall-clock, over runs.

    python runs/arena_report.py out/arena [--methods d1 wd1 spg espo] [--modes one multi]

For each rollout mode (one: one-step rollouts; multi: d1's multi-step decoding) and each arm (the SFT start, the
equal-time SFT control, each method) it reads the held-out evaluation (eval.py's generations.jsonl) of every run
OUT/<kernel>-<seed>, and for the RL arms their metrics.jsonl (rollout batches, seconds and forward passes per rollout
batch, the training reward). It prints and writes OUT/report.md and OUT/results.json: solve rate and cells as
mean +- std over runs with the worst run, the change against the SFT start and against the equal-time control
(mean +- std, worst run, and in how many runs it is above), and the mean training reward against training time.
"""

import argparse
import glob
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from runs.plot import text_chart  # noqa: E402

MODES = {"one": "one-step rollouts (the whole answer in one denoising step)",
         "multi": "multi-step rollouts (blocks of 8, 20 steps: d1's two tokens a step)"}


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def heldout(path):
    """(solve rate %, cell accuracy %) of one evaluation (the clean protocol's records)."""
    recs = read_jsonl(os.path.join(path, "generations.jsonl"))
    return (100 * sum(bool(r["correct"]) for r in recs) / len(recs),
            100 * sum(r["correct_cells"] for r in recs) / sum(r["blank_cells"] for r in recs))


def training(path):
    """An RL run's rollout batches, mean seconds and forward passes per rollout batch, and its reward curve
    [(training seconds at the batch's end, mean reward)]."""
    recs = read_jsonl(os.path.join(path, "metrics.jsonl"))
    t, curve = 0.0, []
    for r in recs:
        t += r["step_time"]
        curve.append((t, r["reward"]))
    mean = lambda k: statistics.mean(r[k] for r in recs)
    q = max(1, len(recs) // 4)  # the training reward of the first and the last quarter of the batches
    return dict(batches=len(recs), seconds=mean("step_time"), rollout_passes=mean("passes/rollout"),
                logp_passes=mean("passes/logp"), curve=curve, lr=max(r.get("lr", 0.0) for r in recs),
                reward_first=statistics.mean(r["reward"] for r in recs[:q]),
                reward_last=statistics.mean(r["reward"] for r in recs[-q:]))


sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0


def change(xs, base):
    d = [x - b for x, b in zip(xs, base)]
    return f"{statistics.mean(d):+.1f} +- {sd(d):.1f} (worst {min(d):+.1f}, above in {sum(v > 0 for v in d)}/{len(d)})"


def binned(curves, bins=10):
    """The mean over runs of the reward in `bins` equal slices of training time (x in minutes)."""
    end = min(c[-1][0] for c in curves)
    xs, ys = [], []
    for b in range(bins):
        lo, hi = end * b / bins, end * (b + 1) / bins
        vals = [r for c in curves for t, r in c if lo < t <= hi]
        if vals:
            xs.append(round(hi / 60, 2))
            ys.append(statistics.mean(vals))
    return xs, ys


def report(out, methods, modes):
    every = sorted(d for d in glob.glob(os.path.join(out, "*-*")) if os.path.isdir(os.path.join(d, "sft", "final")))
    lines, results = ["Runs: <kernel>-<seed>, each from its own SFT model; per mode every arm "
                      "trains for the same wall-clock budget. Held-out: eval.py's clean protocol on the demo's "
                      "held-out puzzles (3-6 blanks, grids never trained on), greedy, decoded the way the mode rolls "
                      "out. Solved and cells: mean +- std over runs (worst run); changes: per run, then mean +- std "
                      "(worst run, runs above)."], {}
    for mode in modes:
        res, arms = {}, ["sft", "sft_cont"] + methods
        runs = [d for d in every if all(os.path.exists(os.path.join(d, mode, f"eval_{a}", "generations.jsonl"))
                                        for a in arms)]  # the runs whose every arm is evaluated
        if not runs:
            continue
        for arm in arms:
            paths = [os.path.join(d, mode, f"eval_{arm}") for d in runs]
            res[arm] = {"heldout": [heldout(p) for p in paths]}
            if arm in methods:
                res[arm]["training"] = [training(os.path.join(d, mode, arm)) for d in runs]
            if arm != "sft":
                meta = [json.load(open(os.path.join(d, mode, arm, "final", "meta.json"))) for d in runs]
                res[arm]["train_seconds"] = [m.get("train_seconds") for m in meta]
                res[arm]["steps"] = [m.get("last_step") for m in meta]
        results[mode] = {"runs": [os.path.basename(d) for d in runs], **res}
        secs = [s for a in res.values() for s in a.get("train_seconds", []) if s]
        lines += ["", f"### {MODES.get(mode, mode)}", "",
                  f"{len(runs)} runs: {', '.join(os.path.basename(d) for d in runs)}.", "",
                  f"Training time per arm: {statistics.mean(secs):.0f} s on average (each run stops after the step "
                  f"that spends its budget)." if secs else "",
                  "", "| arm | solved % | cells % | vs SFT start, points | vs equal-time SFT control, points | "
                  "rollout batches (SFT steps) | s per rollout batch | forward passes per completion: rollout + "
                  "log-lik | lr | training reward, first -> last quarter |", "|---|---|---|---|---|---|---|---|---|---|"]
        base = [s for s, _ in res["sft"]["heldout"]]
        ctrl = [s for s, _ in res["sft_cont"]["heldout"]] if "sft_cont" in res else None
        for arm, r in res.items():
            solved, cells = [s for s, _ in r["heldout"]], [c for _, c in r["heldout"]]
            label = {"sft": "SFT start", "sft_cont": "SFT continued (control)"}.get(arm, arm)
            row = [f"{statistics.mean(solved):.1f} +- {sd(solved):.1f} (worst {min(solved):.1f})",
                   f"{statistics.mean(cells):.1f} +- {sd(cells):.1f}",
                   "-" if arm == "sft" else change(solved, base),
                   "-" if arm in ("sft", "sft_cont") or ctrl is None else change(solved, ctrl)]
            tr = r.get("training")
            if tr:
                row += [f"{statistics.mean(t['batches'] for t in tr):.0f}",
                        f"{statistics.mean(t['seconds'] for t in tr):.2f}",
                        f"{statistics.mean(t['rollout_passes'] for t in tr):.0f} + "
                        f"{statistics.mean(t['logp_passes'] for t in tr):.0f}",
                        "/".join(sorted({f"{t['lr']:.0e}" for t in tr})),
                        f"{statistics.mean(t['reward_first'] for t in tr):.3f} -> "
                        f"{statistics.mean(t['reward_last'] for t in tr):.3f}"]
            elif arm == "sft_cont":
                row += [f"({statistics.mean(r['steps']):.0f})", "-", "-", "-", "-"]
            else:
                row += ["-"] * 5
            lines.append(f"| {label} | " + " | ".join(row) + " |")
        lines += ["", "Per run, solved % (cells %):", "", "| run | " + " | ".join(arms) + " |",
                  "|---|" + "---|" * len(arms)]
        for i, d in enumerate(runs):
            lines.append(f"| {os.path.basename(d)} | " + " | ".join(
                "{:.1f} ({:.1f})".format(*res[a]["heldout"][i]) for a in arms) + " |")
        curves = {arm: binned([t["curve"] for t in r["training"]]) for arm, r in res.items() if r.get("training")}
        if curves:
            lines += ["", "Training reward (mean over runs) against training minutes:", "", "```",
                      text_chart(curves, xlabel="minutes"), "```"]
            plot_png(curves, os.path.join(out, f"reward_{mode}.png"), MODES.get(mode, mode))
    text = "\n".join(lines)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return text


def plot_png(curves, path, title):
    """The reward curves as a PNG when matplotlib is installed (the text chart is in report.md either way)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for arm, (xs, ys) in curves.items():
        ax.plot(xs, ys, label=arm, marker="o")
    ax.set_xlabel("training minutes")
    ax.set_ylabel("mean training reward")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    ap.add_argument("out", help="the arena's OUT directory (runs/arena.sh)")
    ap.add_argument("--methods", nargs="+", default=["d1", "wd1", "spg", "espo"])
    ap.add_argument("--modes", nargs="+", default=["one", "multi"])
    args = ap.parse_args(argv)
    print(report(args.out, args.methods, args.modes))


if __name__ == "__main__":
    main()
