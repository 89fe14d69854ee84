"""
diffu-GRPO (d1, Zhao et al. 2025, arXiv 2504.12216, Sec. 3): policy gradients for a masked diffusion LM.

GRPO (Shao et al. 2024) needs per-token log-probabilities log pi(o_k | q) of sampled completions. An autoregressive
model gets them from one causal forward pass; a masked diffusion model has no such factorisation. d1's answer is a
ONE-STEP MEAN-FIELD ESTIMATE:

    x' = [ q' ; MASK * L ]          q' = the prompt with each token masked independently with probability p_mask
    log pi(o_k | q) ~= log softmax(f_theta(x'))[|q| + k, o_k]      for every completion position k, one forward pass

Every completion token is predicted from the fully masked completion, so one pass yields all L log-probs. The random
prompt mask is the clever part: each of the mu inner updates draws a FRESH pattern q'_j, and the old-policy,
reference and current log-probs of update j all use that same pattern (so the ratio compares like with like), while
different j see different views of the prompt. That acts as regularisation and is what lets d1 run many (mu = 8-12)
gradient updates per batch of expensive rollouts.

One rollout batch, on each rank:
  1. rollouts   for each prompt q, G completions o_1..o_G from sample.py (temperature 0.9; 0.3 for Sudoku)
  2. rewards    r_i = sum_f w_f f(q, o_i);  advantages A_i = r_i - mean(r_group)     (d1: no division by the std)
  3. patterns   mu prompt-mask patterns from a dedicated torch.Generator
  4. old / ref  log-probs under the rollout policy and the reference policy (LoRA switched off) for every pattern
  5. mu updates, update j with pattern j, per completion token k (valid tokens: up to and including the first EOS):
        rho = exp(logp - logp_old)
        loss_k = -min(rho A, clip(rho, 1 - eps, 1 + eps) A) + beta * (exp(ref - logp) - (ref - logp) - 1)   (k3 KL)
     averaged over all valid completion tokens of the rank's batch (d1 averages per micro-batch; summing over the
     batch first makes the update independent of the micro-batch size, a memory knob), gradients averaged over ranks.

Each rank rolls out whole groups: an advantage needs only its own group's rewards, so no rewards cross ranks
(metrics are all-reduced for logging only).

    python diffu_grpo.py --model out/sft/final --task sudoku --prompt-style compact ...     # CPU, tiny
    torchrun --nproc_per_node=2 diffu_grpo.py --model tiny --task sudoku --prompt-style compact --max-steps 4
    torchrun --nproc_per_node=8 diffu_grpo.py --task sudoku           # d1's recipe on LLaDA-8B-Instruct
"""

import argparse
import copy
import contextlib
import math
import os
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import common
import model as M
from common import (JsonlLog, add_export_args, add_model_args, all_reduce_grads, assert_ranks_in_sync, batch_for,
                    broadcast_params, compute_cleanup, compute_init, export_model, fmt_metrics, make_optimizer,
                    maybe_resume, print0, save_checkpoint, training_setup)
from data import add_sudoku_args, load_task, sudoku_kwargs
from memory import Setting, check_fits
from rewards import REWARDS
from sample import add_sampling_args, completion_mask, decode_completions, generate, pad_left

# d1's published recipe (train.yaml), per task where it differs.
# max_steps: the optimizer step of the checkpoint d1 reports per task (d1 trains longer and keeps the best one).
PRESETS = {"gsm8k": dict(num_iterations=12, temperature=0.9, max_steps=7704),
           "math": dict(num_iterations=12, temperature=0.9, max_steps=6600),
           "countdown": dict(num_iterations=8, temperature=0.9, max_steps=5000),
           "sudoku": dict(num_iterations=8, temperature=0.3, max_steps=3800)}

# -----------------------------------------------------------------------------
# The one-step log-prob estimator


