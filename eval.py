"""
Evaluation of the four d1 tasks, two protocols (--protocol):

    python eval.py --model out/sft/final --protocol clean --task sudoku --prompt-style compact --blanks 3 6 \
        --gen-length 40 --block-length 40 --steps 1            # the tiny SFT model on held-out puzzles

  d1     (default) what d1's evaluation runs, so numbers are comparable with the paper's table: d1's test items,
         subset and order (data/d1_eval.py: GSM8K and MATH500 in full, 256 of d1's Countdown and Sudoku files),
         d1's evaluation prompts verbatim with "<reasoning>" prefilled, greedy decoding, block 32,
         steps = gen_length // 2, 4 prompts per batch, and the whole generated canvas decoded WITH its special
         tokens, as d1's parser sees it. One deliberate difference: batches are left-padded WITH an attention mask
         (d1 attends to the pads, so its scores depend on which items share a batch); at --batch-size 1 the two
         are the same computation.
  clean  a leak-free setup of this project: generated Sudoku on solution grids held out from training, generated
         Countdown, the training prompts (or --prompt-style compact), and the text up to the first EOS.

Every generation is scored twice (scoring.py): by d1's parser bug for bug (--scoring d1, the default under the d1
protocol, printed with two decimals as d1 prints it) and by our corrected parser (ours). summary.md shows both.
Sudoku accuracy is the fraction of correctly filled blank cells over the whole set (d1); we also report the
puzzle-level solve rate.

    python eval.py --model tiny --protocol clean --task sudoku --prompt-style compact --gen-length 64 --limit 16
    torchrun --nproc_per_node=8 eval.py --model GSAI-ML/LLaDA-8B-Instruct --task all --gen-length 128 256 512
    python eval.py --rescore out/eval/generations.jsonl d1_outputs/gsm8k_256_rank*.json    # no model needed

Outputs in --out-dir: generations.rank{R}.jsonl while running (appended per batch, so a crash loses at most one
batch; a rerun skips items already there), then generations.jsonl (all ranks merged; each record holds `question`
and `input_text`, the exact text the tokenizer encoded) and summary.md; run.json holds the settings, and a rerun
with other settings into the same --out-dir is refused rather than silently mixed.
"""

import glob
import json
import os
import re
import sys
import time
from collections import defaultdict

import torch
import torch.distributed as dist
from tqdm import tqdm

import model as M
from common import cli, compute_cleanup, compute_init, print0, setup_model
from config import HelpFormatter, Parser, add_model_args
from data import EVAL_PREFILL, TASKS, add_sudoku_args, load_task, sudoku_kwargs
from data.d1_eval import PREFILL as D1_PREFILL, load_d1_eval
from rundir import check_out_dir, claim, release_out_dir
from sample import (add_sampling_args, check_sampling, completion_mask, decode_completions, generate, pad_left,
                    render_prompts, sampling_kwargs)
from scoring import score, sudoku_puzzle_of

SCORINGS = ("d1", "ours")

EVAL_TASKS = [t for t in TASKS if t != "s1k"]

# -----------------------------------------------------------------------------
# Scoring records (ours and the reference evaluation's)


def ground_truth(task, row):
    """The ground truth in the reference evaluation's format: countdown [numbers, target]; others a string."""
    if task == "countdown":
        return [list(row["nums"]), int(row["target"])]
    return row["solution"] if task == "sudoku" else row["answer"]


def score_generation(task, generation, truth, question=""):
    """Score one generation both ways, given the reference-format ground truth (Sudoku reads its puzzle from the
    question, as d1's parser does). Returns {"d1": {...}, "ours": {...}}."""
    if task == "countdown":
        row = {"nums": truth[0], "target": truth[1]}
    elif task == "sudoku":
        row = {"puzzle": sudoku_puzzle_of(question), "solution": str(truth)}
    else:
        row = {"answer": truth}
    return {s: score(task, generation, row, s) for s in SCORINGS}


