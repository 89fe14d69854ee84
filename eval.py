"""
The d1 evaluation protocol: zero-shot prompts, "<reasoning>" prefilled after the assistant header, greedy decoding,
block length 32, steps = gen_length // 2, at generation lengths 128 / 256 / 512; full GSM8K and MATH500 test sets,
256 Countdown and 256 Sudoku items. Scoring is d1's (rewards.py's score_* functions): accuracy for GSM8K, MATH500
and Countdown; for Sudoku the fraction of correctly filled blank cells over the whole test set (we also report the
puzzle-level solve rate).

Batches are left-padded WITH an attention mask, so an item's generation does not depend on the batch size or on
which other items share its batch. (The reference evaluation feeds padded batches without a mask, so pad tokens are
attended and its scores change with the batch composition.)

    python eval.py --model tiny --task sudoku --prompt-style compact --gen-length 64 --limit 16
    torchrun --nproc_per_node=8 eval.py --model GSAI-ML/LLaDA-8B-Instruct --task all --gen-length 128 256 512
    python eval.py --rescore out/eval/generations.jsonl d1_outputs/gsm8k_256_rank*.json    # no model needed

Outputs in --out-dir: generations.rank{R}.jsonl while running (appended per batch, so a crash loses at most one
batch; a rerun skips items already there), then generations.jsonl (all ranks merged) and summary.md; run.json holds
the settings, and a rerun with other settings into the same --out-dir is refused rather than silently mixed.
"""

import argparse
import glob
import json
import os
import re
import time
from collections import defaultdict

import torch
import torch.distributed as dist
from tqdm import tqdm

from common import add_model_args, compute_cleanup, compute_init, print0, setup_model
from data import EVAL_PREFILL, TASKS, add_sudoku_args, load_task, sudoku_kwargs
from rewards import score
from sample import add_sampling_args, completion_mask, decode_completions, encode_prompts, generate

EVAL_TASKS = [t for t in TASKS if t != "s1k"]

# -----------------------------------------------------------------------------
# Scoring records (ours and the reference evaluation's)


def ground_truth(task, row):
    """The ground truth in the reference evaluation's format: countdown [numbers, target]; others a string."""
    if task == "countdown":
        return [list(row["nums"]), int(row["target"])]
    return row["solution"] if task == "sudoku" else row["answer"]


def score_generation(task, generation, truth, question=""):
    """Score one generation given the reference-format ground truth (Sudoku reads its puzzle from the question)."""
    if task == "countdown":
        row = {"nums": truth[0], "target": truth[1]}
    elif task == "sudoku":
        m = re.findall(r"(?<!\d)[0-4]{16}(?!\d)", question)
        row = {"puzzle": m[-1] if m else "0" * 16, "solution": str(truth)}
    else:
        row = {"answer": truth}
    return score(task, generation, row)


def summarize(records):
    """{(task, gen_length): metrics} from scored records. Sudoku accuracy is cell-level over the whole set (d1)."""
    groups = defaultdict(list)
    for r in records:
        groups[(r["task"], r.get("gen_length"))].append(r)
    out = {}
    for key, rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        n = len(rs)
        row = {"n": n, "solved": sum(bool(r["correct"]) for r in rs) / n}
        if key[0] == "sudoku":
            blanks = sum(r["blank_cells"] for r in rs)
            row["accuracy"] = sum(r["correct_cells"] for r in rs) / max(1, blanks)
        else:
            row["accuracy"] = row["solved"]
        lengths = [r["length"] for r in rs if r.get("length") is not None]
        row["mean_length"] = sum(lengths) / len(lengths) if lengths else None
        tps = [r["tokens_per_s"] for r in rs if r.get("tokens_per_s")]
        row["tokens_per_s"] = sum(tps) / len(tps) if tps else None
        out[key] = row
    return out