def prompt_mask_patterns(generator, mu, prompt_attn, p_mask):
    """mu independent patterns (mu, B, P) bool: True = this real prompt token is replaced by [MASK] in iteration j.
    Padding is never 'masked' (it is hidden by the attention mask anyway)."""
    u = torch.rand((mu,) + tuple(prompt_attn.shape), generator=generator, device=prompt_attn.device)
    return (u < p_mask) & prompt_attn.bool()[None]


def masked_input(prompt_ids, pattern, gen_length, mask_id):
    """x' = [q' ; MASK * L]  (B, P + L): the prompt under `pattern` (B, P), the completion fully masked."""
    q = torch.where(pattern, torch.full_like(prompt_ids, mask_id), prompt_ids)
    return torch.cat([q, torch.full((q.shape[0], gen_length), mask_id, dtype=q.dtype, device=q.device)], dim=1)


def per_token_logps(model, prompt_ids, prompt_attn, completion_ids, pattern, mask_id, micro_batch=None):
    """log pi(o_k | q') for every completion position (B, L), fp32, from ONE forward pass per micro-batch. Logits
    are computed only for the completion positions (logits_slice): the prompt's would be thrown away."""
    B, P = prompt_ids.shape
    L = completion_ids.shape[1]
    micro_batch = micro_batch or B
    x = masked_input(prompt_ids, pattern, L, mask_id)
    attn = torch.cat([prompt_attn, torch.ones_like(completion_ids)], dim=1)
    out = []
    for i in range(0, B, micro_batch):
        sl = slice(i, i + micro_batch)
        logits = model(x[sl], attn[sl], logits_slice=slice(P, P + L)).float()  # (b, L, V); all-ones mask -> no mask
        # log_softmax(l)[o] = l[o] - logsumexp(l): no (b, L, V) log-prob tensor is materialised
        out.append(logits.gather(-1, completion_ids[sl, :, None]).squeeze(-1) - logits.logsumexp(-1))
    return torch.cat(out)


def per_token_logps_all(model, prompt_ids, prompt_attn, completion_ids, patterns, mask_id, micro_batch=None):
    """The estimator for all mu patterns at once (mu, B, L): the mu masked copies of the batch are stacked into one
    (mu * B)-row batch and run through per_token_logps in micro-batches. Same numbers as mu separate calls (each row
    is computed independently), but with micro_batch > B a GPU sees fuller batches and the old/ref passes of a
    rollout batch become mu * B / micro_batch forward calls instead of mu * ceil(B / micro_batch)."""
    mu, B = patterns.shape[:2]
    rep = lambda t: t.repeat(mu, *([1] * (t.dim() - 1)))  # (B, ...) -> (mu * B, ...), iteration-major
    out = per_token_logps(model, rep(prompt_ids), rep(prompt_attn), rep(completion_ids), patterns.flatten(0, 1),
                          mask_id, micro_batch)
    return out.view(mu, B, -1)


def group_advantages(rewards, G, scale=False):
    """rewards (N*G,) in groups of G consecutive completions -> A = r - mean(group) (d1), or divided by
    (std(group) + 1e-4) with scale=True (TRL's default). A group with identical rewards gets A = 0 exactly."""
    r = rewards.view(-1, G)
    a = r - r.mean(1, keepdim=True)
    if scale:
        a = a / (r.std(1, keepdim=True) + 1e-4)
    return a.flatten()


def grpo_token_loss(logp, old, ref, adv, cmask, epsilon, beta):
    """Per-token clipped surrogate + beta * k3 KL. logp/old/ref (B, L); adv (B,); cmask (B, L) valid tokens.
    Returns (sum of the loss over valid tokens, dict of token sums for metrics). ref is None when beta == 0."""
    ratio = torch.exp(logp - old)
    A = adv[:, None]
    surrogate = torch.min(ratio * A, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * A)
    loss = -surrogate
    stats = {}
    if beta > 0:
        d = ref - logp
        kl = torch.exp(d) - d - 1  # k3: unbiased, always >= 0
        loss = loss + beta * kl
        stats["kl"] = (kl * cmask).sum().detach()
    clipped = ((ratio < 1 - epsilon) & (A < 0)) | ((ratio > 1 + epsilon) & (A > 0))
    stats["clipped"] = (clipped.float() * cmask).sum().detach()
    return (loss * cmask).sum(), stats