def summarize(records, scoring="d1"):
    """{(task, gen_length): metrics} from scored records: `accuracy` and `solved` by the chosen scoring, and
    `accuracy_d1` / `accuracy_ours` side by side. Sudoku accuracy is cell-level over the whole set (d1)."""
    groups = defaultdict(list)
    for r in records:
        groups[(r["task"], r.get("gen_length"))].append(r)
    out = {}
    for key, rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        n = len(rs)
        row = {"n": n}
        for s in SCORINGS:
            sc = [r["scores"][s] for r in rs]
            row[f"solved_{s}"] = sum(bool(x["correct"]) for x in sc) / n
            if key[0] == "sudoku":
                row[f"accuracy_{s}"] = sum(x["correct_cells"] for x in sc) / max(1, sum(x["blank_cells"] for x in sc))
                row[f"given_{s}"] = sum(x.get("given_copied", 0) for x in sc) / max(1, sum(x.get("given_cells", 0)
                                                                                           for x in sc))
            else:
                row[f"accuracy_{s}"] = row[f"solved_{s}"]
        row["accuracy"], row["solved"], row["scoring"] = row[f"accuracy_{scoring}"], row[f"solved_{scoring}"], scoring
        if key[0] == "sudoku":
            row["given"] = row[f"given_{scoring}"]  # given cells copied: a health check, not d1's score
        lengths = [r["length"] for r in rs if r.get("length") is not None]
        row["mean_length"] = sum(lengths) / len(lengths) if lengths else None
        tps = [r["tokens_per_s"] for r in rs if r.get("tokens_per_s")]
        row["tokens_per_s"] = sum(tps) / len(tps) if tps else None
        out[key] = row
    return out


def markdown_table(summary):
    """accuracy % and solved % by the chosen scoring; then d1's parser and ours side by side, two decimals (d1's
    own print format)."""
    lines = ["| task | gen length | n | accuracy % | solved % | d1 parser % | our parser % | mean length | "
             "gen tokens/s |", "|---|---|---|---|---|---|---|---|---|"]
    for (task, L), r in summary.items():
        ml = "-" if r["mean_length"] is None else f"{r['mean_length']:.1f}"
        tps = "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.1f}"
        lines.append(f"| {task} | {L or '-'} | {r['n']} | {100 * r['accuracy']:.1f} | {100 * r['solved']:.1f} | "
                     f"{100 * r['accuracy_d1']:.2f} | {100 * r['accuracy_ours']:.2f} | {ml} | {tps} |")
    scoring = next(iter(summary.values()))["scoring"] if summary else "d1"
    return "\n".join(lines) + f"\n\n(accuracy and solved by the {scoring} parser; Sudoku accuracy counts blank cells)"


def read_generation_file(path, task=None):
    """Records from our JSONL, or from a reference-evaluation JSON file ({"generations": [{"question",
    "prompt_input", "generations", "ground_truth"}]}); task and gen length of the latter come from --task or the
    file name (e.g. gsm8k_256_..._rank0.json)."""
    if path.endswith(".jsonl"):
        with open(path) as f:
            lines = [line for line in f if line.strip()]
        out = []
        for i, line in enumerate(lines):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                if i < len(lines) - 1:
                    raise
                # the last line of an evaluation that was killed mid-write: its item is generated again
        return out
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


def rescore(paths, task=None, scoring="d1"):
    """Re-score saved generations without a model; several per-rank files of one setup form one row. A file that
    is missing or not a generations file is a usage error that names it."""
    records = []
    for p in paths:
        try:
            recs = read_generation_file(p, task)
            recs = [{**r, "task": r["task"], "generation": r["generation"], "ground_truth": r["ground_truth"]}
                    for r in recs]
        except OSError as e:
            raise M.UsageError(f"--rescore {p}: {e.strerror}") from None
        except (ValueError, KeyError, TypeError) as e:  # JSON errors are ValueErrors
            raise M.UsageError(f"--rescore {p}: not a generations file of eval.py or d1's evaluation "
                               f"({type(e).__name__}: {str(e)[:120]})") from None
        if not recs:
            raise M.UsageError(f"--rescore {p}: no generations in it")
        for r in recs:
            records.append({**r, "scores": score_generation(r["task"], r["generation"], r["ground_truth"],
                                                            r.get("question", ""))})
    return summarize(records, scoring)


# -----------------------------------------------------------------------------
# Generation


def data_path_for(task, args):
    """--data-path: 'TASK=PATH' entries name their task; a bare PATH is for the one task being evaluated."""
    for entry in args.data_path or []:
        name, sep, path = entry.partition("=")
        if sep and name == task:
            return path
        if not sep and args.task != "all":
            return entry
    return None


def test_rows(task, args):
    """The items of one task under the chosen protocol, as rows with `prompt`, `question` and scoring columns."""
    if args.protocol == "d1":
        rows = load_d1_eval(task, data_path_for(task, args))
        return rows[:args.limit] if args.limit else rows
    return list(load_task(task, "test", data_path_for(task, args), args.prompt_style, n=args.limit,
                          seed=args.data_seed, **sudoku_kwargs(task, args.blanks)))


