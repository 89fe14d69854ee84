"""
Stage 1 of d1: masked supervised fine-tuning with LLaDA's objective (Nie et al. 2025, Eq. 5 / SFT in Sec. 2.3).

A training pair is (prompt p0, answer r0). Noise is applied to the ANSWER only:
    t ~ U(0, 1) per sequence,  p = (1 - eps) t + eps,
    each answer token (its EOS padding included) becomes [MASK] with probability p; the prompt is never masked.
The model predicts every masked token from the partially masked sequence, and
    loss = E_t [ 1/L_r * sum_{i masked} -log p_theta(r0_i | p0, r_t) / p ]
with L_r the answer length of that sample (EOS padding included). The 1/p weight makes this an upper bound on the
negative log-likelihood (masked diffusion ELBO); the padding counts because learning to write EOS up to the end of
a fixed canvas is how the model learns to stop.

LLaDA's PRE-TRAINING objective (its Eq. 3) is the same estimator with every token maskable, the prompt included:
    loss = E_t [ 1/L * sum_{i masked} -log p_theta(x0_i | x_t) / p ]      (L = the whole sequence length)
d1 fine-tunes a model that went through both; a model trained here from scratch has seen only what this script
showed it. --objective pretrain uses Eq. 3, --objective mix draws one of the two per sequence (50/50, seeded). Mix
matters for diffu-GRPO's random prompt masking (p_mask > 0): a model that has only ever seen a clean prompt reads a
partly masked one out of distribution. The held-out loss is always the SFT one (what the answer costs).

Length: d1 pads every s1K example to 4096 tokens with EOS. We pad to --max-length (a fixed canvas, so the model
still learns to fill the rest with EOS) and truncate longer answers; the script reports how many were truncated.

Validation: every --eval-every steps, the same objective at fixed noise levels on held-out VALIDATION examples (never
test ones: this number picks models). With --patience K, training stops once K evaluations in a row fail to beat the
best one, and the export holds the best evaluation's weights ("train until the held-out score stops improving").

    python sft.py --model tiny --task sudoku --prompt-style compact                 # CPU, from scratch, minutes
    torchrun --nproc_per_node=2 sft.py --model tiny --task sudoku --prompt-style compact
    torchrun --nproc_per_node=8 sft.py --model GSAI-ML/LLaDA-8B-Instruct --task s1k --max-length 4096 \\
        --lora-r 128 --lora-alpha 256 --lr 1e-5 --epochs 20 --batch-size 8 --micro-batch-size 1 --grad-ckpt
"""

import argparse
import math
import os
import random
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import common
from common import (JsonlLog, add_export_args, add_model_args, all_reduce_grads, assert_ranks_in_sync, batch_for,
                    broadcast_params, compute_cleanup, compute_init, export_model, fmt_metrics, make_optimizer,
                    maybe_resume, print0, save_checkpoint, training_setup)
from data import add_sudoku_args, completion_text, load_task, sudoku_kwargs
from memory import Setting, check_fits


# -----------------------------------------------------------------------------
# Data: chat-templated prompt + answer + <|eot_id|>, right-padded with EOS to a fixed canvas.


def tokenize_examples(tokenizer, rows, max_length, eos_id):
    """rows with `prompt` (chat messages) and `completion` (text) -> (ids (N, max_length), prompt_lens (N,)),
    plus the number of examples whose answer was truncated. An example whose prompt alone fills the canvas is
    dropped (counted as truncated)."""
    seqs, plens, truncated = [], [], 0
    for r in rows:
        p = tokenizer(tokenizer.apply_chat_template(r["prompt"], tokenize=False), add_special_tokens=False)["input_ids"]
        a = tokenizer(r["completion"] + "<|eot_id|>", add_special_tokens=False)["input_ids"]
        if len(p) + len(a) > max_length:
            truncated += 1
            if len(p) >= max_length:
                continue
            a = a[:max_length - len(p)]
        seqs.append(p + a + [eos_id] * (max_length - len(p) - len(a)))
        plens.append(len(p))
    if not seqs:
        raise ValueError(f"every example's prompt is longer than --max-length {max_length}")
    return torch.tensor(seqs), torch.tensor(plens), truncated


# -----------------------------------------------------------------------------
# The objective