# -----------------------------------------------------------------------------
# One rollout batch: generate, score, then mu inner updates


class Policy:
    """The trainable model plus how to get the reference policy's log-probs: LoRA -> the same network with the
    adapters off; full fine-tuning -> a frozen copy of the starting weights. Counts the passes it runs."""

    def __init__(self, model, full_ft_reference=None):
        self.model, self.frozen = model, full_ft_reference
        self.ref_passes = 0

    def ref_context(self):
        return M.lora_disabled(self.model) if self.frozen is None else contextlib.nullcontext()

    def ref_model(self):
        return self.model if self.frozen is None else self.frozen


def encode_rollout_prompts(tok, rows, max_prompt_length, device):
    """Chat-templated prompts, left-padded with an attention mask: (ids (N, P), attn (N, P), prompts cut).
    With --max-prompt-length a longer prompt keeps its END (d1/TRL's left truncation); a cut is counted."""
    lists = [tok(tok.apply_chat_template(r["prompt"], tokenize=False), add_special_tokens=False)["input_ids"]
             for r in rows]
    cut = max_prompt_length or max(len(p) for p in lists)
    ids, attn = pad_left([p[-cut:] for p in lists], tok.pad_token_id, device)
    return ids, attn, sum(len(p) > cut for p in lists)


def rollout(model, prompt_ids, prompt_attn, args, generator, autocast):
    """Stage 1: one completion per row (each prompt appears G times) from sample.py's masked diffusion sampler.
    Returns completion (N, L) and its mask of valid tokens (N, L): up to and including the first EOS."""
    model.train(args.rollout_mode == "train")  # rollouts and old/ref log-probs: no dropout unless asked for
    with autocast:
        completion = generate(model, prompt_ids, prompt_attn, gen_length=args.gen_length,
                              block_length=args.block_length, steps=args.steps, temperature=args.temperature,
                              cfg_scale=args.cfg_scale, remasking=args.remasking, threshold=args.threshold,
                              generator=generator).completion
    return completion, completion_mask(completion, model.cfg.eos_token_id).float()


def score_rollouts(rows, texts, reward_fns, G, scale_rewards):
    """Stage 2: r_i = sum_f w_f f(q, o_i) (None counts 0) and A_i = r_i - mean(group). Returns (rewards (N,),
    advantages (N,), {reward function: mean})."""
    columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
    total, per_fn = torch.zeros(len(rows)), {}
    for fn, w in reward_fns:
        vals = torch.tensor([0.0 if v is None else float(v) for v in fn([r["prompt"] for r in rows], texts, **columns)])
        per_fn[fn.__name__] = vals.mean().item()
        total += w * vals
    return total, group_advantages(total, G, scale_rewards), per_fn


