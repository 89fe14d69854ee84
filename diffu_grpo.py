"""
diffu-GRPO (d1, Zhao et al. 2025, arXiv 2504.12216, Sec. 3): policy gradients for a masked diffusion LM.

    python diffu_grpo.py --model out/sft/final --task sudoku      # RL from `python sft.py --model tiny` (~1 minute)

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

One rollout batch, on each rank (rl_step):
  1. rollouts   for each prompt q, G completions o_1..o_G from sample.py (temperature 0.9; 0.3 for Sudoku)
  2. rewards    r_i = sum_f w_f f(q, o_i);  advantages A_i = r_i - mean(r_group)     (d1: no division by the std)
  3. patterns   mu prompt-mask patterns from a dedicated torch.Generator
  4. old / ref  log-probs under the rollout policy and the reference policy (LoRA switched off) for every pattern
  5. mu updates, update j with pattern j, per completion token k (valid tokens: up to and including the first EOS):
        rho = exp(logp - logp_old)
        loss_k = -min(rho A, clip(rho, 1 - eps, 1 + eps) A) + beta * (exp(ref - logp) - (ref - logp) - 1)   (k3 KL)
     averaged over all valid completion tokens of the rank's batch (d1 averages per micro-batch; summing over the
     batch first makes the update independent of the micro-batch size, a memory knob), gradients averaged over ranks.

Each rank rolls out whole groups: an advantage needs only its own group's rewards, so no rewards cross ranks (metrics
are all-reduced for logging only). The unit of --max-steps, --save-every, --halt-after and --sample-every is the
optimizer step, as in d1: a rollout batch is mu of them.

Reading order: the estimator, the loss, d1 as an Objective (stages 3-5 as data), the five stages, rl_step, the
training loop. The recipe (GRPOConfig, d1's train.yaml) and its per-task and tiny presets are at the bottom; the run
around the loop is harness.Run. methods.py builds later objectives on this file (python methods.py --method spg).

    torchrun --nproc_per_node=2 diffu_grpo.py --model out/sft/final --task sudoku     # the same on 2 processes
    torchrun --nproc_per_node=8 diffu_grpo.py --task sudoku --adapter SFT_DIR         # d1's recipe on LLaDA-8B
"""

import contextlib
import copy
import time
from dataclasses import dataclass, replace
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist

import config
import model as M
from common import (batch_for, batch_generators, cli, compute_init, distribute, lora_targets, make_trainer,
                    optimizer_step, peak_memory, print0, reduce_metrics, training_setup, warn_once)
from config import option, parse_config, require, shared
from harness import Run, next_commands
from rundir import prepare_run_dir
from data import BLANKS, load_task, rl_split, sudoku_kwargs
from memory import check_rl_memory
from parallel import gathered
from rewards import REWARDS, weighted_rewards
from scoring import score
from sample import (check_sampling, completion_mask, decode_completions, encode_prompts, generate, sampling_kwargs,
                    sampling_option)

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
    """log pi(o_k | q') for every completion position (B, L), fp32, from ONE forward pass per micro-batch."""
    x = masked_input(prompt_ids, pattern, completion_ids.shape[1], mask_id)
    return logps_of(model, x, prompt_attn, completion_ids, micro_batch)


def logps_of(model, x, prompt_attn, completion_ids, micro_batch=None):
    """log p(o_k | x) (B, L), fp32, at every completion position of a masked input x (B, P + L); the caller decides
    what x masks (d1: the whole completion; methods.py's estimators: other patterns). Logits are computed only for
    the completion positions (logits_slice): the prompt's would be thrown away."""
    B, L = completion_ids.shape
    P = x.shape[1] - L
    micro_batch = micro_batch or B
    attn = torch.cat([prompt_attn, torch.ones_like(completion_ids)], dim=1)
    out = []
    for i in range(0, B, micro_batch):
        sl = slice(i, i + micro_batch)
        logits = model(x[sl], attn[sl], logits_slice=slice(P, P + L)).float()  # (b, L, V); all-ones mask -> no mask
        # log_softmax(l)[o] = l[o] - logsumexp(l): no (b, L, V) log-prob tensor is materialised
        out.append(logits.gather(-1, completion_ids[sl, :, None]).squeeze(-1) - logits.logsumexp(-1))
    return torch.cat(out)


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
# The objective: what stages 3-5 need to know. d1's is below; methods.py builds wd1, SPG and ESPO the same way.