def sft_loss(model, ids, prompt_lens, mask_id, t, u, eps=1e-3):
    """ids (B, T) long; prompt_lens (B,); t (B,) noise levels in [0, 1]; u (B, T) uniforms deciding the mask.
    Returns the mean over the batch of (sum over masked answer tokens of CE / p) / answer length.
    prompt_lens is really "where the maskable part starts": pass 0 for a sequence and it gets LLaDA's PRE-TRAINING
    objective instead (every token maskable, normalised by the whole length; --objective pretrain|mix).
    t and u are inputs (not drawn here) so callers control the randomness: training draws them from a seeded
    generator, the held-out loss uses fixed t's, and tests compute the same number by hand."""
    B, T = ids.shape
    pos = torch.arange(T, device=ids.device)[None, :]
    answer = pos >= prompt_lens[:, None]  # (B, T) maskable: the answer and its EOS padding (SFT), or all (pre-training)
    p = ((1 - eps) * t + eps)[:, None]  # (B, 1) masking probability of each sequence
    masked = answer & (u < p)  # (B, T)
    noisy = torch.where(masked, torch.full_like(ids, mask_id), ids)
    # Logits only from the first answer position on (logits_slice): prompt positions are never masked, so their
    # logits would be thrown away; with a 126k vocabulary they are most of the memory of a long prompt.
    s = int(prompt_lens.min())
    logits = model(noisy, logits_slice=slice(s, T))  # (B, T - s, V); no attention mask: EOS padding is content
    ce = F.cross_entropy(logits.float().flatten(0, 1), ids[:, s:].flatten(), reduction="none").view(B, T - s)
    per_token = torch.where(masked[:, s:], ce / p, torch.zeros_like(ce))
    answer_len = answer.sum(1).clamp(min=1)  # (B,)
    return (per_token.sum(1) / answer_len).mean()


def noise_for(step, seed, n, T):
    """The noise of global step `step` for its n examples: (t (n,), u (n, T), coin (n,)) from a generator seeded
    from (seed, step) alone, so every rank draws the same numbers for the whole global batch (each takes its slice)
    and a resumed run draws exactly what the uninterrupted run drew. `coin` picks the objective under --objective mix."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.rand(n, generator=g), torch.rand(n, T, generator=g), torch.rand(n, generator=g)


def maskable_start(plens, coin, objective):
    """Where each sequence's maskable part starts. LLaDA trains with two objectives (llada.md): PRE-TRAINING masks
    every token (start 0), SFT only the answer (start = prompt length). 'mix' gives half the sequences each, so a
    model also learns to read a partly masked prompt, which diffu-GRPO's random prompt masking (p_mask) shows it."""
    if objective == "sft":
        return plens
    if objective == "pretrain":
        return torch.zeros_like(plens)
    return torch.where(coin < 0.5, torch.zeros_like(plens), plens)


def noise_levels(k):
    """k fixed noise levels spread over (0, 1): (i + 0.5) / k; k = 5 gives 0.1, 0.3, 0.5, 0.7, 0.9."""
    return tuple((i + 0.5) / k for i in range(k))