def markdown_table(summary):
    lines = ["| task | gen length | n | accuracy % | solved % | mean length | gen tokens/s |",
             "|---|---|---|---|---|---|---|"]
    for (task, L), r in summary.items():
        ml = "-" if r["mean_length"] is None else f"{r['mean_length']:.1f}"
        tps = "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.1f}"
        lines.append(f"| {task} | {L or '-'} | {r['n']} | {100 * r['accuracy']:.1f} | {100 * r['solved']:.1f} | "
                     f"{ml} | {tps} |")
    return "\n".join(lines)


def read_generation_file(path, task=None):
    """Records from our JSONL, or from a reference-evaluation JSON file ({"generations": [{"question",
    "prompt_input", "generations", "ground_truth"}]}); task and gen length of the latter come from --task or the
    file name (e.g. gsm8k_256_..._rank0.json)."""
    if path.endswith(".jsonl"):
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    with open(path) as f:
        data = json.load(f)
    name = os.path.basename(path).lower()
    task = task or next((t for t in EVAL_TASKS if t in name), None)
    if task is None:
        raise ValueError(f"{path}: cannot tell the task from the file name; pass --task")
    m = re.search(r"_(\d{2,4})(?:_|\.|$)", name)
    L = int(m.group(1)) if m else None
    return [{"task": task, "gen_length": L, "question": g.get("question", ""), "generation": g["generations"],
             "ground_truth": g["ground_truth"]} for g in data["generations"]]


def rescore(paths, task=None):
    """Re-score saved generations without a model; several per-rank files of one setup form one row."""
    records = []
    for p in paths:
        for r in read_generation_file(p, task):
            s = score_generation(r["task"], r["generation"], r["ground_truth"], r.get("question", ""))
            records.append({**r, **s})
    return summarize(records)


# -----------------------------------------------------------------------------
# Generation


def evaluate(model, tok, device, task, L, args, rank, world, out_dir):
    """Generate and score this rank's share of one (task, gen_length) setup, appending to its JSONL file."""
    rows = load_task(task, "test", args.data_path, args.prompt_style, n=args.limit, seed=args.data_seed,
                     **sudoku_kwargs(task, args))
    path = os.path.join(out_dir, f"generations.rank{rank}.jsonl")
    done = {(r["task"], r["gen_length"], r["idx"]) for p in glob.glob(os.path.join(out_dir, "generations*.jsonl"))
            for r in read_generation_file(p)}
    todo = [i for i in range(rank, len(rows), world) if (task, L, i) not in done]  # shard items over ranks
    prefill = EVAL_PREFILL if args.prefill is None and args.prompt_style == "d1" else (args.prefill or "")
    steps = args.steps or L // 2
    bar = tqdm(range(0, len(todo), args.batch_size), disable=rank != 0, desc=f"{task} L={L}", dynamic_ncols=True)
    for b in bar:
        idx = todo[b:b + args.batch_size]
        batch = [rows[i] for i in idx]
        ids, mask = encode_prompts(tok, [r["prompt"] for r in batch], device, prefill)
        t0 = time.perf_counter()
        # Sampling noise (temperature > 0, random remasking) from a generator seeded by (--seed, first item of the
        # batch): batches draw different noise, and a resumed run redraws exactly what the interrupted one drew.
        g = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + idx[0])
        out = generate(model, ids, mask, gen_length=L, block_length=min(args.block_length, L), steps=steps,
                       temperature=args.temperature, cfg_scale=args.cfg_scale, remasking=args.remasking,
                       threshold=args.threshold, prefix_cache=args.prefix_cache, generator=g)
        dt = time.perf_counter() - t0
        eos = model.cfg.eos_token_id
        texts = decode_completions(tok, out.completion, eos)
        lengths = completion_mask(out.completion, eos).sum(1).tolist()
        with open(path, "a") as f:
            for i, r, text, n in zip(idx, batch, texts, lengths):
                truth = ground_truth(task, r)
                rec = {"task": task, "gen_length": L, "idx": i, "question": r["question"],
                       "prompt": r["prompt"][-1]["content"], "generation": text, "ground_truth": truth,
                       "length": n, "tokens_per_s": len(batch) * L / dt,
                       **score_generation(task, text, truth, r["question"])}
                f.write(json.dumps(rec) + "\n")


