"""
Beyond d1: three RL objectives for masked diffusion LMs published after it, beside d1's, on the same rollouts.

    python diffu_grpo.py --model out/sft/final --task sudoku --method spg      # d1 (default) | wd1 | spg | espo

diffu_grpo.py is d1's lesson and stays d1's code path; this file is the sequel. A method here replaces stages 3-5 of
diffu_grpo.rl_step (masks, log-likelihoods, loss); everything else is shared: data, rollouts, rewards, the group
advantages A_i = r_i - mean(group), the mask-seed discipline (every mask of a rollout batch is drawn up front, for
the whole rank batch, from the batch's dedicated "mask" generator: the old, reference and current passes of inner
update j see the same masks whatever the micro-batching), the optimizer step, checkpoints and logging.

A method is four small functions: draw (the masks of all mu updates), estimate (a likelihood estimate per
completion from masked forward passes), loss (a sum over rows) and its normaliser (over the rank batch; gradients
are then averaged over ranks, as in d1, so 2 ranks equal 1 whenever the ranks hold equal normalisers).

  method  estimate of log pi(o | q)                                 loss                          forward passes
                                                                                                  per completion
                                                                                                  per update
  d1      one step: completion all [MASK], prompt tokens masked     per-token ratio, clip, k3 KL  1 (+1 old, +1 ref)
          w.p. p_mask; per token                                    (diffu_grpo.py)
  wd1     d1's, summed over the completion's tokens                 weights softmax(-A) -          1
                                                                    softmax(+A) in each group
  spg     block-wise random masks, m copies: an ELBO (A > 0),       -A |o| bound / tokens,         m
          an EUBO or a mixture (A <= 0)                             no ratio, no clip, no KL
  espo    a sequence ELBO: stratified mask counts, each mask with   sequence ratio, clipped,      2M (+2M old,
          its complement, M draws                                   k2 KL                         +2M ref)

Sources: wd1 (arXiv 2507.08838), SPG (arXiv 2510.09541), ESPO (arXiv 2512.03759), each as its authors' public code
computes it; where that code and its paper differ, the code is followed and the comment says so.
"""

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

import diffu_grpo as D

NEG = -1e30  # a finite "log 0": logsumexp over only such terms stays finite, so its gradient is 0, not NaN


def masked_logps(model, prompt_ids, prompt_attn, completion, prompt_masks, completion_masks):
    """log p(o_k | x_c) (n, C, L), fp32, for C masked copies x_c of each row: x_c = [q ; o] with prompt_masks[:, c]
    (n, C, P) and completion_masks[:, c] (n, C, L) replaced by [MASK]. The n * C copies run as one batch of rows
    (through d1's logps_of, micro-batches of n rows)."""
    n, C = completion_masks.shape[:2]
    mask_id = model.cfg.mask_token_id
    x = torch.cat([prompt_ids, completion], 1)[:, None].expand(n, C, -1)               # (n, C, P + L)
    x = torch.where(torch.cat([prompt_masks, completion_masks], 2), mask_id, x).flatten(0, 1)
    rep = lambda t: t.repeat_interleave(C, 0)                                         # row i -> rows i*C .. i*C+C-1
    return D.logps_of(model, x, rep(prompt_attn), rep(completion), n).view(n, C, -1)


def random_subset(gen, allowed, count):
    """A uniformly random subset of exactly `count` (...,) of the True positions of `allowed` (..., L): rank the
    allowed positions by a uniform score (the rest rank last) and keep the first `count`."""
    score = torch.rand(allowed.shape, generator=gen, device=allowed.device).masked_fill(~allowed, 2.0)
    rank = score.argsort(-1).argsort(-1)
    return allowed & (rank < count[..., None])


# -----------------------------------------------------------------------------
# wd1 (Tang et al. 2025): d1's estimator, a ratio-free weighted log-likelihood


def wd1_draw(gen, mu, prompt_attn, cmask, cfg):
    """d1's masks: mu prompt patterns (mu, N, P), the completion fully masked."""
    return {"prompt": D.prompt_mask_patterns(gen, mu, prompt_attn, cfg.p_mask_prompt)}


def wd1_estimate(model, prompt_ids, prompt_attn, completion, cmask, masks, cfg):
    """log pi(o_i) ~= sum_k log p(o_k | q', MASK^L) over the valid tokens (n,): d1's one-step estimate, SUMMED over
    tokens (the authors' code; a longer completion weighs more)."""
    logp = D.per_token_logps(model, prompt_ids, prompt_attn, completion, masks["prompt"], model.cfg.mask_token_id)
    return (logp * cmask).sum(1)