@torch.no_grad()
def heldout_loss(model, ids, plens, mask_id, batch_size, device, autocast, levels, rank=0, world=1):
    """The objective at fixed noise levels with a fixed mask pattern per level: an estimate that changes only
    when the weights change. The examples are sharded over ranks (rank r takes r, r + world, ...) and the sums
    all-reduced, so every rank gets the same number as one process would, at 1/world of the cost."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    mine = torch.arange(rank, len(ids), world)
    for k, t in enumerate(levels):
        g = torch.Generator().manual_seed(10_000 + k)
        u = torch.rand(ids.shape, generator=g)[mine]  # the same pattern per example whatever the world size
        for i in range(0, len(mine), batch_size):
            sl = mine[i:i + batch_size]
            with autocast:
                loss = sft_loss(model, ids[sl].to(device), plens[sl].to(device), mask_id,
                                torch.full((len(sl),), t, device=device), u[i:i + batch_size].to(device))
            total += loss.item() * len(sl)
            count += len(sl)
    model.train(was_training)
    if world > 1:
        t = torch.tensor([total, count], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        total, count = t.tolist()
    return total / count


# -----------------------------------------------------------------------------


def load_data(args):
    """(training rows, held-out rows). The held-out (validation) rows never come from the test split, because the
    held-out loss picks the model (--patience) and evaluation must not. They are the tail of the training rows,
    except for generated Sudoku: there they are fresh puzzles on training-split grids that no labelled puzzle uses
    (a puzzle on a memorised grid would flatter the loss)."""
    sudoku = args.task == "sudoku" and args.data_path in (None, "generate")
    if args.eval_n is None and args.train_n is not None:  # --eval-frac of a limited set
        args.eval_n = max(1, round(args.eval_frac * args.train_n))
    n_total = None if args.train_n is None else args.train_n + (0 if sudoku else args.eval_n)
    gen_kw = sudoku_kwargs(args.task, args)
    if args.sudoku_answers == "random" and args.task != "sudoku":
        raise ValueError("--sudoku-answers random is for --task sudoku")
    rows = load_task(args.task, "train", args.data_path, args.prompt_style, n=n_total, seed=args.seed, **gen_kw)
    if args.sudoku_answers == "random":
        rows = random_fill_answers(rows, args.seed, args.prompt_style)
    if args.eval_n is None:  # --eval-frac of the whole set (d1: 1% of s1K's 1000 = 10 examples)
        args.eval_n = max(1, round(args.eval_frac * len(rows)))
    if sudoku:
        seen, labelled = set(rows["solution"]), set(rows["puzzle"])
        pool = load_task("sudoku", "train", None, args.prompt_style, n=max(1000, 20 * args.eval_n),
                         seed=args.seed + 1_000_003, **gen_kw)
        held = pool.filter(lambda r: r["solution"] not in seen)
        if len(held) < args.eval_n:  # a large labelled set uses every training grid: settle for unseen puzzles
            print0(f"note: the {len(rows)} labelled puzzles use {len(seen)} grids, leaving too few for validation;"
                   f" validating on new puzzles of seen grids")
            held = pool.filter(lambda r: r["puzzle"] not in labelled)
        held = held.select(range(min(args.eval_n, len(held))))
        if args.sudoku_answers == "random":
            held = random_fill_answers(held, args.seed + 1, args.prompt_style)
    else:
        held, rows = rows.select(range(len(rows) - args.eval_n, len(rows))), rows.select(range(len(rows) - args.eval_n))
    return rows, held


def random_fill_answers(rows, seed, style):
    """Sudoku rows whose SFT answer is the puzzle with each blank ('0') replaced by a random digit 1-4 (seeded):
    the answer's format and its given cells are right, its blank cells carry no information about the solution."""
    rng = random.Random(seed)
    fill = lambda p: "".join(str(rng.randint(1, 4)) if ch == "0" else ch for ch in p)
    texts = [completion_text(fill(p), style) for p in rows["puzzle"]]
    return rows.remove_columns("completion").add_column("completion", texts)


# Unset flags take a preset. "s1k" is d1's sft_train.py as it ran (d1_eval.md, "Training-side facts"): LoRA r 128,
# alpha 256, dropout 0.05 on q/k/v; lr 1e-5, linear decay, no warmup; weight decay 0.1; grad-norm 1.0; 1 example per
# device x 4 accumulation steps (global batch 4 x GPUs); 20 epochs; 4096 tokens; 1% held out, evaluated every 100
# steps, best checkpoint kept; seed 42. "tiny" is for the generated tasks on a laptop (full fine-tuning of the tiny
# model), and every tiny command in the repo sets its own flags on top.
PRESETS = {
    "s1k": dict(lora_r=128, lora_alpha=256.0, lora_dropout=0.05, lora_targets="q_proj,k_proj,v_proj", lr=1e-5,
                lr_schedule="linear", warmup_steps=0, weight_decay=0.1, adam_betas=(0.9, 0.999), max_grad_norm=1.0,
                micro_batch_size=1, grad_accum=4, epochs=20, max_length=4096, eval_frac=0.01, eval_every=100,
                keep_best=True, seed=42),
    "tiny": dict(lora_r=None, lora_alpha=256.0, lora_dropout=0.0, lora_targets="q_proj,k_proj,v_proj", lr=1e-5,
                 lr_schedule="cosine", warmup_steps=10, weight_decay=0.0, adam_betas=(0.9, 0.999), max_grad_norm=1.0,
                 micro_batch_size=1, grad_accum=None, epochs=20, max_length=4096, eval_n=64, eval_every=50,
                 keep_best=False, seed=0),
}