@dataclass(frozen=True)
class Objective:
    """An RL objective as the update loop sees it: how it masks, estimates a likelihood and turns it into a loss.
    The loop (estimates, updates) and everything around it (rollouts, rewards, advantages, the optimizer step) are
    the same for every objective."""
    name: str                # printed in the header and on the progress bar
    knobs: tuple             # the config fields it uses, printed in the header
    draw: Callable           # (gen, mu, prompt_attn, cmask, cfg) -> {name: masks (mu, N, ...)}, every update's
    estimate: Callable       # (model, prompt_ids, prompt_attn, completion, cmask, masks of these rows, cfg) -> (n, ...)
    loss: Callable           # (est, old, ref, coef, cmask, cfg) -> (the loss summed over the rows, {stat: sum})
    normaliser: Callable     # (cmask, G) -> what the rank batch's summed loss is divided by
    ratio: bool = True       # compares with the rollout policy (old estimates when mu > 1, ref when beta > 0)
    coefficients: Callable = lambda adv, G: adv  # the per-row weights of the loss (wd1: its softmax weights)
    passes: Callable = lambda cfg: 1             # forward passes per completion per estimate
    copies: Callable = lambda cfg: 1             # masked copies of a row in one forward batch (the memory plan)


def d1_draw(gen, mu, prompt_attn, cmask, cfg):
    """Stage 3: mu prompt-mask patterns (mu, N, P), one per inner update; the completion is always fully masked."""
    return {"prompt": prompt_mask_patterns(gen, mu, prompt_attn, cfg.p_mask_prompt)}


def d1_estimate(model, prompt_ids, prompt_attn, completion, cmask, masks, cfg):
    """The one-step estimate log pi(o_k | q') (n, L) under these rows' prompt pattern."""
    return per_token_logps(model, prompt_ids, prompt_attn, completion, masks["prompt"], model.cfg.mask_token_id)


def d1_loss(logp, old, ref, adv, cmask, cfg):
    return grpo_token_loss(logp, old, ref, adv, cmask, cfg.epsilon, cfg.beta)


# d1: the loss is summed over every valid completion token of the rank batch and divided by their number.
D1 = Objective("diffu-GRPO", ("num_iterations", "beta", "epsilon", "p_mask_prompt"), d1_draw, d1_estimate, d1_loss,
               normaliser=lambda cmask, G: cmask.sum().clamp(min=1))


# -----------------------------------------------------------------------------
# One rollout batch: generate, score, then mu inner updates


class Rollouts(NamedTuple):
    """A rank's scored rollouts: N rows, each prompt G times in a row (one group)."""
    prompt_ids: torch.Tensor   # (N, P) left-padded
    prompt_attn: torch.Tensor  # (N, P) 1 = a real prompt token
    completion: torch.Tensor   # (N, L) sampled token ids
    adv: torch.Tensor          # (N,) group advantages
    cmask: torch.Tensor        # (N, L) 1.0 up to and including the first EOS


class Policy:
    """The trainable model plus how to get the reference policy's log-probs: LoRA -> the same network with the
    adapters off; full fine-tuning -> a frozen copy of the starting weights. Counts the reference estimates."""

    def __init__(self, model, full_ft_reference=None):
        self.model, self.frozen, self.ref_passes = model, full_ft_reference, 0

    def ref_context(self):
        return M.lora_disabled(self.model) if self.frozen is None else contextlib.nullcontext()

    def ref_model(self):
        return self.model if self.frozen is None else self.frozen