def decode_for_scoring(tok, completion, eos_id, protocol):
    """The text the parser sees. d1: the whole generated canvas with its special tokens (<|eot_id|>, the trailing
    <|endoftext|> run), as d1 saves it; clean: the text up to the first EOS, special tokens removed."""
    if protocol == "d1":
        return tok.batch_decode(completion, skip_special_tokens=False)
    return decode_completions(tok, completion, eos_id)


def evaluate(model, tok, device, task, rows, L, args, rank, world, out_dir):
    """Generate and score this rank's share of one (task, gen_length) setup (its test rows), appending to its JSONL
    file."""
    path = os.path.join(out_dir, f"generations.rank{rank}.jsonl")
    if os.path.exists(path):  # a line cut by a kill mid-write is dropped before anything is appended after it
        with open(path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
    done = {(r["task"], r["gen_length"], r["idx"]) for p in glob.glob(os.path.join(out_dir, "generations*.jsonl"))
            for r in read_generation_file(p)}
    todo = [i for i in range(rank, len(rows), world) if (task, L, i) not in done]  # shard items over ranks
    if args.prefill is not None:
        prefill = args.prefill
    else:
        prefill = D1_PREFILL if args.protocol == "d1" else (EVAL_PREFILL if args.prompt_style == "d1" else "")
    steps = args.steps or L // 2
    eos = model.cfg.eos_token_id
    bar = tqdm(range(0, len(todo), args.batch_size), disable=rank != 0, desc=f"{task} L={L}", dynamic_ncols=True)
    for b in bar:
        idx = todo[b:b + args.batch_size]
        batch = [rows[i] for i in idx]
        inputs = render_prompts(tok, [r["prompt"] for r in batch], prefill)
        ids, mask = pad_left([tok(t, add_special_tokens=False)["input_ids"] for t in inputs], tok.pad_token_id, device)
        t0 = time.perf_counter()
        # Sampling noise (temperature > 0, random remasking) from a generator seeded by (--seed, first item of the
        # batch): batches draw different noise, and a resumed run redraws exactly what the interrupted one drew.
        g = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + idx[0])
        out = generate(model, ids, mask, **{**sampling_kwargs(args), "gen_length": L, "steps": steps,
                                            "block_length": min(args.block_length, L)}, generator=g)
        dt = time.perf_counter() - t0
        texts = decode_for_scoring(tok, out.completion, eos, args.protocol)
        lengths = completion_mask(out.completion, eos).sum(1).tolist()
        with open(path, "a") as f:
            for i, r, text, n, inp in zip(idx, batch, texts, lengths, inputs):
                truth = ground_truth(task, r)
                scores = score_generation(task, text, truth, r["question"])
                rec = {"task": task, "gen_length": L, "idx": i, "question": r["question"], "input_text": inp,
                       "generation": text, "ground_truth": truth, "length": n, "tokens_per_s": len(batch) * L / dt,
                       "forward_passes": out.forward_passes, "batch_seconds": dt, "batch_size": len(batch),
                       **scores[args.scoring], "scores": scores}
                f.write(json.dumps(rec) + "\n")


def merge(out_dir, scoring):
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
    summary = summarize(records, scoring)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(markdown_table(summary) + "\n")
    return summary


# What decides the generations. A rerun into an out-dir that holds generations skips the items already there (that
# is how an interrupted run resumes), so those items must come from the same model and settings.
RUN_KEYS = ("protocol", "model", "adapter", "dtype", "data_path", "prompt_style", "prefill", "data_seed", "blanks",
            "block_length",
            "steps", "temperature", "cfg_scale", "remasking", "threshold", "prefix_cache", "seed", "alg", "alg_temp",
            "top_p", "top_k")


def check_run_config(args, rank):
    """Write OUT_DIR/run.json, or refuse to resume into an out-dir whose generations came from other settings."""
    path = os.path.join(args.out_dir, "run.json")
    cfg = {k: getattr(args, k) for k in RUN_KEYS}
    existed = os.path.exists(path)  # every rank reads before rank 0 may write (no rank reads a half-written file)
    if existed:
        with open(path) as f:
            old = json.load(f)
        diff = {k: (old.get(k), v) for k, v in cfg.items() if old.get(k) != v}
        if diff:
            raise M.UsageError(f"{args.out_dir} holds generations from other settings ({diff}, as (there, now)); "
                               "a rerun there would reuse them. Pass a new --out-dir, or delete that one")
    if dist.is_initialized():
        dist.barrier()
    if not existed and rank == 0:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(cfg, f, indent=1)
        os.replace(path + ".tmp", path)
    if dist.is_initialized():
        dist.barrier()