def get_args(argv=None):
    ap = argparse.ArgumentParser(
        description="Masked SFT of LLaDA (d1 stage 1). Unset flags take a preset: --task s1k gets d1's sft_train.py "
                    "recipe; other tasks (generated, for the tiny model) get the 'tiny' preset. "
                    "The '(default: None)' of a flag means 'from the preset'.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # Model
    add_model_args(ap)
    ap.add_argument("--lora-r", type=int, default=None, help="LoRA rank; 0 = full fine-tuning (s1k: 128; tiny preset: 0 for --model tiny, else 128)")
    ap.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha, scale = alpha / r (s1k: 256)")
    ap.add_argument("--lora-dropout", type=float, default=None, help="LoRA dropout probability (s1k: 0.05)")
    ap.add_argument("--lora-targets", default=None, help="comma-separated module names (s1k: q_proj,k_proj,v_proj)")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (recompute blocks in backward)")
    ap.add_argument("--force", action="store_true", help="run even if the memory plan exceeds the GPU's memory")
    # Data
    ap.add_argument("--task", default="s1k", help="s1k (d1's SFT data), or sudoku/countdown (generated, for tiny runs)")
    ap.add_argument("--data-path", default=None, help="local dataset file/directory instead of the hub")
    ap.add_argument("--prompt-style", default="d1", choices=["d1", "compact"], help="d1's exact prompts or the compact ones")
    ap.add_argument("--train-n", type=int, default=None, help="number of training examples (generated tasks: how many)")
    ap.add_argument("--eval-n", type=int, default=None, help="held-out validation examples for the fixed-noise loss "
                    "(never test-split ones: see load_data; tiny: 64)")
    ap.add_argument("--eval-frac", type=float, default=None,
                    help="held-out fraction of the training set, when --eval-n is unset (s1k: 0.01)")
    add_sudoku_args(ap)
    ap.add_argument("--sudoku-answers", default="solutions", choices=["solutions", "random"],
                    help="generated Sudoku: the SFT answer is the solution, or the puzzle with every blank filled "
                         "by a random digit (teaches the answer format and copying the given cells, and no Sudoku: "
                         "like d1, whose SFT data s1K holds no Sudoku, RL must then supply the skill)")
    ap.add_argument("--objective", default="sft", choices=["sft", "pretrain", "mix"],
                    help="LLaDA's SFT objective (only the answer is masked), its pre-training objective (every "
                         "token maskable), or a 50/50 mix per sequence (a model that is to see diffu-GRPO's masked "
                         "prompts must have seen masked prompts); the held-out loss is always the SFT one")
    ap.add_argument("--max-length", type=int, default=None, help="canvas length: prompt + answer, EOS-padded (tokens; 4096)")
    # Optimization
    ap.add_argument("--epochs", type=float, default=None, help="passes over the training set (d1: 20)")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (overrides --epochs)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="global batch, examples per optimizer step over all ranks (default: world x "
                         "--micro-batch-size x --grad-accum; tiny: 8)")
    ap.add_argument("--micro-batch-size", type=int, default=None, help="examples per forward pass per rank (1)")
    ap.add_argument("--grad-accum", type=int, default=None,
                    help="micro-batches per rank per optimizer step, when --batch-size is unset (s1k: 4)")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (1e-5)")
    ap.add_argument("--lr-schedule", default=None, choices=["constant", "linear", "cosine"],
                    help="decay after warmup (s1k: linear, tiny: cosine)")
    ap.add_argument("--warmup-steps", type=int, default=None, help="linear warmup steps (s1k: 0, tiny: 10)")
    ap.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (s1k: 0.1, tiny: 0)")
    ap.add_argument("--adam-betas", type=float, nargs=2, default=None, help="AdamW betas (0.9 0.999)")
    ap.add_argument("--max-grad-norm", type=float, default=None, help="gradient clipping norm (1.0)")
    ap.add_argument("--eps", type=float, default=1e-3, help="minimum masking probability (p = (1-eps) t + eps)")
    ap.add_argument("--seed", type=int, default=None, help="seed for init (tiny), data order and noise (s1k: 42, tiny: 0)")
    # Logging and checkpoints
    ap.add_argument("--out-dir", default="out/sft", help="checkpoints, final export and metrics.jsonl go here")
    ap.add_argument("--eval-noise-levels", type=int, default=5,
                    help="noise levels of the held-out loss, (i + 0.5) / K for i < K: fewer is cheaper and noisier")
    ap.add_argument("--eval-every", type=int, default=None,
                    help="held-out loss every N steps, 0 = only at the end (s1k: 100, tiny: 50)")
    ap.add_argument("--keep-best", action=argparse.BooleanOptionalAction, default=None,
                    help="export the weights of the best held-out evaluation, not the last step's (s1k: on; keeps a "
                         "CPU copy of the trainable weights)")
    ap.add_argument("--patience", type=int, default=0,
                    help="early stopping: stop once the held-out loss has not improved for this many evaluations "
                         "(every --eval-every steps); implies --keep-best (0 = off)")
    ap.add_argument("--save-every", type=int, default=0, help="resumable checkpoint every N steps (0 = off)")
    ap.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint")
    ap.add_argument("--halt-after", type=int, default=None,
                    help="stop (checkpoint, no export) after this step, as if interrupted; continue with --resume")
    add_export_args(ap)
    args = ap.parse_args(argv)
    for k, v in PRESETS["s1k" if args.task == "s1k" else "tiny"].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.lora_r is None:  # the tiny model is fully fine-tuned; a real one gets LoRA r 128
        args.lora_r = 0 if args.model == "tiny" else 128
    args.keep_best = args.keep_best or args.patience > 0
    return args