def merge(out_dir):
    """All ranks' records -> generations.jsonl (sorted, one per item) and summary.md; returns the summary."""
    recs = {}
    for p in sorted(glob.glob(os.path.join(out_dir, "generations*.jsonl"))):
        for r in read_generation_file(p):
            recs[(r["task"], r["gen_length"], r["idx"])] = r
    records = [recs[k] for k in sorted(recs)]
    with open(os.path.join(out_dir, "generations.jsonl.tmp"), "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(os.path.join(out_dir, "generations.jsonl.tmp"), os.path.join(out_dir, "generations.jsonl"))
    for p in glob.glob(os.path.join(out_dir, "generations.rank*.jsonl")):
        os.remove(p)
    summary = summarize(records)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(markdown_table(summary) + "\n")
    return summary


# What decides the generations. A rerun into an out-dir that holds generations skips the items already there (that
# is how an interrupted run resumes), so those items must come from the same model and settings.
RUN_KEYS = ("model", "adapter", "dtype", "data_path", "prompt_style", "prefill", "data_seed", "blanks", "block_length",
            "steps", "temperature", "cfg_scale", "remasking", "threshold", "prefix_cache", "seed")


def check_run_config(args, rank):
    """Write OUT_DIR/run.json, or refuse to resume into an out-dir whose generations came from other settings."""
    path = os.path.join(args.out_dir, "run.json")
    cfg = {k: getattr(args, k) for k in RUN_KEYS}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = {k: (old.get(k), v) for k, v in cfg.items() if old.get(k) != v}
        if diff:
            raise SystemExit(f"{args.out_dir} holds generations from other settings ({diff}, as (there, now)); "
                             "a rerun there would reuse them. Pass a new --out-dir, or delete that one.")
    elif rank == 0:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(path, "w") as f:
            json.dump(cfg, f, indent=1)
    if dist.is_initialized():
        dist.barrier()


def get_args(argv=None):
    ap = argparse.ArgumentParser(description="d1 evaluation: generate, score, summarise; or --rescore saved files.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--task", default="all", choices=EVAL_TASKS + ["all"], help="task to evaluate")
    ap.add_argument("--data-path", default=None, help="local test file (Sudoku: d1's CSV) instead of the default")
    ap.add_argument("--prompt-style", default="d1", choices=["d1", "compact"], help="d1's prompts or compact ones")
    ap.add_argument("--prefill", default=None, help="text after the assistant header (default '<reasoning>' for d1)")
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N items (default: d1's sizes)")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of generated test sets (Sudoku, Countdown)")
    add_sudoku_args(ap)
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per generate call per rank")
    add_sampling_args(ap, gen_length=[128, 256, 512], block_length=32, steps=None, temperature=0.0,
                      several_lengths=True)
    ap.add_argument("--seed", type=int, default=0, help="seed of the sampling noise (with --temperature > 0)")
    ap.add_argument("--out-dir", default="out/eval", help="where generations and summary go")
    ap.add_argument("--rescore", nargs="+", default=None, metavar="FILE",
                    help="re-score saved generations (our .jsonl or the reference's .json) and exit; no model")
    return ap.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    if args.rescore:
        summary = rescore(args.rescore, None if args.task == "all" else args.task)
        print(markdown_table(summary))
        return summary
    rank, local_rank, world, device = compute_init(args.device)
    check_run_config(args, rank)
    model, tok, device = setup_model(args, local_rank)
    with torch.no_grad():
        for task in EVAL_TASKS if args.task == "all" else [args.task]:
            for L in args.gen_length:
                evaluate(model, tok, device, task, L, args, rank, world, args.out_dir)
    if world > 1:
        dist.barrier()
    summary = merge(args.out_dir) if rank == 0 else None
    if rank == 0:
        print0(markdown_table(summary))
        print0(f"generations: {os.path.join(args.out_dir, 'generations.jsonl')} | table: "
               f"{os.path.join(args.out_dir, 'summary.md')}")
    compute_cleanup()
    return summary


if __name__ == "__main__":
    main()
