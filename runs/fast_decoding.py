"""
Exact vs fast decoding on a trained model: solve rate, cells, seconds and forward passes of each decoding setting.

    python runs/fast_decoding.py --model out/tiny_sudoku/sft/final --out-dir out/fast/decode   # one model
    python runs/fast_decoding.py --rl out/fast/native-0 --fast-rl "--threshold 0.9 --prefix-cache"
    python runs/fast_decoding.py --report out/fast/*-*/                                      # runs -> tables

The first form evaluates one model (through eval.py, the clean protocol on the demo's held-out Sudoku puzzles) with
every setting in SETTINGS and writes OUT_DIR/decoding.json. The second evaluates a run folder's SFT model and its
two RL models (rl_exact: exact multi-step rollouts, rl_fast: fast ones) with the exact and the fast decoding, into
RUN/rl.json. The third aggregates runs (e.g. seeds x kernels, runs/fast_decoding.sh) into markdown tables: per
setting, the solve-rate change against the exact sampler (mean, std, worst run), cells, seconds, forward passes and
the speed-up; per RL model, its gain over the SFT model it started from and its RL stage's wall-clock.

Every setting decodes the same 40-token answer region. The exact sampler is LLaDA's with steps = half the length
(d1's evaluation rule, two tokens committed per step), in blocks of 8 (five blocks, d1's 32-of-256 proportion) or in
one block of 40. The fast settings change the commit rule (a confidence threshold: commit every proposal at least
that confident, and at least one per step) and/or the cost of a pass (a prefix KV cache: one full pass per block,
then only the block and what follows run as queries); each is compared with the exact sampler on the same blocks.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = ["--task", "sudoku", "--protocol", "clean", "--prompt-style", "compact", "--blanks", "3", "6", "--gen-length",
        "40"]
E8, E40 = ["--block-length", "8", "--steps", "20"], ["--block-length", "40", "--steps", "20"]
# name: (eval.py flags, the exact setting it is compared with: the same blocks, the exact commit rule, no cache)
SETTINGS = {
    "exact, block 8": (E8, None),
    "prefix cache, block 8": (E8 + ["--prefix-cache"], "exact, block 8"),
    "threshold 0.9, block 8": (["--block-length", "8", "--threshold", "0.9"], "exact, block 8"),
    "threshold 0.9 + prefix cache, block 8": (["--block-length", "8", "--threshold", "0.9", "--prefix-cache"],
                                              "exact, block 8"),
    "exact, block 40": (E40, None),
    "threshold 0.9, block 40": (["--block-length", "40", "--threshold", "0.9"], "exact, block 40"),
    "threshold 0.9 + prefix cache, block 40": (["--block-length", "40", "--threshold", "0.9", "--prefix-cache"],
                                               "exact, block 40"),
    "threshold 0.99 + prefix cache, block 40": (["--block-length", "40", "--threshold", "0.99", "--prefix-cache"],
                                                "exact, block 40"),
}


def evaluate(model, out_dir, limit, batch_size, settings):
    """Each setting {name: eval.py flags} through eval.py (a subprocess: it sees this process's environment, kernels
    included). Returns {name: {solved, cells, seconds, passes, n}}."""
    res = {}
    for name, flags in settings.items():
        d = os.path.join(out_dir, name.replace(" ", "_").replace(",", "").replace("+", "and"))
        cmd = [sys.executable, os.path.join(ROOT, "eval.py"), "--model", model, *TASK, *flags, "--limit",
               str(limit), "--batch-size", str(batch_size), "--out-dir", d]
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        with open(os.path.join(d, "generations.jsonl")) as f:
            recs = [json.loads(line) for line in f]
        sc = recs  # each record carries the scores of the protocol's parser
        res[name] = dict(solved=100 * sum(s["correct"] for s in sc) / len(sc),
                         cells=100 * sum(s["correct_cells"] for s in sc) / sum(s["blank_cells"] for s in sc),
                         seconds=sum(r["batch_seconds"] / r["batch_size"] for r in recs),  # each call's time, split
                         passes=statistics.mean(r["forward_passes"] for r in recs), n=len(sc))
        print(f"{name:40s} solved {res[name]['solved']:5.1f}%  cells {res[name]['cells']:5.1f}%  "
              f"{res[name]['seconds']:6.2f} s  {res[name]['passes']:5.1f} passes", flush=True)
    return res


def rl_runs(run, limit, batch_size, fast_flags):
    """RUN/{sft,rl_exact,rl_fast}/final, each decoded exactly and with the fast RL rollouts' decoding -> RUN/rl.json."""
    settings = {"exact": SETTINGS["exact, block 8"][0], "fast": ["--block-length", "8", "--steps", "20", *fast_flags.split()]}
    res = {}
    for m in ("sft", "rl_exact", "rl_fast"):
        print(f"-- {run}/{m}")
        res[m] = evaluate(os.path.join(run, m, "final"), os.path.join(run, "rl_eval", m), limit, batch_size, settings)
        if m != "sft":
            with open(os.path.join(run, m, "wallclock.json")) as f:
                res[m]["rl_seconds"] = json.load(f)["seconds"]
    res["fast_flags"] = fast_flags
    with open(os.path.join(run, "rl.json"), "w") as f:
        json.dump(res, f, indent=1)


sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0
ms = lambda xs: f"{statistics.mean(xs):.1f} +- {sd(xs):.1f}"


def rl_report(runs, names):
    """The RL table: per model, solved (exact and fast decoding), gain over its SFT model, RL wall-clock."""
    lines = [f"RL from each run's SFT model, {names}; fast = {runs[0]['fast_flags']}; solved % as mean +- std over runs, "
             "gain = the RL model minus its own SFT model (mean +- std, worst run)", "",
             "| model | solved %, exact decoding | gain, exact | worst gain | solved %, fast decoding | gain, fast | "
             "worst gain | RL stage, s |", "|---|---|---|---|---|---|---|---|"]
    for m, label in (("sft", "SFT"), ("rl_exact", "RL, exact rollouts"), ("rl_fast", "RL, fast rollouts")):
        cells = []
        for dec in ("exact", "fast"):
            solved = [r[m][dec]["solved"] for r in runs]
            gain = [r[m][dec]["solved"] - r["sft"][dec]["solved"] for r in runs]
            cells += [ms(solved)] + (["-", "-"] if m == "sft" else [f"{statistics.mean(gain):+.1f} +- {sd(gain):.1f}",
                                                                     f"{min(gain):+.1f}"])
        secs = "-" if m == "sft" else f"{statistics.mean(r[m]['rl_seconds'] for r in runs):.0f}"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {secs} |")
    speed = [r["rl_exact"]["rl_seconds"] / r["rl_fast"]["rl_seconds"] for r in runs]
    lines += ["", f"RL stage speed-up with fast rollouts: {statistics.mean(speed):.2f}x (min {min(speed):.2f}x, max "
                  f"{max(speed):.2f}x)"]
    return "\n".join(lines)


def report(dirs):
    """Run folders (each with decode/decoding.json, maybe rl.json) -> markdown tables over runs."""
    runs = []
    for d in dirs:
        with open(os.path.join(d, "decode", "decoding.json")) as f:
            runs.append(json.load(f))
    names = ", ".join(os.path.basename(d.rstrip("/")) for d in dirs)
    lines = [f"Over {len(runs)} runs ({names}); "
             "solved and cells: mean +- std; change and speed-up: against the exact sampler on the same blocks and the same "
             "model (change: mean +- std, worst run); seconds and passes: per evaluation of the whole set, mean", "",
             "| decoding | solved % | change, points | worst change | cells % | seconds | forward passes per call "
             "| speed-up (time) |", "|---|---|---|---|---|---|---|---|"]
    for name in SETTINGS:
        if not all(name in r for r in runs):
            continue
        solved = [r[name]["solved"] for r in runs]
        base = SETTINGS[name][1] or name
        delta = [r[name]["solved"] - r[base]["solved"] for r in runs]
        cells = [r[name]["cells"] for r in runs]
        secs = [r[name]["seconds"] for r in runs]
        speed = [r[base]["seconds"] / r[name]["seconds"] for r in runs]
        lines.append(f"| {name} | {statistics.mean(solved):.1f} +- {sd(solved):.1f} | {statistics.mean(delta):+.2f} +- "
                     f"{sd(delta):.2f} | {min(delta):+.1f} | {statistics.mean(cells):.1f} +- {sd(cells):.1f} | "
                     f"{statistics.mean(secs):.1f} | {statistics.mean(r[name]['passes'] for r in runs):.1f} | "
                     f"{statistics.mean(speed):.2f}x (min {min(speed):.2f}x) |")
    rl = [os.path.join(d, "rl.json") for d in dirs if os.path.exists(os.path.join(d, "rl.json"))]
    if rl:
        rs = []
        for p in rl:
            with open(p) as f:
                rs.append(json.load(f))
        lines += ["", rl_report(rs, ", ".join(os.path.basename(os.path.dirname(p)) for p in rl))]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--model", help="the model to evaluate (an export folder)")
    ap.add_argument("--out-dir", help="where each setting's evaluation and decoding.json go")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS), metavar="NAME",
                    help="which settings (default: all)")
    ap.add_argument("--limit", type=int, default=512, help="held-out puzzles")
    ap.add_argument("--batch-size", type=int, default=128, help="puzzles per generate call")
    ap.add_argument("--rl", metavar="RUN", help="evaluate RUN's SFT and RL models (see above) instead")
    ap.add_argument("--fast-rl", default="--threshold 0.9 --prefix-cache",
                    help="--rl: the sampling flags of the fast rollouts, used as the fast decoding")
    ap.add_argument("--report", nargs="+", metavar="DIR", help="aggregate these run folders instead")
    args = ap.parse_args()
    if args.report:
        print(report(args.report))
        return
    if args.rl:
        return rl_runs(args.rl, args.limit, args.batch_size, args.fast_rl)
    if not (args.model and args.out_dir):
        ap.error("give --model and --out-dir (or --report DIR ...)")
    res = evaluate(args.model, args.out_dir, args.limit, args.batch_size, {k: SETTINGS[k][0] for k in args.settings})
    with open(os.path.join(args.out_dir, "decoding.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