class BestWeights:
    """Early stopping and --keep-best: the best held-out loss so far, its step, evaluations since it improved, and
    (with keep) a CPU copy of the trainable weights of that evaluation. Saved in checkpoints, so it survives --resume."""

    def __init__(self, params, keep, patience, record=None, state=None):
        self.params, self.keep, self.patience = params, keep, patience
        self.record = record or {"loss": float("inf"), "step": 0, "bad": 0}
        self.state = state

    def update(self, step, loss):
        """Record an evaluation; True when training should stop (--patience evaluations without improvement)."""
        if loss < self.record["loss"]:
            self.record = {"loss": loss, "step": step, "bad": 0}
            self.state = [p.detach().to("cpu", copy=True) for p in self.params] if self.keep else None
        else:
            self.record["bad"] += 1
        return bool(self.patience) and self.record["bad"] >= self.patience

    @torch.no_grad()
    def restore(self):
        for p, b in zip(self.params, self.state):
            p.copy_(b)


def train_step(model, params, opt, sched, batch, noise, args, rank, world, autocast, device):
    """One optimizer step on this rank's share of the global batch: micro-batches accumulate, gradients are
    averaged over ranks (= the mean over the global batch), clipped, applied. Returns the metrics."""
    ids, plens, idx = batch
    t_all, u_all, coin = noise
    per_rank = args.batch_size // world
    accum = per_rank // args.micro_batch_size
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    idx, t_all, u_all = idx[mine], t_all[mine], u_all[mine]
    starts = maskable_start(plens[idx], coin[mine], args.objective)
    loss_sum = 0.0
    for m in range(accum):
        sl = slice(m * args.micro_batch_size, (m + 1) * args.micro_batch_size)
        with autocast:
            loss = sft_loss(model, ids[idx[sl]].to(device), starts[sl].to(device), model.cfg.mask_token_id,
                            t_all[sl].to(device), u_all[sl].to(device), args.eps)
        (loss / accum).backward()
        loss_sum += loss.item() / accum
    all_reduce_grads(params, world)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm).item()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return {"loss": loss_sum, "grad_norm": grad_norm, "lr": sched.get_last_lr()[0]}