def get_args(argv=None):
    ap = Parser(
        description="d1 evaluation: generate, score, summarise; or --rescore saved files. The default protocol is "
                    "d1's own (its test items, prompts, decoding and parser), because the point of evaluating a d1 "
                    "model is to compare with the paper's table; --protocol clean is the leak-free setup.",
        formatter_class=HelpFormatter, allow_abbrev=False)  # whole flag names: the export's settings see what was typed
    add_model_args(ap)
    w = ap.add_argument_group("what to evaluate")
    w.add_argument("--protocol", default="d1", choices=["d1", "clean"],
                   help="d1: d1's items (GSM8K, MATH500 in full; 256 of d1's Countdown and Sudoku files), prompts, "
                        "decoding and canvas decoding, for numbers comparable with the paper. clean: generated "
                        "Sudoku on held-out grids, generated Countdown, training prompts, text up to EOS")
    w.add_argument("--task", default="all", choices=EVAL_TASKS + ["all"], help="task to evaluate")
    w.add_argument("--limit", type=int, default=None, help="evaluate only the first N items (default: all of them)")
    w.add_argument("--scoring", default=None, choices=list(SCORINGS),
                   help="the parser behind `accuracy` (both are always computed and shown): d1 = d1's "
                        "parse_and_get_acc.py bug for bug, ours = corrected (default: d1 under --protocol d1, "
                        "ours under clean)")
    d = ap.add_argument_group("test data and prompts")
    d.add_argument("--data-path", default=None, nargs="+", metavar="[TASK=]PATH",
                   help="local test files instead of the defaults (d1: GSM8K/MATH500 instead of the hub; Countdown/"
                        "Sudoku instead of data/d1/); with --task all name each: gsm8k=G.jsonl math=M.jsonl")
    d.add_argument("--prompt-style", default="d1", choices=["d1", "compact"],
                   help="--protocol clean only: d1's training prompts or compact ones")
    d.add_argument("--prefill", default=None,
                   help="text after the assistant header (default: '<reasoning>' for d1 prompts, none for compact)")
    d.add_argument("--data-seed", type=int, default=0, help="--protocol clean: seed of the generated test sets")
    add_sudoku_args(d)
    add_sampling_args(ap, gen_length=[128, 256, 512], block_length=32, steps=None, temperature=0.0,
                      several_lengths=True)
    r = ap.add_argument_group("batching, noise and output")
    r.add_argument("--batch-size", type=int, default=4, help="prompts per generate call per rank (d1: 4)")
    r.add_argument("--seed", type=int, default=42, help="seed of the sampling noise (with --temperature > 0)")
    r.add_argument("--out-dir", default="out/eval", help="where generations and summary go")
    r.add_argument("--rescore", nargs="+", default=None, metavar="FILE",
                   help="re-score saved generations (our .jsonl or d1's .json) and exit; no model. Prints d1's "
                        "accuracy (two decimals) and ours beside it")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    typed = {a.dest for a in ap._actions for s in a.option_strings if any(t.split("=")[0] == s for t in argv)}
    if not args.rescore:
        export_settings(args, typed)
    if args.protocol == "d1" and args.prompt_style != "d1":
        ap.error("--prompt-style compact needs --protocol clean (the d1 protocol uses d1's evaluation prompts)")
    args.scoring = args.scoring or ("d1" if args.protocol == "d1" else "ours")
    bare = [p for p in args.data_path or [] if "=" not in p]
    if bare and (args.task == "all" or len(args.data_path) > 1):
        ap.error(f"--data-path {bare[0]}: with --task all or several paths, name the task: gsm8k={bare[0]}")
    for L in args.gen_length:
        try:
            block = L if args.alg else min(args.block_length, L)  # Dream's sampler has no blocks
            check_sampling(L, block, args.steps or L // 2, args.temperature, args.cfg_scale, args.remasking,
                           args.threshold, args.alg)
        except ValueError as e:
            ap.error(str(e))
    if args.limit is not None and args.limit < 1 or args.batch_size < 1:
        ap.error("--limit and --batch-size must be >= 1")
    return args


