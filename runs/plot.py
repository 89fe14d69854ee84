"""
Curves of any run: draws the metrics.jsonl of sft.py and diffu_grpo.py runs, several runs overlaid.

    python runs/plot.py out/grpo [out/grpo_seed1 ...] [--out DIR] [--text]

For each metric the runs have (diffu-GRPO: reward and each reward function's mean, kl, clip fraction, loss, lr,
grad-norm, validation accuracy and reward; SFT: loss, validation loss, lr, grad-norm) it writes DIR/<metric>.png
(default DIR: the first run's OUT_DIR/plots) with one line per run against the optimizer step. matplotlib is
optional: without it (or with --text) every metric is printed as a text chart instead, one symbol per run.
"""

import argparse
import json
import os

# The metrics worth a curve, in the order they are drawn; a run draws the ones it logged.
METRICS = ("reward", "rewards/*", "eval_accuracy", "eval_reward", "eval_loss", "loss", "kl", "clip_ratio/region_mean",
           "grad_norm", "lr")
SYMBOLS = "*o+x#@"


def read_runs(dirs):
    """{run name: [metrics.jsonl records]} for each OUT_DIR (the name is the directory's, made unique)."""
    runs = {}
    for d in dirs:
        path = os.path.join(d, "metrics.jsonl")
        if not os.path.exists(path):
            raise SystemExit(f"plot.py: {path} does not exist (pass the --out-dir of an sft.py or diffu_grpo.py run)")
        with open(path) as f:
            recs = [json.loads(line) for line in f if line.strip()]
        name = os.path.basename(os.path.normpath(d))
        runs[name if name not in runs else os.path.normpath(d)] = recs
    return runs


def series(runs):
    """{metric: {run: (steps, values)}} for the METRICS the runs logged (rewards/* expands to each function)."""
    out = {}
    for pattern in METRICS:
        for run, recs in runs.items():
            keys = sorted({k for r in recs for k in r if k.startswith("rewards/")}) if pattern == "rewards/*" \
                else [pattern]
            for key in keys:
                pts = [(r["step"], r[key]) for r in recs if isinstance(r.get(key), (int, float))]
                if pts:
                    out.setdefault(key, {})[run] = ([s for s, _ in pts], [v for _, v in pts])
    return out


def text_chart(lines, width=60, height=12, xlabel="optimizer step"):
    """A plain-text chart of one or more (xs, ys) series, one symbol each, on shared axes."""
    xs_all = [x for xs, _ in lines.values() for x in xs]
    ys_all = [y for _, ys in lines.values() for y in ys]
    x0, x1, lo, hi = min(xs_all), max(xs_all), min(ys_all), max(ys_all)
    hi = hi if hi > lo else lo + 1e-9
    grid = [[" "] * width for _ in range(height)]
    for sym, (xs, ys) in zip(SYMBOLS, lines.values()):
        for x, y in zip(xs, ys):
            c = round((x - x0) / max(1e-9, x1 - x0) * (width - 1))
            grid[height - 1 - round((y - lo) / (hi - lo) * (height - 1))][c] = sym
    rows = [f"{hi:9.4g} |" + "".join(grid[0])] + ["          |" + "".join(g) for g in grid[1:-1]]
    rows += [f"{lo:9.4g} |" + "".join(grid[-1]), "          +" + "-" * width, f"           {xlabel} {x0} .. {x1}"]
    if len(lines) > 1:
        rows.append("           " + "  ".join(f"{s} {name}" for s, name in zip(SYMBOLS, lines)))
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", metavar="OUT_DIR", help="run directories holding metrics.jsonl")
    ap.add_argument("--out", default=None, help="where the PNGs go (default: FIRST_OUT_DIR/plots)")
    ap.add_argument("--text", action="store_true", help="text charts even if matplotlib is installed")
    args = ap.parse_args(argv)
    curves = series(read_runs(args.dirs))
    plt = None
    if not args.text:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("plot.py: matplotlib is not installed (pip install matplotlib); text charts instead\n")
    if plt is None:
        for metric, lines in curves.items():
            print(f"{metric}\n{text_chart(lines)}\n")
        return []
    out = args.out or os.path.join(args.dirs[0], "plots")
    os.makedirs(out, exist_ok=True)
    written = []
    for metric, lines in curves.items():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for run, (xs, ys) in lines.items():
            ax.plot(xs, ys, label=run, marker="o" if len(xs) < 20 else None)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(metric)
        if len(lines) > 1:
            ax.legend()
        fig.tight_layout()
        written.append(os.path.join(out, metric.replace("/", "_") + ".png"))
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    print("\n".join(written))
    return written


if __name__ == "__main__":
    main()