def wd1_coefficients(adv, G):
    """The weight of log pi(o_i) in the loss, per group of G (N,):  w_i = softmax(-A)_i - softmax(+A)_i  (wd1 eq. 9,
    psi = 1). It sums to 0 in every group (equal advantages: w = 0, nothing is learned). The authors normalise over
    the device batch, which is one group in their layout; here the group is explicit."""
    a = adv.view(-1, G)
    return (torch.softmax(-a, 1) - torch.softmax(a, 1)).flatten()


def wd1_loss(est, old, ref, w, cmask, cfg):
    """loss = sum_i w_i log pi(o_i): pushes up completions with large A (w < 0), down those with small A (w > 0).
    No old or reference policy, no ratio, no clipping: the samples are treated as the current policy's."""
    return (w * est).sum(), {}


# -----------------------------------------------------------------------------
# SPG (Wang et al. 2025): sandwiched policy gradient, a lower bound (ELBO) for A > 0, an upper bound (EUBO) for A <= 0


def spg_draw(gen, mu, prompt_attn, cmask, cfg):
    """SPG's block-wise perturbation (its `block_random`), m = --spg-copies copies per completion and update:
    masks (mu, N, m, P) and (mu, N, m, L). Per copy, with blocks of --block-length over the generation and
    n_blk = ceil(|o| / block) the blocks that hold valid tokens (|o| = tokens up to and including the first EOS):
      1. block b: the first m entries of a random permutation of all blocks, each modulo n_blk (copies may repeat;
         with fewer blocks than copies the permutation is read cyclically, e.g. one block: every copy picks it);
      2. every completion position after block b, and after the first EOS, is masked; inside block b a uniformly
         random subset of c ~ U{1 .. c_max} of its valid tokens (c_max = the valid tokens in the block);
      3. every position still clean (real prompt tokens and the earlier blocks) is masked w.p. --p-mask-prompt."""
    m, block, p = cfg.spg_copies, cfg.block_length, cfg.p_mask_prompt
    N, L = cmask.shape
    dev = cmask.device
    rand = lambda *shape: torch.rand(shape, generator=gen, device=dev)
    olen = cmask.sum(1).long()                                                        # |o_i| (N,)
    n_blk = (olen + block - 1) // block
    perm = rand(mu, N, L // block).argsort(-1)                                        # a permutation of blocks
    b = perm[..., torch.arange(m, device=dev) % perm.shape[-1]] % n_blk[:, None]     # (mu, N, m)
    pos = torch.arange(L, device=dev)
    start = (b * block)[..., None]                                                    # (mu, N, m, 1)
    in_block = (pos >= start) & (pos < start + block) & (pos < olen[:, None, None])  # (mu, N, m, L)
    c_max = in_block.sum(-1)
    count = 1 + (rand(mu, N, m) * c_max).long().clamp(max=c_max - 1)                 # U{1 .. c_max}
    comp = random_subset(gen, in_block, count) | (pos >= start + block) | (pos >= olen[:, None, None])
    comp |= rand(mu, N, m, L) < p                                                     # step 3 on the clean rest
    prompt = (rand(mu, N, m, prompt_attn.shape[1]) < p) & prompt_attn.bool()[None, :, None]
    return {"prompt": prompt, "completion": comp}


def spg_estimate(model, prompt_ids, prompt_attn, completion, cmask, masks, cfg):
    """Both bounds of log pi(o_i), (n, 2) = [ELBO_i, EUBO_i], from m masked copies; M_c = the masked valid tokens of
    copy c, t_c = |M_c| / |o| its mask fraction:
        ELBO_i = mean_c  mean_{k in M_c} log p_c(o_k)          (= |o|^-1 * mean_c (1/t_c) sum_{k in M_c} log p_c(o_k),
                                                                  the 1/t-weighted ELBO per token)
        EUBO_i = (1/beta) mean_{k in any M_c} log S_k,   S_k = (1/m) sum_c 1[k in M_c] p_c(o_k)^beta / t_c
    (a Renyi upper bound with the log outside the expectation). log S_k by logsumexp in fp32: p^beta would underflow
    in bf16 and silently drop tokens."""
    logp = masked_logps(model, prompt_ids, prompt_attn, completion, masks["prompt"], masks["completion"])  # (n, m, L)
    M = masks["completion"] & cmask.bool()[:, None]                                                        # (n, m, L)
    n_masked = M.sum(-1)                                                                                   # >= 1 each
    elbo = ((logp * M).sum(-1) / n_masked).mean(1)
    log_t = (n_masked / cmask.sum(1, keepdim=True)).log()                                                  # (n, m)
    terms = torch.where(M, cfg.spg_beta * logp - log_t[..., None], NEG)
    log_s = terms.logsumexp(1) - math.log(M.shape[1])                                                      # (n, L)
    seen = M.any(1)
    eubo = (log_s * seen).sum(-1) / seen.sum(-1) / cfg.spg_beta
    return torch.stack([elbo, eubo], 1)


def spg_loss(est, old, ref, adv, cmask, cfg):
    """loss = -sum_i A_i |o_i| s_i, with s_i = ELBO_i where A_i > 0, else the --spg-mode bound: ELBO, EUBO or
    omega EUBO + (1 - omega) ELBO (SPG eq. 8). A lower bound pushed up, an upper bound pushed down: the true
    log-likelihood is sandwiched. Normalised by the batch's valid tokens (SPG: sum_i |o_i|); no ratio, clip or KL."""
    elbo, eubo = est[:, 0], est[:, 1]
    neg = {"elbo": elbo, "eubo": eubo, "mix": cfg.spg_omega * eubo + (1 - cfg.spg_omega) * elbo}[cfg.spg_mode]
    s = torch.where(adv > 0, elbo, neg)
    return -(adv * cmask.sum(1) * s).sum(), {}


# -----------------------------------------------------------------------------
# ESPO (Ou et al. 2025): the sequence-level ELBO as the likelihood, a sequence-level ratio


def espo_draw(gen, mu, prompt_attn, cmask, cfg):
    """Per update and Monte-Carlo draw (M = --espo-mc): mask counts stratified over the N rows of the rank batch,
    x_i = round(k + i (L + 1) / N) mod (L + 1) with one k ~ U{0 .. L}, then exactly x_i uniformly random positions of
    the whole generation (EOS padding included: the authors' code does not use the completion mask). The prompt is
    never masked. Returns the primary masks (mu, N, M, L); each pass is paired with its complement (espo_estimate).
    (The authors stratify over a device micro-batch; over the rank batch the masks do not depend on micro-batching.)"""
    N, L = cmask.shape
    M, dev = cfg.espo_mc, cmask.device
    k = torch.randint(0, L + 1, (mu, 1, M), generator=gen, device=dev)
    i = torch.arange(N, device=dev)[None, :, None]
    x = torch.round(k + i * (L + 1) / N).long() % (L + 1)                                       # (mu, N, M)
    allowed = torch.ones(mu, N, M, L, dtype=torch.bool, device=dev)
    return {"completion": random_subset(gen, allowed, x)}


def espo_estimate(model, prompt_ids, prompt_attn, completion, cmask, masks, cfg):
    """The sequence ELBO (n,): for each draw, the primary mask (x masked tokens) and its complement (the other
    L - x) give two importance-weighted sums, averaged; then the mean over the M draws:
        ELBO_i = mean_draws 1/2 [ (L+1)/x sum_{masked} log p(o_k) + (L+1)/(L-x) sum_{complement} log p(o_k) ]
    (x ~ U{0 .. L}: E[(L+1)/x sum_masked] is the diffusion ELBO; an empty side contributes 0). 2M forward passes."""
    prim = masks["completion"]                                                          # (n, M, L)
    L = prim.shape[-1]
    comp = torch.cat([prim, ~prim], 1)                                                  # (n, 2M, L)
    no_prompt = torch.zeros(*comp.shape[:2], prompt_ids.shape[1], dtype=torch.bool, device=comp.device)
    logp = masked_logps(model, prompt_ids, prompt_attn, completion, no_prompt, comp)   # (n, 2M, L)
    x = comp.sum(-1)
    w = torch.where(x > 0, (L + 1) / x.clamp(min=1), 0.0)
    return ((logp * comp).sum(-1) * w).mean(1)


def espo_loss(est, old, ref, adv, cmask, cfg):
    """The sequence ratio rho_i = exp((ELBO_i - ELBO_old_i) / L), L = --gen-length (fixed), in PPO's clipped
    surrogate, plus beta times the k2 KL 1/2 (ELBO_i - ELBO_ref_i)^2 / L (k3 of a sequence ELBO would overflow);
    summed over rows, normalised by the number of rows."""
    L = cmask.shape[1]
    rho = torch.exp((est - old) / L)
    surrogate = torch.min(rho * adv, torch.clamp(rho, 1 - cfg.epsilon, 1 + cfg.epsilon) * adv)
    loss = -surrogate
    stats = {"clipped": (((rho < 1 - cfg.epsilon) & (adv < 0)) | ((rho > 1 + cfg.epsilon) & (adv > 0))).float().sum()}
    if ref is not None:
        kl = 0.5 * (est - ref) ** 2 / L
        loss = loss + cfg.beta * kl
        stats["kl"] = kl.sum().detach()
    return loss.sum(), stats


# -----------------------------------------------------------------------------
# The shared loop: stages 3-5 of diffu_grpo.rl_step for any method


@dataclass(frozen=True)
class Method:
    draw: Callable           # (gen, mu, prompt_attn, cmask, cfg) -> {name: masks (mu, N, ...)}
    estimate: Callable       # (model, prompt_ids, prompt_attn, completion, cmask, masks of rows, cfg) -> (n, ...)
    loss: Callable           # (est, old, ref, coef, cmask, cfg) -> (sum over rows, stats)
    normaliser: Callable     # (cmask, G) -> what the rank batch's loss sum is divided by
    passes: Callable         # cfg -> forward passes per completion per estimate
    ratio: bool = False      # needs the old policy's (and, with beta > 0, the reference's) estimates
    coefficients: Callable = lambda adv, G: adv  # per-row weights from the advantages (wd1: its softmax weights)


METHODS = {
    "wd1": Method(wd1_draw, wd1_estimate, wd1_loss, lambda cmask, G: len(cmask) / G, lambda cfg: 1,
                  coefficients=wd1_coefficients),
    "spg": Method(spg_draw, spg_estimate, spg_loss, lambda cmask, G: cmask.sum(), lambda cfg: cfg.spg_copies),
    "espo": Method(espo_draw, espo_estimate, espo_loss, lambda cmask, G: len(cmask), lambda cfg: 2 * cfg.espo_mc,
                   ratio=True),
}


def method_updates(policy, opt, sched, params, batch, cfg, world, gen, autocast, timings):
    """Stages 3-5 for --method wd1 | spg | espo: draw every mask of the mu updates, the old and reference estimates
    when the method has a ratio, then mu optimizer steps on the method's loss. Returns the metric sums of d1's
    inner_updates and the log-likelihood forward passes per completion."""
    meth, model = METHODS[cfg.method], policy.model
    prompt_ids, prompt_attn, completion, adv, cmask = batch
    mu, N, G = cfg.num_iterations, len(completion), cfg.num_generations
    masks = meth.draw(gen, mu, prompt_attn, cmask, cfg)                     # 3. {name: (mu, N, ...)}, drawn once
    passes = 0

    def estimate(m, j, sl):
        nonlocal passes
        passes += meth.passes(cfg) * len(completion[sl])
        return meth.estimate(m, prompt_ids[sl], prompt_attn[sl], completion[sl], cmask[sl],
                             {k: v[j, sl] for k, v in masks.items()}, cfg)

    def every_update(m, rows):  # (mu, N, ...) estimates with the masks of every update, no grad
        return torch.stack([torch.cat([estimate(m, j, slice(i, i + rows)) for i in range(0, N, rows)])
                            for j in range(mu)])

    rows = cfg.logp_batch_size or cfg.micro_batch_size
    t0 = time.perf_counter()
    with torch.no_grad(), autocast:                                          # 4. old and reference estimates
        old = every_update(model, rows) if meth.ratio and mu > 1 else None  # mu = 1: old = current, ratio 1
    timings["old_logps"], t0 = time.perf_counter() - t0, time.perf_counter()
    ref = None
    if meth.ratio and cfg.beta > 0:
        with torch.no_grad(), autocast, policy.ref_context():
            ref = every_update(policy.ref_model(), rows)
        policy.ref_passes += mu
    timings["ref_logps"], t0 = time.perf_counter() - t0, time.perf_counter()
    coef, norm = meth.coefficients(adv, G), meth.normaliser(cmask, G)       # 5. mu updates
    model.train()
    sums = {"loss": 0.0, "kl": 0.0, "clipped": 0.0, "grad_norm": 0.0}
    for j in range(mu):
        for i in range(0, N, cfg.micro_batch_size):
            sl = slice(i, i + cfg.micro_batch_size)
            with autocast:
                est = estimate(model, j, sl)
            old_j = est.detach() if old is None else old[j][sl]
            loss, st = meth.loss(est, old_j, None if ref is None else ref[j][sl], coef[sl], cmask[sl], cfg)
            (loss / norm).backward()
            sums["loss"] += loss.item() / float(norm) / mu
            sums["kl"] += float(st.get("kl", 0.0)) / float(norm) / mu
            sums["clipped"] += float(st.get("clipped", 0.0)) / float(norm) / mu
        sums["grad_norm"] += D.optimizer_step(params, opt, sched, world, cfg.max_grad_norm) / mu
    timings["update"] = time.perf_counter() - t0
    return sums, passes / N
