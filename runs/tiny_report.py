"""
The table and reward curve of runs/tiny_sudoku.sh.

    python runs/tiny_report.py OUT_DIR

It reads what the real scripts wrote (eval.py's generations.jsonl,
greedy and sampled; diffu_grpo.py's metrics.jsonl; the stage timings) and prints + writes report.md (and reward.png
when matplotlib is installed; a text chart otherwise).
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from eval import read_generation_file, summarize  # noqa: E402
from rewards import sudoku_reward_func  # noqa: E402
from runs.plot import text_chart  # noqa: E402

ROWS = [("sft", "SFT"), ("sft_cont", "SFT continued (same labelled set)"), ("grpo", "SFT + diffu-GRPO")]


def heldout_reward(records):
    """Mean of the training reward (d1's sudoku_reward_func, strict <answer>...</answer> format) over the held-out
    generations: what RL optimises, measured on puzzles it never saw."""
    r = sudoku_reward_func(None, [x["generation"] for x in records], [x["question"] for x in records],
                           [x["ground_truth"] for x in records])
    return sum(r) / len(r)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def curves(xs, ys, sft_log):
    """The reward curve and SFT's validation curve as text charts (runs/plot.py), for report.md."""
    chart = text_chart({"reward": (xs, ys)}, xlabel="rollout batch")
    val = text_chart({"validation loss": ([m["step"] for m in sft_log], [m["eval_loss"] for m in sft_log])},
                     xlabel="SFT step")
    return (f"Reward curve (diffu-GRPO, training reward, 5-batch moving average):\n\n```\n{chart}\n```\n\n"
            f"SFT's validation loss:\n\n```\n{val}\n```\n")


def smooth(ys, k=5):
    return [sum(ys[max(0, i - k + 1):i + 1]) / len(ys[max(0, i - k + 1):i + 1]) for i in range(len(ys))]


def main(out):
    with open(os.path.join(out, "timings.json")) as f:
        info = json.load(f)
    lines = ["| model | solve rate % (greedy) | cell accuracy % (greedy) | given cells copied % | mean reward, greedy "
             "| mean reward, sampled as in RL | stage wall-clock (s) |", "|---|---|---|---|---|---|---|"]
    results = {}
    for key, name in ROWS:
        recs = read_generation_file(os.path.join(out, f"eval_{key}", "generations.jsonl"))
        sampled = read_generation_file(os.path.join(out, f"eval_sampled_{key}", "generations.jsonl"))
        s = next(iter(summarize(recs, "ours").values()))
        results[key] = dict(solved=s["solved"], accuracy=s["accuracy"], given=s["given"], reward=heldout_reward(recs),
                            sampled_reward=heldout_reward(sampled), n=s["n"])
        lines.append(f"| {name} | {100 * s['solved']:.1f} | {100 * s['accuracy']:.1f} | {100 * s['given']:.1f} | "
                     f"{results[key]['reward']:.3f} | "
                     f"{results[key]['sampled_reward']:.3f} | {info.get(key, float('nan')):.0f} |")
    table = "\n".join(lines)
    n = results["sft"]["n"]
    with open(os.path.join(out, "eval_sft", "run.json")) as f:
        run = json.load(f)  # eval.py's settings: the blank range and the decoding
    header = (f"Held-out: {n} puzzles with {run['blanks'][0]}-{run['blanks'][1]} blanks on the 48 solution grids never "
              f"used for training (data/sudoku.py split). Decoding: {run['steps']} denoising step(s), blocks of "
              f"{run['block_length']} tokens; greedy (temperature 0), and sampled at temperature 1 as in RL "
              f"(the policy "
              f"diffu-GRPO trains). Seeds: {info.get('seeds', '')}. Total wall-clock {info.get('total', 0):.0f} s "
              f"on {info.get('machine', '?')}.")
    if "labels" in info:  # SHAPE=d1: the labels are one-blank puzzles, RL and the evaluation use 3-6 blanks
        header += f" Shape: {info['shape']}; SFT's and the control's labels: {info['labels']}."
    sft_log = [m for m in read_jsonl(os.path.join(out, "sft", "metrics.jsonl")) if "eval_loss" in m]
    with open(os.path.join(out, "sft", "final", "meta.json")) as f:
        sft_meta = json.load(f)
    curve = ", ".join(f"{m['eval_loss']:.3f}" for m in sft_log)
    # SFT's curve and kept step go into results.json too, for runs/sweep_report.py
    results["sft"]["kept_step"] = sft_meta.get("best_step", sft_log[-1]["step"])
    results["sft"]["validation_loss"] = {m["step"]: m["eval_loss"] for m in sft_log}
    header += (f"\n\nSFT ran {sft_log[-1]['step']} steps and kept step {results['sft']['kept_step']}"
               f"'s weights; its validation loss (puzzles on training grids the labelled set does not use) at steps "
               f"{', '.join(str(m['step']) for m in sft_log)}: {curve}.")
    grpo = read_jsonl(os.path.join(out, "grpo", "metrics.jsonl"))
    xs = [m["batch"] for m in grpo]
    ys = smooth([m["reward"] for m in grpo])
    report = f"{header}\n\n{table}\n\n{curves(xs, ys, sft_log)}"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(xs, [m["reward"] for m in grpo], alpha=0.3, label="per batch")
        ax.plot(xs, ys, label="5-batch mean")
        ax.set_xlabel("rollout batch")
        ax.set_ylabel("training reward")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, "reward.png"), dpi=120)
        report += "\n![reward curve](reward.png)\n"
    except ImportError:
        pass
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(report)
    return results


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