# The tiny recipe's evaluation (runs/tiny_sudoku.sh): its generated test set, compact prompts, and the one-step
# decoding of its 40-token answer region. An export of a tiny run is evaluated so unless flags say otherwise.
TINY_EVAL = dict(protocol="clean", prompt_style="compact", gen_length=[40], block_length=40, steps=1, batch_size=64)


def export_settings(args, typed):
    """--model is an export of a tiny run (its meta.json says so): the flags not typed take the export's own
    settings (task, blanks, prompt style, its canvas and decoding), so that it is not scored on d1's 8B protocol,
    which it cannot read. Says what it took."""
    meta = os.path.join(args.model, "meta.json")
    if not os.path.isfile(meta):
        return
    with open(meta) as f:
        run = json.load(f).get("args", {})
    if run.get("preset") != "tiny":
        return
    own = {**TINY_EVAL, "blanks": run.get("blanks")}
    if run.get("task") in EVAL_TASKS:
        own["task"] = run["task"]
    if "gen_length" in run:  # an RL export decodes as it rolled out
        own.update(gen_length=[run["gen_length"]], block_length=run["block_length"], steps=run["steps"])
    took = {k: v for k, v in own.items() if k not in typed and v is not None and getattr(args, k) != v}
    if not took:
        return
    for k, v in took.items():
        setattr(args, k, v)
    shown = " ".join(f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                     for k, v in took.items())
    print0(f"{args.model} is an export of a tiny run: evaluating with its own settings ({shown}); flags you type win")


def main(argv=None):
    args = get_args(argv)
    if args.rescore:
        summary = rescore(args.rescore, None if args.task == "all" else args.task, args.scoring)
        print(markdown_table(summary))
        return summary
    check_out_dir(args.out_dir)
    tasks = EVAL_TASKS if args.task == "all" else [args.task]
    rows = {task: test_rows(task, args) for task in tasks}  # a bad data file stops here, before the model loads
    rank, local_rank, world, device = compute_init(args.device)
    claim(args.out_dir)  # one live evaluation per out-dir: two would append to the same files
    check_run_config(args, rank)
    model, tok, device = setup_model(args, local_rank)
    if model.cfg.arch == "dream" and args.alg is None:
        # A Dream model decodes with Dream's sampler by default, by negative entropy: deterministic at temperature 0
        # (diffusion_generate's own default, origin, commits random positions)
        args.alg = "entropy"
        print0("Dream model: Dream's sampler (--alg entropy, the whole canvas; --block-length does not apply)")
    with torch.no_grad():
        announce(model, tok, device, rows, args, world)
        for task in tasks:
            for L in args.gen_length:
                evaluate(model, tok, device, task, rows[task], L, args, rank, world, args.out_dir)
    if world > 1:
        dist.barrier()
    summary = merge(args.out_dir, args.scoring) if rank == 0 else None
    if rank == 0:
        print0(markdown_table(summary))
        print0(f"generations: {os.path.join(args.out_dir, 'generations.jsonl')} | table: "
               f"{os.path.join(args.out_dir, 'summary.md')}")
    if world > 1:
        dist.barrier()
    release_out_dir()
    compute_cleanup()
    return summary


def announce(model, tok, device, rows, args, world):
    """Before the first generation: how much work this is (items x lengths, generate calls, forward passes) and an
    estimate of its time from one forward pass of the largest batch, timed here; a long one says how to shorten it."""
    items = sum(len(r) for r in rows.values())
    calls = sum(-(-len(r) // (args.batch_size * world)) for r in rows.values()) * len(args.gen_length)
    passes = sum(-(-len(r) // (args.batch_size * world)) * (args.steps or L // 2) for r in rows.values()
                 for L in args.gen_length)
    P, L = 64, max(args.gen_length)
    x = torch.full((min(args.batch_size, max(len(r) for r in rows.values())), P + L), tok.pad_token_id,
                   device=device)
    t0 = time.perf_counter()
    model(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    minutes = passes * (time.perf_counter() - t0) / 60
    print0(f"evaluating {items} items x {len(args.gen_length)} generation length(s) {args.gen_length} in batches of "
           f"{args.batch_size} per rank on {world} rank(s): {calls} generate calls, up to {passes:,} forward passes "
           f"per rank, about {minutes:.1f} minutes (from one timed forward pass; the exact sampler)")
    if minutes > 10:
        print0("note: that is long; --limit N, fewer --gen-length values, a larger --batch-size, or the fast sampler "
               "(--threshold 0.9 --prefix-cache) make it shorter")


if __name__ == "__main__":
    cli(main)