@torch.no_grad()
def old_and_ref_logps(policy, prompt_ids, prompt_attn, completion, patterns, args, autocast, timings):
    """Stage 4: log-probs under the rollout policy (old) and the reference policy (ref) for every pattern, before
    any update: (mu, N, L) each, or None when not needed (mu = 1: old = current exactly; beta = 0: no ref)."""
    mu, mask_id = patterns.shape[0], policy.model.cfg.mask_token_id
    est = lambda m: per_token_logps_all(m, prompt_ids, prompt_attn, completion, patterns, mask_id,
                                        args.logp_batch_size or args.micro_batch_size)
    t0 = time.perf_counter()
    with autocast:
        old = est(policy.model) if mu > 1 else None
    timings["old_logps"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = None
    if args.beta > 0:
        with autocast, policy.ref_context():
            ref = est(policy.ref_model())
        policy.ref_passes += mu  # counted in patterns (one (N, P + L) estimate each), however they are batched
    timings["ref_logps"] = time.perf_counter() - t0
    return old, ref


def inner_updates(model, opt, sched, params, batch, patterns, old, ref, args, world, autocast):
    """Stage 5: mu optimizer steps, step j with pattern j for its current log-probs (and old[j], ref[j]): every
    pattern is used whatever the micro-batching. The loss is normalised by the valid tokens of the whole rank
    batch, gradients are averaged over ranks. Returns the mean loss, kl, clip ratio and grad norm."""
    prompt_ids, prompt_attn, completion, adv, cmask = batch
    mu, N, mb = patterns.shape[0], len(completion), args.micro_batch_size
    model.train()
    n_valid = cmask.sum().clamp(min=1)
    sums = {"loss": 0.0, "kl": 0.0, "clipped": 0.0, "grad_norm": 0.0}
    for j in range(mu):
        for i in range(0, N, mb):
            sl = slice(i, i + mb)
            with autocast:
                logp = per_token_logps(model, prompt_ids[sl], prompt_attn[sl], completion[sl], patterns[j][sl],
                                       model.cfg.mask_token_id)
            old_j = logp.detach() if old is None else old[j][sl]
            ref_j = None if ref is None else ref[j][sl]
            loss, st = grpo_token_loss(logp, old_j, ref_j, adv[sl], cmask[sl], args.epsilon, args.beta)
            (loss / n_valid).backward()
            sums["loss"] += loss.item() / n_valid.item() / mu
            sums["kl"] += st.get("kl", torch.tensor(0.0)).item() / n_valid.item() / mu
            sums["clipped"] += st["clipped"].item() / n_valid.item() / mu
        all_reduce_grads(params, world)
        sums["grad_norm"] += torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm).item() / mu
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return sums


def rl_step(policy, opt, sched, params, batch_rows, tok, args, world, gens, autocast, device):
    """One rollout batch on this rank, the five stages of the module docstring; returns (metrics, samples), the
    metrics local to this rank (main all-reduces them for logging)."""
    model, G, mu = policy.model, args.num_generations, args.num_iterations
    timings, t0 = {}, time.perf_counter()
    rows = [r for r in batch_rows for _ in range(G)]  # every prompt G times: one group each
    prompt_ids, prompt_attn, n_truncated = encode_rollout_prompts(tok, rows, args.max_prompt_length, device)
    if n_truncated and not getattr(args, "_warned_truncation", False):
        print(f"warning: {n_truncated} of {len(rows)} prompts are longer than --max-prompt-length "
              f"{args.max_prompt_length} and lose their beginning (BOS and instruction first); counted as "
              f"prompts/truncated in the metrics", flush=True)
        args._warned_truncation = True
    completion, cmask = rollout(model, prompt_ids, prompt_attn, args, gens["rollout"], autocast)  # 1.
    timings["rollout"] = time.perf_counter() - t0
    texts = decode_completions(tok, completion, model.cfg.eos_token_id)
    total, adv, per_fn = score_rollouts(rows, texts, args.reward_fns, G, args.scale_rewards)  # 2.
    patterns = prompt_mask_patterns(gens["mask"], mu, prompt_attn, args.p_mask_prompt)  # 3. (mu, N, P)
    old, ref = old_and_ref_logps(policy, prompt_ids, prompt_attn, completion, patterns, args, autocast,
                                 timings)  # 4.
    t0 = time.perf_counter()
    sums = inner_updates(model, opt, sched, params, (prompt_ids, prompt_attn, completion, adv.to(device), cmask),
                         patterns, old, ref, args, world, autocast)  # 5.
    timings["update"] = time.perf_counter() - t0
    r = total.view(-1, G)
    metrics = {"reward": total.mean().item(), "reward_std": total.std().item() if len(total) > 1 else 0.0,
               **{f"rewards/{k}/mean": v for k, v in per_fn.items()},
               "frac_reward_zero_std": (r.std(1) < 1e-6).float().mean().item() if G > 1 else 1.0,
               "kl": sums["kl"], "clip_ratio/region_mean": sums["clipped"],
               "completions/mean_length": cmask.sum(1).mean().item(),
               "completions/clipped_ratio": (~(completion == model.cfg.eos_token_id).any(1)).float().mean().item(),
               "prompts/truncated": n_truncated / len(rows),
               "loss": sums["loss"], "grad_norm": sums["grad_norm"], "lr": sched.get_last_lr()[0],
               **{f"time/{k}": v for k, v in timings.items()}}
    samples = [(rows[i]["prompt"][-1]["content"][-60:], texts[i], total[i].item()) for i in range(min(2, len(rows)))]
    return metrics, samples


