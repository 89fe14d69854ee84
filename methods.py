"""
Beyond d1: three RL objectives for masked diffusion LMs published after it, beside d1's, on the same rollouts.

    python methods.py --model out/sft/final --task sudoku --method spg      # d1 (default) | wd1 | spg | espo

diffu_grpo.py is d1's lesson and knows nothing of this file; this file is the sequel, built on it. A method is a
diffu_grpo.Objective: it replaces what stages 3-5 of diffu_grpo.rl_step compute (masks, likelihood estimates, loss)
and runs through the same loop (diffu_grpo.estimates and updates). Everything else is d1's: data, rollouts, rewards,
the group advantages A_i = r_i - mean(group), the mask-seed discipline (every mask of a rollout batch is drawn up
front, for the whole rank batch, from the batch's dedicated "mask" generator: the old, reference and current passes
of inner update j see the same masks whatever the micro-batching), the optimizer step, checkpoints and logging.

A method is four small functions: draw (the masks of all mu updates), estimate (a likelihood estimate per
completion from masked forward passes), loss (a sum over rows) and its normaliser (over the rank batch; gradients
are then averaged over ranks, as in d1, so 2 ranks equal 1 whenever the ranks hold equal normalisers). Its flags,
presets and checks are MethodConfig at the bottom.

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
from dataclasses import dataclass, replace

import torch

import diffu_grpo as D
from common import cli
from config import option, parse_config, require

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
# The methods as d1's Objective (diffu_grpo.py): the same update loop, rollouts, rewards and run; only the masks,
# the estimate and the loss differ. Each method's normaliser is over the rank batch, as d1's.


METHODS = {
    "d1": D.D1,
    "wd1": D.Objective("wd1", ("num_iterations", "p_mask_prompt"), wd1_draw, wd1_estimate, wd1_loss,
                       normaliser=lambda cmask, G: len(cmask) / G, ratio=False, coefficients=wd1_coefficients),
    "spg": D.Objective("SPG", ("num_iterations", "p_mask_prompt", "spg_mode", "spg_beta", "spg_omega", "spg_copies"),
                       spg_draw, spg_estimate, spg_loss, normaliser=lambda cmask, G: cmask.sum(), ratio=False,
                       passes=lambda cfg: cfg.spg_copies, copies=lambda cfg: cfg.spg_copies),
    "espo": D.Objective("ESPO", ("num_iterations", "beta", "epsilon", "espo_mc"), espo_draw, espo_estimate,
                        espo_loss, normaliser=lambda cmask, G: len(cmask), passes=lambda cfg: 2 * cfg.espo_mc,
                        copies=lambda cfg: 2 * cfg.espo_mc),
}


# -----------------------------------------------------------------------------
# The recipe: d1's (diffu_grpo.GRPOConfig) plus the methods' own flags; a flag a method does not use is refused.

GROUP = "beyond d1 (methods.py)"


@dataclass(frozen=True)
class MethodConfig(D.GRPOConfig):
    method: str = option("d1", "the RL objective: d1 (diffu-GRPO) or one published after it: wd1 (ratio-free "
                         "weighted likelihood), spg (sandwiched ELBO/EUBO bounds), espo (sequence ELBO ratio); each "
                         "takes its authors' beta and epsilon from a preset", GROUP, choices=sorted(METHODS))
    spg_mode: str = option("mix", "SPG's bound for completions with A <= 0: elbo, eubo, or mix = omega EUBO + "
                           "(1 - omega) ELBO", GROUP, choices=["elbo", "eubo", "mix"])
    spg_beta: float = option(1.5, "SPG's EUBO exponent (>= 1; authors: 1.5, and 1.0 on Sudoku)", GROUP)
    spg_omega: float = option(0.5, "SPG's mixture weight omega of the EUBO", GROUP)
    spg_copies: int = option(2, "SPG's m: block-masked copies of each completion per update", GROUP)
    espo_mc: int = option(2, "ESPO's M: mask draws per sequence ELBO, each a primary and a complementary pass", GROUP)

    def check(self, typed):
        """d1's checks, then: a flag the chosen --method does not use is refused, not ignored."""
        cfg = D.GRPOConfig.check(self, typed)
        unused = {"d1": ["spg_*", "espo_mc"], "wd1": ["beta", "epsilon", "spg_*", "espo_mc"],
                  "spg": ["beta", "epsilon", "espo_mc"], "espo": ["p_mask_prompt", "spg_*"]}[self.method]
        for name in typed:
            require(not any(name == u or (u.endswith("*") and name.startswith(u[:-1])) for u in unused),
                    f"--{name.replace('_', '-')} is not used by --method {self.method}")
        require(self.method not in ("wd1", "spg") or self.beta == 0, f"--method {self.method} has no KL term")
        require(self.spg_beta >= 1 and 0 <= self.spg_omega <= 1 and self.spg_copies >= 1 and self.espo_mc >= 1,
                "need --spg-beta >= 1 (a Renyi bound), 0 <= --spg-omega <= 1, --spg-copies >= 1 and --espo-mc >= 1")
        require(self.method != "espo" or self.epsilon < 1, "--method espo clips the sequence ratio to "
                "[1 - epsilon, 1 + epsilon]: need --epsilon < 1")
        return cfg


# The methods with their authors' values (their papers' scripts), applied over d1's presets: no KL for wd1 and SPG
# (nor a reference pass), ESPO's clip 0.2 and its per-task k2 KL coefficient, SPG's EUBO exponent 1.0 on Sudoku.
PRESETS = {
    **D.PRESETS,
    "wd1": dict(beta=0.0),
    "spg": dict(beta=0.0),
    "spg sudoku": dict(spg_beta=1.0),
    "espo": dict(epsilon=0.2, beta=1e-3),
    "espo sudoku": dict(beta=1e-2),
    "espo countdown": dict(beta=3e-3),
}


def choose_presets(typed):
    """d1's presets (the task's values, the tiny recipe), then the --method's own values."""
    task, method = typed.get("task", MethodConfig.task), typed.get("method", MethodConfig.method)
    return D.choose_presets(typed) + [n for n in (method, f"{method} {task}") if n in PRESETS]


def get_config(argv=None):
    """(MethodConfig, the presets applied) from the command line."""
    cfg, names = parse_config(MethodConfig, argv, __doc__.split("\n\n")[0].strip() + "\n\n" +
                              __doc__.split("\n\n")[1], PRESETS, choose_presets)
    return replace(cfg, preset="tiny" if "tiny" in names else "d1"), names


def get_args(argv=None):
    return get_config(argv)[0]


def main(argv=None):
    cfg, presets = get_config(argv)
    return D.train(cfg, presets, METHODS[cfg.method])


if __name__ == "__main__":
    cli(main)