def rollout(model, prompt_ids, prompt_attn, sampling, generator, autocast, train_mode=False):
    """Stage 1: one completion per row (each prompt appears G times) from sample.py's masked diffusion sampler,
    with the sampler's settings `sampling` (sample.sampling_kwargs). Returns completion (N, L) and its mask of valid
    tokens (N, L): up to and including the first EOS. The model samples in eval mode (no LoRA dropout) unless
    train_mode (d1's trainer sampled with dropout on). Also returns the sampler's forward passes."""
    model.train(train_mode)
    with autocast, gathered(model):  # --fsdp: every weight gathered once for the whole rollout (parallel.py)
        out = generate(model, prompt_ids, prompt_attn, generator=generator, **sampling)
    return out.completion, completion_mask(out.completion, model.cfg.eos_token_id).float(), out.forward_passes


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
def estimates(model, obj, b, masks, cfg, rows):
    """obj's estimate under the masks of every update, without gradients: (mu, N, ...). The mu masked copies of the
    batch are stacked into one (mu * N)-row batch and run `rows` at a time: each row is computed on its own, so
    the numbers are those of mu separate passes, but with rows > N a GPU sees fuller batches."""
    mu, N = next(iter(masks.values())).shape[:2]
    rep = lambda t: t.repeat(mu, *([1] * (t.dim() - 1)))  # (N, ...) -> (mu * N, ...), update-major
    ids, attn, completion, cmask = rep(b.prompt_ids), rep(b.prompt_attn), rep(b.completion), rep(b.cmask)
    flat = {k: v.flatten(0, 1) for k, v in masks.items()}
    out = [obj.estimate(model, ids[i:i + rows], attn[i:i + rows], completion[i:i + rows], cmask[i:i + rows],
                        {k: v[i:i + rows] for k, v in flat.items()}, cfg)
           for i in range(0, mu * N, rows)]
    out = torch.cat(out)
    return out.view(mu, N, *out.shape[1:])


def old_and_ref(policy, obj, b, masks, cfg, autocast):
    """Stage 4: the estimates under the rollout policy (old) and the reference policy (ref) for every update's
    masks, before any update: (mu, N, ...) each, or None where not needed (beta = 0 or an objective without a ratio:
    no ref; mu = 1: old is update 0's own estimate). Returns (old, ref, {phase: seconds}, passes per completion).
    Masks the same in every update (d1 with --p-mask-prompt 0) and no dropout give estimates the same in every
    update: one ref pass serves all mu, and old is update 0's own estimate (updates()), as mu separate passes give."""
    mu, rows = cfg.num_iterations, cfg.logp_batch_size or cfg.micro_batch_size
    noisy = any(isinstance(m, M.LoRALinear) and m.dropout > 0 for m in policy.model.modules())  # LoRA dropout
    if not noisy and all(torch.equal(v, v[:1].expand_as(v)) for v in masks.values()):
        masks = {k: v[:1] for k, v in masks.items()}
    distinct = len(next(iter(masks.values())))  # mu, or 1 where the masks repeat
    t0 = time.perf_counter()
    with autocast, gathered(policy.model):  # --fsdp: gathered once for all of these passes (parallel.py)
        old = estimates(policy.model, obj, b, masks, cfg, rows) if obj.ratio and distinct > 1 else None
    t1 = time.perf_counter()
    ref = None
    if obj.ratio and cfg.beta > 0:
        with autocast, policy.ref_context(), gathered(policy.ref_model()):
            ref = estimates(policy.ref_model(), obj, b, masks, cfg, rows)
        policy.ref_passes += distinct  # estimates of the batch (one per distinct masks), however they are batched
        ref = ref.expand(mu, *ref.shape[1:])
    passes = obj.passes(cfg) * distinct * ((old is not None) + (ref is not None))
    return old, ref, {"old_logps": t1 - t0, "ref_logps": time.perf_counter() - t1}, passes