def main(argv=None):
    args = get_args(argv)
    rank, local_rank, world, device = compute_init(args.device)
    if args.batch_size is None:
        args.batch_size = world * args.micro_batch_size * args.grad_accum if args.grad_accum else 8
    if args.batch_size % (world * args.micro_batch_size):
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by world size {world} x "
                         f"--micro-batch-size {args.micro_batch_size}")
    targets = tuple(args.lora_targets.split(","))
    model, tok, params, dtype, autocast = training_setup(args, device, targets)
    check_fits(Setting(model.cfg, micro_batch=args.micro_batch_size, prompt_len=0, completion_len=args.max_length,
                       dtype=dtype, lora_r=args.lora_r, lora_targets=targets, grad_ckpt=args.grad_ckpt), device,
               args.force)
    broadcast_params(params, world)
    rows, held = load_data(args)
    ids, plens, n_trunc = tokenize_examples(tok, rows, args.max_length, model.cfg.eos_token_id)
    eval_ids, eval_plens, _ = tokenize_examples(tok, held, args.max_length, model.cfg.eos_token_id)
    N, T = ids.shape
    total_steps = args.max_steps or math.ceil(args.epochs * N / args.batch_size)
    print0(f"{N} training examples ({n_trunc} truncated to --max-length {args.max_length}), {len(eval_ids)} held out | "
           f"{model.num_params():,} params, {sum(p.numel() for p in params):,} trainable | world {world}, "
           f"{args.batch_size // world} per rank in micro-batches of {args.micro_batch_size} | {total_steps} steps")
    opt, sched = make_optimizer(params, args, total_steps)
    meta = maybe_resume(args, model, opt, sched)
    ckpt_dir, start = os.path.join(args.out_dir, "checkpoint"), meta["step"] if meta else 0
    extra = os.path.join(ckpt_dir, "extra.pt")
    best = BestWeights(params, args.keep_best, args.patience, meta and meta.get("early_stop"),
                       torch.load(extra, map_location="cpu")["best_state"] if meta and os.path.exists(extra) else None)
    log = JsonlLog(os.path.join(args.out_dir, "metrics.jsonl"))
    levels = noise_levels(args.eval_noise_levels)
    heldout = lambda: heldout_loss(model, eval_ids, eval_plens, model.cfg.mask_token_id, args.micro_batch_size * 4,
                                   device, autocast, levels, rank, world)
    print0(f"validation: {len(eval_ids)} examples x {len(levels)} noise levels x {eval_ids.shape[1]} tokens = "
           f"{len(eval_ids) * len(levels) * eval_ids.shape[1]:,} forward tokens per evaluation, sharded over "
           f"{world} rank(s)")
    if start == 0:
        loss0 = heldout()
        log.write(step=0, eval_loss=loss0)
        best.update(0, loss0)
    model.train()
    metrics, halted = {}, False
    bar = tqdm(range(start, total_steps), disable=rank != 0, desc="sft", dynamic_ncols=True)
    for step in bar:
        t0 = time.perf_counter()
        # The global batch and its noise are functions of the step alone: every rank takes its slice, and a resumed
        # run draws exactly what the uninterrupted run drew.
        metrics = train_step(model, params, opt, sched, (ids, plens, batch_for(step, args.batch_size, N, args.seed)),
                             noise_for(step, args.seed, args.batch_size, T), args, rank, world, autocast, device)
        metrics["step_time"] = time.perf_counter() - t0
        stop = False
        if (args.eval_every and (step + 1) % args.eval_every == 0) or step + 1 == total_steps:
            metrics["eval_loss"] = heldout()
            stop = best.update(step + 1, metrics["eval_loss"])
        log.write(step=step + 1, **metrics)
        if rank == 0:
            bar.write(fmt_metrics(step + 1, metrics))
        if args.save_every and (step + 1) % args.save_every == 0:
            save_checkpoint(ckpt_dir, model, tok, opt, sched,
                            {"step": step + 1, "args": vars(args), "early_stop": best.record, **metrics},
                            extra={"best_state": best.state} if best.state is not None else None)
        if stop:
            print0(f"early stop at step {step + 1}: the held-out loss has not improved for {args.patience} "
                   f"evaluations; best {best.record['loss']:.4f} at step {best.record['step']}")
            break
        if args.halt_after is not None and step + 1 >= args.halt_after:
            print0(f"halting after step {step + 1} (--halt-after)")
            halted = step + 1 < total_steps  # a halt at the last step is just the end
            break
    print0(f"ranks in sync: {assert_ranks_in_sync(params, world)}")
    if best.state is not None and not halted:  # --keep-best: export the best evaluation's weights, not the last step's
        best.restore()
        print0(f"restored the weights of step {best.record['step']} (best held-out loss {best.record['loss']:.4f})")
        metrics = {**metrics, "best_step": best.record["step"], "best_eval_loss": best.record["loss"]}
    if not args.no_export and not halted:
        export_model(os.path.join(args.out_dir, "final"), model, tok, {"args": vars(args), **metrics}, args.export)
        print0(f"exported ({args.export}) to {os.path.join(args.out_dir, 'final')}")
    compute_cleanup()
    return metrics


if __name__ == "__main__":
    common.EXIT_AFTER_CLEANUP = True  # see compute_cleanup
    main()