def lora_targets(spec):
    """--lora-targets: 'd1', 'wide' or a comma-separated list of module names."""
    return {"d1": M.LORA_TARGETS, "wide": M.LORA_TARGETS_WIDE}.get(spec) or tuple(spec.split(","))


def seed_for(seed, rank, batch, stream):
    """A distinct, reproducible seed per (run seed, rank, rollout batch, stream). Plain arithmetic, not hash():
    Python salts string hashes per process."""
    return ((seed * 1_000_003 + rank) * 1_000_033 + batch) * 8 + stream


def reduce_metrics(metrics, world, device):
    """Mean of every metric over ranks (for logging only)."""
    if world == 1:
        return metrics
    keys = sorted(metrics)
    t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: v / world for k, v in zip(keys, t.tolist())}


# -----------------------------------------------------------------------------


def get_args(argv=None):
    ap = argparse.ArgumentParser(description="diffu-GRPO (d1 stage 2). Unset flags take d1's published recipe.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # Model
    add_model_args(ap, default_model=M.LLADA_HUB_ID)
    ap.add_argument("--lora-r", type=int, default=128, help="LoRA rank (0 = full fine-tuning with a frozen reference copy)")
    ap.add_argument("--lora-alpha", type=float, default=64.0, help="LoRA alpha")
    ap.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout")
    ap.add_argument("--lora-targets", default="d1",
                    help="comma-separated module names to adapt, or 'd1' = " + ",".join(M.LORA_TARGETS) + " (what d1's "
                         "PEFT config matched in LLaDA; no LM head) or 'wide' = " + ",".join(M.LORA_TARGETS_WIDE))
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in the update passes")
    ap.add_argument("--force", action="store_true", help="run even if the memory plan exceeds the GPU's memory")
    # Task
    ap.add_argument("--task", default="sudoku", choices=sorted(PRESETS), help="task (sets the reward functions)")
    ap.add_argument("--data-path", default=None, help="local dataset file/dir ('generate' for Countdown's generator)")
    ap.add_argument("--prompt-style", default="d1", choices=["d1", "compact"], help="d1's prompts or compact ones")
    ap.add_argument("--train-n", type=int, default=None, help="limit the training prompts")
    ap.add_argument("--data-seed", type=int, default=None,
                    help="seed of the generated training set (Sudoku, Countdown); default --seed. Give it a value "
                         "other than SFT's to train RL on puzzles the SFT stage never saw")
    add_sudoku_args(ap)
    # Rollouts
    ap.add_argument("--num-generations", type=int, default=6, help="G: completions per prompt (one group)")
    ap.add_argument("--prompts-per-step", type=int, default=2,
                    help="prompts per rank per rollout batch (d1: batch 6 x grad-accum 2 / 6 generations = 2)")
    ap.add_argument("--max-prompt-length", type=int, default=None,
                    help="keep only the last N prompt tokens (d1: 200, TRL's left truncation). Default: no cut; "
                         "prompts that a limit would cut are counted in the metrics (prompts/truncated)")
    ap.add_argument("--rollout-mode", default="eval", choices=["eval", "train"],
                    help="module mode of the rollouts and the old/ref log-prob passes. eval: no LoRA dropout, so the "
                         "first inner update's ratio is exactly 1 (ours); train: dropout on, as d1's trainer ran")
    add_sampling_args(ap, gen_length=256, block_length=32, steps=128, temperature=None)
    # diffu-GRPO
    ap.add_argument("--num-iterations", type=int, default=None, help="mu: inner updates per rollout batch (d1: 12 GSM8K/MATH, 8 Countdown/Sudoku)")
    ap.add_argument("--beta", type=float, default=0.04, help="KL coefficient (0 = no reference passes at all)")
    ap.add_argument("--epsilon", type=float, default=0.5, help="ratio clipping range")
    ap.add_argument("--p-mask-prompt", type=float, default=0.15, help="probability of masking each prompt token")
    ap.add_argument("--scale-rewards", action="store_true", help="divide advantages by the group std (TRL; d1: off)")
    ap.add_argument("--reward-weights", type=float, nargs="+", default=None, help="one weight per reward function")
    ap.add_argument("--micro-batch-size", type=int, default=6, help="completions per forward in the update passes")
    ap.add_argument("--logp-batch-size", type=int, default=None,
                    help="rows per forward in the no-grad old/ref passes, whose mu patterns are stacked into one "
                         "batch (default: --micro-batch-size; no activations are kept, so it can be larger)")
    # Optimization
    ap.add_argument("--lr", type=float, default=3e-6, help="learning rate")
    ap.add_argument("--lr-schedule", default="constant", choices=["constant", "linear", "cosine"], help="after warmup")
    ap.add_argument("--warmup-steps", type=int, default=0, help="linear warmup (optimizer steps)")
    ap.add_argument("--adam-betas", type=float, nargs=2, default=(0.9, 0.99), help="AdamW betas")
    ap.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    ap.add_argument("--max-grad-norm", type=float, default=0.2, help="gradient clipping norm")
    ap.add_argument("--max-steps", type=int, default=None,
                    help="optimizer steps, mu per rollout batch (default: the step of d1's reported checkpoint: "
                         "GSM8K 7704, MATH 6600, Countdown 5000, Sudoku 3800)")
    ap.add_argument("--seed", type=int, default=0, help="seed for data order, rollouts and mask patterns")
    # Logging and checkpoints
    ap.add_argument("--out-dir", default="out/grpo", help="checkpoints, export and metrics.jsonl")
    ap.add_argument("--sample-every", type=int, default=10, help="print decoded samples every N rollout batches")
    ap.add_argument("--save-every", type=int, default=0, help="checkpoint every N rollout batches (0 = off)")
    ap.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint")
    ap.add_argument("--halt-after", type=int, default=None, help="stop after this many rollout batches (then --resume)")
    add_export_args(ap)
    args = ap.parse_args(argv)
    preset = PRESETS[args.task]
    args.num_iterations = args.num_iterations or preset["num_iterations"]
    args.temperature = preset["temperature"] if args.temperature is None else args.temperature
    args.max_steps = args.max_steps or preset["max_steps"]
    fns = REWARDS[args.task]
    if args.reward_weights is not None and len(args.reward_weights) != len(fns):
        raise ValueError(f"--reward-weights needs {len(fns)} values for {args.task}: {[f.__name__ for f, _ in fns]}")
    args.reward_fns = [(f, w if args.reward_weights is None else args.reward_weights[i]) for i, (f, w) in enumerate(fns)]
    if args.max_steps % args.num_iterations:
        args.max_steps = math.ceil(args.max_steps / args.num_iterations) * args.num_iterations
    return args


def main(argv=None):
    args = get_args(argv)
    rank, local_rank, world, device = compute_init(args.device)
    # RL starts from the SFT model (d1-LLaDA) when --model is an SFT export or --adapter is given (make_trainable).
    model, tok, params, dtype, autocast = training_setup(args, device, lora_targets(args.lora_targets))
    check_fits(Setting(model.cfg, micro_batch=args.micro_batch_size, prompt_len=args.max_prompt_length or 256,
                       completion_len=args.gen_length, dtype=dtype, lora_r=args.lora_r,
                       lora_targets=lora_targets(args.lora_targets), grad_ckpt=args.grad_ckpt,
                       full_ft_reference=not args.lora_r and args.beta > 0,
                       logp_rows=args.logp_batch_size or args.micro_batch_size), device, args.force)
    frozen = None
    if not args.lora_r and args.beta > 0:
        frozen = copy.deepcopy(model).eval().requires_grad_(False)
    broadcast_params(params, world)
    policy = Policy(model, frozen)
    opt, sched = make_optimizer(params, args, args.max_steps)
    data_seed = args.seed if args.data_seed is None else args.data_seed
    ds = load_task(args.task, "train", args.data_path, args.prompt_style, n=args.train_n, seed=data_seed,
                   **sudoku_kwargs(args.task, args))
    per_batch = args.prompts_per_step * world
    n_batches = args.max_steps // args.num_iterations
    meta = maybe_resume(args, model, opt, sched)
    start = meta["batch"] if meta else 0
    ckpt_dir = os.path.join(args.out_dir, "checkpoint")
    print0(f"diffu-GRPO on {args.task}: {len(ds)} prompts, {per_batch} per rollout batch x G={args.num_generations}, "
           f"mu={args.num_iterations}, beta={args.beta}, eps={args.epsilon}, p_mask={args.p_mask_prompt}, "
           f"T={args.temperature} | {sum(p.numel() for p in params):,} trainable params | world {world}")
    log = JsonlLog(os.path.join(args.out_dir, "metrics.jsonl"))
    bar = tqdm(range(start, n_batches), disable=rank != 0, desc="diffu-grpo", dynamic_ncols=True)
    for b in bar:
        t0 = time.perf_counter()
        # The global rollout batch (per_batch prompt indices), then this rank's prompts_per_step of them.
        mine = slice(rank * args.prompts_per_step, (rank + 1) * args.prompts_per_step)
        idx = batch_for(b, per_batch, len(ds), args.seed)[mine]
        # Generators derived from (seed, rank, batch): reproducible, independent of any global RNG, and a resumed
        # run draws exactly what the uninterrupted run drew.
        gens = {name: torch.Generator(device=device).manual_seed(seed_for(args.seed, rank, b, i))
                for i, name in enumerate(("rollout", "mask"))}
        # Only LoRA dropout uses the global RNG (F.dropout takes no generator, and gradient checkpointing restores
        # the global RNG state when it recomputes a block). Seeding it per batch makes resume exact; it touches
        # nothing else, since rollout noise and mask patterns have their own generators.
        torch.manual_seed(seed_for(args.seed, rank, b, 2))
        metrics, samples = rl_step(policy, opt, sched, params, [ds[int(i)] for i in idx], tok, args, world, gens,
                                   autocast, device)
        metrics["step_time"] = time.perf_counter() - t0
        metrics = reduce_metrics(metrics, world, device)
        step = (b + 1) * args.num_iterations
        log.write(step=step, batch=b + 1, **metrics)
        if rank == 0:
            shown = {k: v for k, v in metrics.items() if k in ("reward", "reward_std", "kl", "loss", "grad_norm",
                                                              "completions/mean_length", "clip_ratio/region_mean",
                                                              "step_time", "time/rollout", "time/update")}
            bar.write(fmt_metrics(step, shown))
            if args.sample_every and (b + 1) % args.sample_every == 0:
                for p, c, r in samples:
                    bar.write(f"  [reward {r:.3f}] ...{p!r} -> {c[:120]!r}")
        if args.save_every and (b + 1) % args.save_every == 0:
            save_checkpoint(ckpt_dir, model, tok, opt, sched, {"step": step, "batch": b + 1, "args": vars(args),
                                                               **metrics})
        if args.halt_after is not None and b + 1 >= args.halt_after:
            print0(f"halting after rollout batch {b + 1} (--halt-after)")
            break
    print0(f"ranks in sync: {assert_ranks_in_sync(params, world)} | reference passes: {policy.ref_passes}")
    if not args.no_export and (args.halt_after is None or args.halt_after >= n_batches):
        export_model(os.path.join(args.out_dir, "final"), model, tok, {"args": vars(args)}, args.export)
        print0(f"exported ({args.export}) to {os.path.join(args.out_dir, 'final')}")
    compute_cleanup()
    return policy


if __name__ == "__main__":
    common.EXIT_AFTER_CLEANUP = True  # see compute_cleanup
    main()