def updates(tr, obj, b, masks, old, ref, cfg):
    """Stage 5: mu optimizer steps, step j under update j's masks for its current estimate (and old[j], ref[j]):
    every mask is used whatever the micro-batching. The loss is normalised over the whole rank batch
    (obj.normaliser), gradients are averaged over ranks (common.optimizer_step). Returns the mean loss, kl, clip
    ratio and grad norm."""
    mu, N = cfg.num_iterations, len(b.completion)
    coef, norm = obj.coefficients(b.adv, cfg.num_generations), obj.normaliser(b.cmask, cfg.num_generations)
    n = float(norm)  # for the metrics: one host sync per rollout batch, not per micro-batch
    tr.model.train()
    sums = dict.fromkeys(("loss", "kl", "clipped", "grad_norm"), 0.0)
    first = []  # old is None: each micro-batch's estimate at update 0, before any step, IS the old estimate
    for j in range(mu):
        step_loss = 0.0  # update j's loss (what optimizer_step checks is finite)
        for i in range(0, N, cfg.micro_batch_size):
            sl = slice(i, i + cfg.micro_batch_size)
            with tr.autocast:
                est = obj.estimate(tr.model, b.prompt_ids[sl], b.prompt_attn[sl], b.completion[sl], b.cmask[sl],
                                   {k: v[j, sl] for k, v in masks.items()}, cfg)
            first += [est.detach()] if old is None and j == 0 else []
            old_j = first[i // cfg.micro_batch_size] if old is None else old[j][sl]  # update 0: the ratio is 1
            loss, st = obj.loss(est, old_j, None if ref is None else ref[j][sl], coef[sl], b.cmask[sl], cfg)
            (loss / norm).backward()
            step_loss += loss.item() / n
            sums["kl"] += float(st.get("kl", 0.0)) / n / mu
            sums["clipped"] += float(st.get("clipped", 0.0)) / n / mu
        sums["loss"] += step_loss / mu
        sums["grad_norm"] += optimizer_step(tr, step_loss) / mu
    return sums


def learn(policy, tr, obj, b, cfg, gen):
    """Stages 3-5 on a rank's scored rollouts b. Returns (metric sums, {phase: seconds}, log-likelihood forward
    passes per completion)."""
    # 3. Every update's masks (d1: mu prompt patterns (mu, N, P)) from the batch's mask generator, drawn once:
    #    update j, its old and its ref estimates all use masks j.
    masks = obj.draw(gen, cfg.num_iterations, b.prompt_attn, b.cmask, cfg)
    # 4. old and ref estimates (mu, N, ...) each, before the weights move (None where they are not needed).
    old, ref, timings, passes = old_and_ref(policy, obj, b, masks, cfg, tr.autocast)
    # 5. mu optimizer steps on the objective's loss (d1: the clipped surrogate + beta * KL).
    t0 = time.perf_counter()
    sums = updates(tr, obj, b, masks, old, ref, cfg)
    return sums, {**timings, "update": time.perf_counter() - t0}, passes + obj.passes(cfg) * cfg.num_iterations


def rl_step(policy, tr, batch_rows, tok, cfg, gens, obj=None):
    """One rollout batch on this rank: the five stages of the module docstring, with the objective `obj` (d1's
    by default; methods.py passes another). Returns (metrics, samples), the metrics local to this rank (main
    all-reduces them for logging)."""
    obj, model, G = obj or D1, tr.model, cfg.num_generations
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    rows = [r for r in batch_rows for _ in range(G)]  # every prompt G times: N = prompts x G rows, one group each
    prompt_ids, prompt_attn, n_cut = encode_prompts(tok, [r["prompt"] for r in rows], device,  # (N, P)
                                                    keep_last=cfg.max_prompt_length)
    # 1. Rollouts: completion (N, L) token ids, cmask (N, L) 1.0 up to and including the first EOS.
    completion, cmask, rollout_passes = rollout(model, prompt_ids, prompt_attn, sampling_kwargs(cfg), gens["rollout"],
                                                tr.autocast, cfg.rollout_mode == "train")
    t1 = time.perf_counter()
    # 2. Rewards on the decoded text, then group advantages: total (N,), adv (N,), zero mean within each group.
    texts = decode_completions(tok, completion, model.cfg.eos_token_id)
    rewards = weighted_rewards(cfg.task, cfg.reward_weights)
    total, adv, per_fn = score_rollouts(rows, texts, rewards, G, cfg.scale_rewards)
    t2 = time.perf_counter()
    # 3-5. Masks, old and ref estimates, mu optimizer steps.
    sums, timings, logp_passes = learn(policy, tr, obj, Rollouts(prompt_ids, prompt_attn, completion, adv.to(device),
                                                                 cmask), cfg, gens["mask"])
    timings = {"rollout": t1 - t0, "rewards": t2 - t1, **timings}
    passes = {"passes/rollout": rollout_passes, "passes/logp": logp_passes}  # forward passes per completion
    if n_cut:
        warn_once("prompt cut", f"{n_cut} of {len(rows)} prompts are longer than --max-prompt-length "
                  f"{cfg.max_prompt_length} and lose their beginning (BOS and instruction first); counted as "
                  f"prompts/truncated in the metrics")
    samples = [(rows[i]["prompt"][-1]["content"][-60:], texts[i], total[i].item()) for i in range(min(2, len(rows)))]
    metrics = rl_metrics(total, per_fn, sums, completion, cmask, n_cut, G, model.cfg.eos_token_id, tr.sched, timings)
    return {**metrics, **passes}, samples


# -----------------------------------------------------------------------------
# The training loop


def main(argv=None):
    return train(*get_config(argv), D1)


def train(cfg, presets, obj):
    """The training loop, for d1 (main) and for the objectives of methods.py (the same loop, another `obj`)."""
    rank, _, world, device = compute_init(cfg.device)
    prepare_run_dir(cfg)  # refuses to mix two runs in one --out-dir; checks a --resume
    mu, per_rank = cfg.num_iterations, cfg.prompts_per_step
    ds, val = training_prompts(cfg)  # a bad data file stops here, before the model loads
    # RL starts from the SFT model when --model is an SFT export or --adapter is given (common.make_trainable).
    model, tok, params, dtype, autocast = training_setup(cfg, device, lora_targets(cfg.lora_targets))
    check_rl_memory(cfg, model.cfg, dtype, device, obj.copies(cfg), world)
    policy = Policy(model, copy.deepcopy(model).eval().requires_grad_(False) if not cfg.lora_r and cfg.beta else None)
    params = distribute(cfg, model, world, device, policy.frozen)  # DDP, or FSDP2 with --fsdp (parallel.py)
    tr = make_trainer(model, params, cfg, cfg.max_steps, world, autocast)
    validate = val and validation(cfg, model, tok, val, rank, world, device, autocast)
    knobs = ", ".join(f"{k}={getattr(cfg, k)}" for k in obj.knobs)
    print0(f"{obj.name} on {cfg.task} (preset {'+'.join(presets)}): {len(ds)} prompts, {per_rank * world} per "
           f"rollout batch x G={cfg.num_generations} | {knobs}, temperature={cfg.temperature} | "
           f"{sum(p.numel() for p in params):,} trainable params | world {world}")
    if cfg.model in ("tiny", "tiny-dream") and not cfg.adapter:
        print0("note: --model tiny is a random model, which earns no reward on d1's tasks (it never writes the "
               "answer format); start RL from an SFT export: python sft.py --model tiny, then --model out/sft/final")
    run = Run(cfg, tr, tok, cfg.max_steps, obj.name, stride=mu, keep_best=cfg.keep_best,
              score="validation accuracy", maximize=True)
    # The metrics printed (all go to metrics.jsonl): no kl without a KL term, no clip ratio without a ratio.
    shown = [k for k in SHOWN if not (k == "kl" and (cfg.beta == 0 or not obj.ratio) or
                                      k == "clip_ratio/region_mean" and not obj.ratio)]
    if validate and run.start == 0:  # the starting model is a candidate too
        v = validate()
        run.log.write(step=0, **v)
        run.evaluated(0, v["eval_accuracy"])
    for step in run.steps():
        t0, b = time.perf_counter(), step // mu - 1  # b: the rollout batch that ends at this optimizer step
        # The global rollout batch (prompt indices), then this rank's prompts_per_step of them:
        idx = batch_for(b, per_rank * world, len(ds), cfg.seed)[rank * per_rank:(rank + 1) * per_rank]
        metrics, samples = rl_step(policy, tr, [ds[int(i)] for i in idx], tok, cfg,
                                   batch_generators(cfg.seed, rank, b, device), obj)
        metrics.update(step_time=time.perf_counter() - t0, **peak_memory(device),
                       **({"nonfinite_skipped": tr.skipped} if cfg.skip_nonfinite else {}))
        metrics = reduce_metrics(metrics, world, device)  # the mean over ranks (logging only)
        if validate and run.every(step, cfg.eval_every):
            metrics.update(validate())
            run.evaluated(step, metrics["eval_accuracy"])
        lines = [f"  [reward {r:.3f}] ...{p!r} -> {c[:120]!r}" for p, c, r in samples] \
            if run.every(step, cfg.sample_every) else []
        if run.end_step(step, {"batch": b + 1, **metrics}, shown, lines):
            break
    if cfg.beta > 0 and obj.ratio:
        print0(f"reference policy: {policy.ref_passes} estimates (each a forward pass over the rank's rollouts)")
    run.finish(hints=next_commands(cfg, "rl"))
    return policy


# -----------------------------------------------------------------------------
# Plumbing: validation, seeds, rewards, metrics


def training_prompts(cfg):
    """(training prompts, validation prompts or None), read (and checked) before any model loads. With --eval-every
    the validation prompts are held out of training (data.rl_split)."""
    seed = cfg.seed if cfg.data_seed is None else cfg.data_seed
    if not cfg.eval_every:
        return load_task(cfg.task, "train", cfg.data_path, cfg.prompt_style, n=cfg.train_n, seed=seed,
                         **sudoku_kwargs(cfg.task, cfg.blanks)), None
    ds, val = rl_split(cfg.task, cfg.data_path, cfg.prompt_style, cfg.train_n, cfg.eval_n, seed, cfg.blanks)
    where = "puzzles on held-out training grids" if cfg.task == "sudoku" else "the tail of the training split"
    print0(f"validation: {len(val)} prompts ({where}), every {cfg.eval_every} steps at temperature "
           f"{cfg.eval_temperature}")
    return ds, list(val)


def validation(cfg, model, tok, rows, rank, world, device, autocast):
    """validate() -> {eval_accuracy, eval_reward, time/validation}: the policy's accuracy (scoring.py, our
    parser) and mean reward on the validation prompts with the evaluation's decoding (the rollout settings at
    --eval-temperature, greedy by default). Rank r scores rows r, r + world, ...; the sums are all-reduced."""
    mine = rows[rank::world]
    sampling = {**sampling_kwargs(cfg), "temperature": cfg.eval_temperature}

    @torch.no_grad()
    def validate():
        t0, sums = time.perf_counter(), torch.zeros(3, dtype=torch.float64)
        g = torch.Generator(device=device).manual_seed(cfg.seed + 99)  # the same noise at every evaluation
        for i in range(0, len(mine), cfg.micro_batch_size):
            chunk = mine[i:i + cfg.micro_batch_size]
            ids, attn, _ = encode_prompts(tok, [r["prompt"] for r in chunk], device, keep_last=cfg.max_prompt_length)
            completion = rollout(model, ids, attn, sampling, g, autocast)[0]
            texts = decode_completions(tok, completion, model.cfg.eos_token_id)
            rewards = score_rollouts(chunk, texts, weighted_rewards(cfg.task, cfg.reward_weights), 1, False)[0]
            correct = sum(bool(score(cfg.task, t, r)["correct"]) for t, r in zip(texts, chunk))
            sums += torch.tensor([correct, rewards.sum().item(), len(chunk)], dtype=torch.float64)
        if world > 1:
            sums = sums.to(device)
            dist.all_reduce(sums)
        correct, reward, n = sums.tolist()
        return {"eval_accuracy": correct / n, "eval_reward": reward / n, "time/validation": time.perf_counter() - t0}
    return validate


# The metrics printed each rollout batch (all of them go to metrics.jsonl).
SHOWN = ("reward", "reward_std", "kl", "loss", "grad_norm", "completions/mean_length", "clip_ratio/region_mean",
         "step_time", "time/rollout", "time/update")


def rl_metrics(total, per_fn, sums, completion, cmask, n_cut, G, eos_id, sched, timings):
    """The rank-local metrics of one rollout batch, named as TRL's GRPO trainer names them."""
    r = total.view(-1, G)
    return {"reward": total.mean().item(), "reward_std": total.std().item() if len(total) > 1 else 0.0,
            **{f"rewards/{k}/mean": v for k, v in per_fn.items()},
            "frac_reward_zero_std": (r.std(1) < 1e-6).float().mean().item() if G > 1 else 1.0,
            "kl": sums["kl"], "clip_ratio/region_mean": sums["clipped"],
            "completions/mean_length": cmask.sum(1).mean().item(),
            "completions/clipped_ratio": (~(completion == eos_id).any(1)).float().mean().item(),
            "prompts/truncated": n_cut / len(total), "loss": sums["loss"], "grad_norm": sums["grad_norm"],
            "lr": sched.get_last_lr()[0], **{f"time/{k}": v for k, v in timings.items()}}


# -----------------------------------------------------------------------------
# The recipe: d1's train.yaml (and sbatch files) as they ran. Every field is a flag (config.option); per-task values
# and the tiny laptop recipe are in PRESETS below.


@dataclass(frozen=True)
class GRPOConfig(config.TrainerConfig):
    # Inherited from config.TrainerConfig, the same in both trainers: model, preset, adapter, dtype, device,
    # grad_ckpt, force, data_path, prompt_style, train_n, save_every, resume, halt_after, export, no_export.
    lora_r: int = option(128, "LoRA rank; 0 = full fine-tuning, a frozen copy of the start the reference", "model")
    lora_alpha: float = shared("lora_alpha", 64.0)
    lora_dropout: float = shared("lora_dropout", 0.05)
    lora_targets: str = shared("lora_targets", "d1")

    task: str = option("sudoku", "the task: its training prompts and d1's rewards", "data", choices=sorted(REWARDS))
    data_seed: int = option(None, "seed of the generated training set (Sudoku, Countdown; default: --seed); "
                            "another value than SFT's trains RL on puzzles SFT never saw", "data", type=int)
    blanks: tuple = shared("blanks", BLANKS)

    gen_length: int = sampling_option("gen_length", 256)
    block_length: int = sampling_option("block_length", 32)
    steps: int = sampling_option("steps", 128)
    temperature: float = sampling_option("temperature", 0.3)
    cfg_scale: float = sampling_option("cfg_scale", 0.0)
    remasking: str = sampling_option("remasking", "low_confidence")
    threshold: float = sampling_option("threshold", None)
    prefix_cache: bool = sampling_option("prefix_cache", False)

    num_generations: int = option(6, "G: completions per prompt (one group)", "d1's algorithm")
    prompts_per_step: int = option(2, "prompts per rank per rollout batch (d1: per-device batch 6 x grad-accum 2 "
                                   "/ 6 generations)", "d1's algorithm")
    num_iterations: int = option(8, "mu: inner updates (optimizer steps) per rollout batch", "d1's algorithm")
    beta: float = option(0.04, "KL coefficient (0 = no reference passes at all)", "d1's algorithm")
    epsilon: float = option(0.5, "ratio clipping range", "d1's algorithm")
    p_mask_prompt: float = option(0.15, "probability of masking each prompt token, per inner update", "d1's algorithm")
    scale_rewards: bool = option(False, "divide advantages by the group std (TRL's default; d1: off)", "d1's algorithm")
    reward_weights: tuple = option(None, "one weight per reward function of the task (d1: all 1)", "d1's algorithm",
                                   type=float, nargs="+")
    max_prompt_length: int = option(None, "keep only the last N prompt tokens (d1: 200, TRL's left truncation); "
                                    "unset: no cut, and prompts a limit would cut are counted (prompts/truncated)",
                                    "d1's algorithm", type=int)

    lr: float = shared("lr", 3e-6)
    lr_schedule: str = shared("lr_schedule", "constant")
    warmup_steps: int = shared("warmup_steps", 0)
    adam_betas: tuple = shared("adam_betas", (0.9, 0.99))
    weight_decay: float = shared("weight_decay", 0.1)
    max_grad_norm: float = shared("max_grad_norm", 0.2)
    max_steps: int = option(3800, "optimizer steps in all, mu per rollout batch (d1's checkpoints)", "optimisation")
    micro_batch_size: int = option(6, "completions per forward pass in the update passes", "optimisation")
    seed: int = shared("seed", 0)

    out_dir: str = shared("out_dir", "out/grpo")
    eval_every: int = option(0, "validate every N optimizer steps (and before the first): accuracy and mean reward "
                             "on --eval-n held-out prompts of the training distribution (0 = never)",
                             "run and checkpoints")
    eval_n: int = option(64, "validation prompts: generated Sudoku on training grids reserved for validation, else "
                         "the last N rows of the training split (removed from training)", "run and checkpoints")
    eval_temperature: float = option(0.0, "the validation's decoding temperature (0 = greedy, as evaluation)",
                                     "run and checkpoints")
    keep_best: bool = option(False, "export the weights of the best validation accuracy (a tie keeps the earlier "
                             "step) instead of the last step's; needs --eval-every", "run and checkpoints")
    sample_every: int = option(80, "print two decoded rollouts every N optimizer steps (0 = never)",
                               "run and checkpoints")

    rollout_mode: str = option("eval", "module mode of the rollouts and the old/ref passes. eval: no LoRA dropout, "
                               "so the first inner update's ratio is exactly 1; train: dropout on, as d1's trainer "
                               "ran", "debugging probes", choices=["eval", "train"])
    logp_batch_size: int = option(None, "rows per forward pass in the no-grad old/ref passes, whose mu patterns are "
                                  "stacked into one batch (default: --micro-batch-size)", "debugging probes", type=int)

    def check(self, typed):
        """Every value checked before any work: a value typed is used or refused, never replaced. (A preset's
        --max-steps is rounded up to whole rollout batches.)"""
        config.check_trainer(self)
        n, mu = len(REWARDS[self.task]), self.num_iterations
        require(self.reward_weights is None or len(self.reward_weights) == n, f"--reward-weights needs {n} values "
                f"for {self.task}: {[f.__name__ for f, _ in REWARDS[self.task]]}")
        require(self.num_generations >= 2, f"--num-generations {self.num_generations}: a group needs G >= 2 "
                "completions (with one, every advantage is 0 and nothing is learned)")
        require(self.prompts_per_step > 0 and mu > 0, "--prompts-per-step and --num-iterations must be > 0")
        require(self.max_steps % mu == 0 or "max_steps" not in typed, f"--max-steps {self.max_steps} is not a "
                f"whole number of rollout batches of mu = --num-iterations {mu} optimizer steps")
        require(self.beta >= 0 and self.epsilon > 0 and 0 <= self.p_mask_prompt < 1, "need --beta >= 0, "
                "--epsilon > 0 and 0 <= --p-mask-prompt < 1")
        for name in ("logp_batch_size", "max_prompt_length"):
            require(getattr(self, name) is None or getattr(self, name) > 0, f"--{name.replace('_', '-')} must be > 0")
        require(self.sample_every >= 0, "--sample-every must be >= 0")
        require(self.eval_every >= 0 and self.eval_n > 0 and self.eval_temperature >= 0,
                "need --eval-every >= 0, --eval-n > 0 and --eval-temperature >= 0")
        require(self.eval_every or not self.keep_best, "--keep-best needs --eval-every N (the validation it keeps by)")
        check_sampling(self.gen_length, self.block_length, self.steps, self.temperature, self.cfg_scale,
                       self.remasking, self.threshold)
        return replace(self, max_steps=-(-self.max_steps // mu) * mu)


# d1's per-task values (train.yaml; max_steps: the optimizer step of the checkpoint d1 reports, rounded up to whole
# rollout batches), then the tiny laptop recipe: the demo's RL stage (runs/tiny_sudoku.sh; SHAPE=d1 adds flags) with
# one-step rollouts (the whole answer in one denoising step, where the one-step estimator IS the sampler's
# likelihood), full fine-tuning of the tiny model, and 60 rollout batches (about a minute on 2 cores).
PRESETS = {
    "gsm8k": dict(num_iterations=12, temperature=0.9, max_steps=7704),
    "math": dict(num_iterations=12, temperature=0.9, max_steps=6600),
    "countdown": dict(num_iterations=8, temperature=0.9, max_steps=5000),
    "sudoku": dict(num_iterations=8, temperature=0.3, max_steps=3800),
    "tiny": dict(prompt_style="compact", lora_r=0, gen_length=40, block_length=40, steps=1, temperature=1.0,
                 num_generations=8, prompts_per_step=8, num_iterations=2, lr=3e-4, max_grad_norm=1.0,
                 weight_decay=0.0, micro_batch_size=64, max_steps=120, sample_every=20),
    "tiny sudoku": dict(blanks=(3, 6)),
    "tiny countdown": dict(data_path="generate"),
}


def choose_presets(typed):
    """The task's d1 values, then (for --model tiny or an export of a tiny run) the tiny recipe and its task's."""
    task = typed.get("task", GRPOConfig.task)
    names = [task]
    if config.model_scale(typed.get("model", GRPOConfig.model), typed.get("preset", "auto")) == "tiny":
        names += ["tiny", f"tiny {task}"]
    return [n for n in names if n in PRESETS]


def get_config(argv=None):
    """(GRPOConfig, the presets applied) from the command line."""
    paragraphs = __doc__.split("\n\n")
    cfg, names = parse_config(GRPOConfig, argv, paragraphs[0].strip() + "\n\n" + paragraphs[1], PRESETS,
                              choose_presets)
    return replace(cfg, preset="tiny" if "tiny" in names else "d1"), names


def get_args(argv=None):
    """The resolved config (for tests and the fidelity ledger)."""
    return get_config(argv)[0]


if __name__ == "__main__":
    cli(main)
