"""
The masked diffusion sampler of LLaDA (Nie et al., arXiv 2502.09992, Sec. 2.4 and App. B), batched, padding-correct,
and with an opt-in fast mode (Fast-dLLM, arXiv 2505.22618).

    python sample.py --model tiny --prompt "sudoku 1030020040000301"      # any model: tiny, a local export, a hub id

Generation is the reverse of the forward masking process. The canvas starts as
    x_1 = [prompt ; MASK * gen_length]
and is unmasked over `steps` denoising steps. At each step the mask predictor sees the whole canvas
(bidirectionally) and proposes a token for every masked position, x0_hat = argmax p_theta(x_0 | x_t); the sampler
then COMMITS the k most confident proposals and leaves the rest masked ("low-confidence remasking"). Committed tokens
never change. The canvas is decoded in blocks of `block_length`, left to right ("semi-autoregressive"); later blocks
stay masked (and visible) until their turn.

This is the hot loop of the whole project (RL rollouts and evaluation are nearly all sampling), so the exact mode does
only the work the semantics need:
  - Only the current block's still-masked positions can be committed, so only they get logits: the LM head (126k x
    4096 for LLaDA-8B) runs on those rows instead of the whole canvas, and so do softmax and Gumbel noise.
  - The number of tokens committed per step is known in advance (all rows start each block fully masked), so the
    top-k is one batched torch.topk with a Python int: no per-row loop, no host syncs in the loop.
Fast mode (off by default) changes the outputs: it commits every proposal above a confidence threshold, and/or
reuses the keys/values of everything before the current block (prefix KV cache).

    python sample.py --model out/sft/final --prompt "sudoku 1030020040000301" --gen-length 40 --block-length 40
    python sample.py --model GSAI-ML/LLaDA-8B-Instruct --prompt "..." --gen-length 256 --steps 128 --device cuda

Dream-7B's sampler (--alg; dream_generate below) is the other rule: no blocks, the whole canvas over timesteps
t = 1 .. eps, committing int(m (1 - s/t)) positions per step by the algorithm's confidence. Of the fast modes, the
logits of the still-masked positions only (exact) applies to it; threshold decoding and the prefix cache are LLaDA's
block sampler's (the prefix cache cannot serve Dream: its first generated position reads the cached one before it).

    python sample.py --model Dream-org/Dream-v0-Instruct-7B --alg entropy --gen-length 256 --steps 256 --device cuda
"""

import math
import sys
import time
import warnings
from dataclasses import dataclass

import torch

from common import cli, setup_model
from config import HelpFormatter, Parser, add_model_args, option


@dataclass
class Generation:
    sequences: torch.Tensor  # (B, P + L) the final canvas, prompt included (left padding kept)
    completion: torch.Tensor  # (B, L) the generated part
    forward_passes: int  # model calls (a CFG call runs 2B rows but counts once)
    full_passes: int  # calls that ran the whole canvas (with a prefix cache: one per block)
    query_tokens: int  # positions run through the transformer, summed over calls and rows


def transfer_schedule(num_masked, steps):
    """How many tokens to commit at each of `steps` steps so that `num_masked` are committed in total, as evenly as
    possible, earlier steps taking the remainder. This is LLaDA's linear schedule: the expected fraction of masked
    tokens falls linearly in t (App. B, Eq. 8 discretised). 32 over 10 steps -> [4, 4, 3, 3, 3, 3, 3, 3, 3, 3]."""
    base, extra = divmod(num_masked, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


def propose(logits, temperature, remasking, generator):
    """logits (B, L, V) -> proposals x0 (B, L) and their confidences (B, L), fp32.

    temperature 0: x0 = argmax logits. Otherwise Gumbel-max in float64 with the reference's noise:
        x0 = argmax exp(l) / (-log u)^T = argmax  l - T log(-log u),   u ~ U(0, 1)
    i.e. a sample from softmax(l / T). We take the log of the reference formula (log is monotone, so the argmax is
    the same): two logs and a multiply instead of exp, pow and divide over (B, block, V) float64 numbers. float64
    because -log u for u near 1 loses its digits in fp32.
    Confidence for 'low_confidence' remasking is the UN-noised softmax probability of the proposed token,
    p(x0) = exp(l[x0] - logsumexp(l)), computed in fp32 without materialising the softmax; 'random' remasking
    uses uniform random confidences instead."""
    if temperature > 0:
        # g = l - T log(-log u), built in place in ONE float64 tensor (B, m, V): the same numbers as the formula
        # written out, without its four temporaries of the same size
        g = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
        x0 = g.log_().neg_().log_().mul_(-temperature).add_(logits).argmax(-1)
        del g
    else:
        x0 = logits.argmax(-1)
    if remasking == "low_confidence":
        lf = logits.float()
        conf = (lf.gather(-1, x0[..., None]).squeeze(-1) - lf.logsumexp(-1)).exp()
    else:  # random
        conf = torch.rand(x0.shape, generator=generator, device=x0.device)
    return x0, conf


def check_args(prompt_len, gen_length, block_length, steps, temperature, cfg_scale, remasking, mask_id, pad_id,
               max_len, threshold):
    """The impossible settings, each with a message that says what to change."""
    check_sampling(gen_length, block_length, steps, temperature, cfg_scale, remasking, threshold)
    if mask_id == pad_id:
        raise ValueError(f"mask id {mask_id} equals the pad id: padded prompt positions would look like masks")
    if max_len is not None and prompt_len + gen_length > max_len:
        raise ValueError(f"prompt ({prompt_len} tokens) + gen_length ({gen_length}) = {prompt_len + gen_length} "
                         f"exceeds the model's max_sequence_length {max_len}; shorten the prompt or gen_length")
    if threshold is None and steps > gen_length:
        warnings.warn(f"steps ({steps}) > gen_length ({gen_length}): some steps commit no token and only waste "
                      "forward passes")


def check_sampling(gen_length, block_length, steps, temperature, cfg_scale, remasking, threshold, alg=None):
    """The sampler's flags alone (scripts check them right after parsing, before a model loads)."""
    if alg is not None and (threshold is not None or cfg_scale):
        raise ValueError("--alg (Dream's sampler) decodes the whole canvas by its own rule: --threshold and "
                         "--cfg-scale belong to LLaDA's block sampler")
    if gen_length <= 0 or block_length <= 0 or steps <= 0:
        raise ValueError(f"gen_length ({gen_length}), block_length ({block_length}) and steps ({steps}) must be > 0")
    if gen_length % block_length:
        raise ValueError(f"--gen-length {gen_length} is not a multiple of --block-length {block_length}")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(f"--steps {steps} is not divisible by the number of blocks {num_blocks} "
                         f"(gen_length {gen_length} / block_length {block_length}); try --steps "
                         f"{max(num_blocks, steps // num_blocks * num_blocks)}")
    if remasking not in ("low_confidence", "random"):
        raise ValueError(f"--remasking {remasking!r}: choose 'low_confidence' or 'random'")
    if temperature < 0 or cfg_scale < 0:
        raise ValueError(f"temperature ({temperature}) and cfg_scale ({cfg_scale}) must be >= 0")
    if threshold is not None and remasking != "low_confidence":
        raise ValueError("threshold decoding needs remasking='low_confidence' (it thresholds the model's confidence)")


@torch.no_grad()
def generate(model, prompt_ids, attention_mask=None, *, gen_length=128, block_length=32, steps=64, temperature=0.0,
             cfg_scale=0.0, remasking="low_confidence", mask_id=None, pad_id=None, generator=None,
             threshold=None, prefix_cache=False, on_step=None, alg=None, alg_temp=None, top_p=None, top_k=None,
             eps=1e-3):
    """Sample completions for a batch of LEFT-padded prompts.

    prompt_ids (B, P) long; attention_mask (B, P) with 0 on left padding (None = no padding). The mask is extended
    with ones over the generated canvas, so padded positions are never attended and a row's output does not depend
    on what else is in the batch. mask_id / pad_id default to the model config's. All randomness (Gumbel noise,
    random remasking) comes from `generator` (default: a fresh one seeded with 0, so calls are reproducible).

    Exact mode (threshold=None, prefix_cache=False) follows LLaDA's reference sampler step for step.
    threshold=tau: inside the current block commit every masked proposal with confidence >= tau, and at least the
        most confident one per row, until the block is full (`steps` is then unused).
    prefix_cache=True: one full forward at the start of each block; its keys/values for the positions before the
        block are reused while the block is decoded, so later steps only run [block ; rest of canvas] as queries.
    on_step(x, s, e): called after every denoising step with the canvas and the current block [s, e) (sample.py
        --show prints it).
    alg: Dream's sampler instead (dream_generate: the whole canvas at once, no blocks; 'origin', 'maskgit_plus',
        'topk_margin' or 'entropy', with alg_temp, top_p, top_k and eps); block_length, remasking and the fast
        modes do not apply to it.
    """
    if alg is not None:
        return dream_generate(model, prompt_ids, attention_mask, gen_length=gen_length, steps=steps,
                              temperature=temperature, alg=alg, alg_temp=alg_temp, top_p=top_p, top_k=top_k, eps=eps,
                              generator=generator, on_step=on_step, mask_id=mask_id)
    cfg = model.cfg
    if prefix_cache and cfg.arch == "dream":
        raise ValueError("the prefix cache does not apply to Dream: with its logit shift, a block's first position "
                         "is predicted from the cached position before it")
    mask_id = cfg.mask_token_id if mask_id is None else mask_id
    pad_id = cfg.pad_token_id if pad_id is None else pad_id
    B, P = prompt_ids.shape
    check_args(P, gen_length, block_length, steps, temperature, cfg_scale, remasking, mask_id, pad_id,
               cfg.max_sequence_length, threshold)
    if generator is None:
        generator = torch.Generator(device=prompt_ids.device).manual_seed(0)
    # The canvas x_1 = [prompt ; all masks]. (B, P + L)
    x = torch.cat([prompt_ids, prompt_ids.new_full((B, gen_length), mask_id)], dim=1)
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # no padding: take the no-mask path once here, not a check in every forward
    attn = None if attention_mask is None else torch.cat(
        [attention_mask.to(torch.long), attention_mask.new_ones((B, gen_length), dtype=torch.long)], dim=1)
    fwd = _Forward(model, P, attn, cfg_scale, mask_id)
    steps_per_block = steps // (gen_length // block_length)
    for s in range(P, P + gen_length, block_length):  # semi-autoregressive: blocks left to right
        if threshold is None and not prefix_cache:
            exact_block(fwd, x, s, s + block_length, steps_per_block, temperature, remasking, generator, mask_id,
                        on_step)
        else:
            fast_block(fwd, x, s, s + block_length, steps_per_block, threshold, prefix_cache, temperature, remasking,
                       generator, mask_id, on_step)
    return Generation(x, x[:, P:], fwd.passes, fwd.full_passes, fwd.query_tokens)


class _Forward:
    """The mask predictor as the sampler calls it: logits for canvas positions [s, e) (B, e - s, V), with
    classifier-free guidance folded in, l = l_uncond + (w + 1)(l_cond - l_uncond) where the uncond canvas has the
    whole prompt masked (cond and uncond rows run as one batch). Counts passes and query tokens for benchmarks."""

    def __init__(self, model, P, attn, cfg_scale, mask_id):
        self.model, self.P, self.cfg_scale, self.mask_id = model, P, cfg_scale, mask_id
        self.attn = attn if cfg_scale <= 0 or attn is None else torch.cat([attn, attn])
        self.passes = self.full_passes = self.query_tokens = 0

    def __call__(self, x, s, e, cache=None, want_kv=False, index=None):
        """Logits for canvas positions [s, e), or with `index` (B, m) for those positions of each row only."""
        inp = x
        if self.cfg_scale > 0:
            un = x.clone()
            un[:, :self.P] = self.mask_id
            inp = torch.cat([x, un])
        start = 0 if cache is None else s  # with a prefix cache only [s, end) is run as queries
        where = dict(logits_slice=slice(s - start, e - start))
        if index is not None:
            where = dict(logits_index=(index if self.cfg_scale <= 0 else torch.cat([index, index])) - start)
        out = self.model(inp[:, start:], self.attn, past_kv=cache, return_kv=want_kv, **where)
        logits, kv = out if want_kv else (out, None)
        self.passes += 1
        self.full_passes += cache is None
        self.query_tokens += inp.shape[0] * (inp.shape[1] - start)
        if self.cfg_scale > 0:
            cond, uncond = logits.chunk(2)
            logits = uncond + (self.cfg_scale + 1) * (cond - uncond)
        return logits, kv


def exact_block(fwd, x, s, e, steps, temperature, remasking, generator, mask_id, on_step=None):
    """LLaDA's sampler (low-confidence remasking, as in its reference generate) on one block [s, e) of the canvas
    x, in place: for each of `steps` steps, predict every masked position from the whole canvas, then commit the k most
    confident proposals inside the block (k from the linear schedule) and leave the others masked. Every row starts
    the block fully masked, so the schedule is the same for all rows (the reference recomputes it per row from the
    mask count; the result is identical).

    Only what decides a token is computed: the LM head, the softmax, the confidence and the noise run on the m
    positions of the block still masked, not on all of them (a committed position's proposal would be thrown away).
    Every row has the same m (all start the block masked and commit k per step), so they form a (B, m) index. The
    reference draws Gumbel noise for the whole block; a position's noise is independent of the others', so drawing
    it for the masked ones only leaves each position's distribution unchanged (tests/test_sample.py replays it)."""
    block, m = x[:, s:e], e - s  # block: a view, writing into it writes the canvas; m: masked per row
    for k in transfer_schedule(e - s, steps):
        pos, _ = masked_first(block, mask_id, m)  # (B, m) offsets of the masked positions
        logits, _ = fwd(x, s, e, index=s + pos)  # (B, m, V)
        x0, conf = propose(logits, temperature, remasking, generator)  # (B, m) each
        if k > 0:
            top = conf.topk(k, dim=-1).indices  # (B, k) of the m; k <= m by construction
            block.scatter_(1, pos.gather(1, top), x0.gather(1, top))
            m -= k
        if on_step:
            on_step(x, s, e)


def masked_first(block, mask_id, m):
    """(pos (B, m), valid (B, m)): each row's masked positions of the block in order, first, then (for a row with
    fewer than m) committed ones, flagged invalid. A stable sort and a Python int m: no host sync."""
    masked = block == mask_id
    pos = (~masked).to(torch.int8).argsort(dim=1, stable=True)[:, :m]
    return pos, masked.gather(1, pos)


def fast_block(fwd, x, s, e, steps, threshold, prefix_cache, temperature, remasking, generator, mask_id,
               on_step=None):
    """exact_block with the fast paths (same proposals, different commit rule or cost):
    threshold=tau: commit every masked proposal with confidence >= tau, and at least the most confident one per row,
        until the block is full (`steps` is then unused).
    prefix_cache: one full forward at the start of the block; its keys/values for the positions before the block
        are reused while the block is decoded, so later steps run only [block ; rest of canvas] as queries.
    As in exact_block, only the block's still-masked positions get logits, softmax and noise. With a threshold the
    rows hold different numbers of masked positions: each row's masked positions come first in `pos` (B, m_max),
    padded with committed ones whose confidence is -inf, so they are never chosen."""
    block, cache, step, m = x[:, s:e], None, 0, e - s  # m: the most masked positions in any row
    schedule = transfer_schedule(e - s, steps) if threshold is None else None
    while threshold is not None or step < steps:
        pos, valid = masked_first(block, mask_id, m)  # (B, m) each; valid is False on the padding
        if prefix_cache and step > 0:
            logits, _ = fwd(x, s, e, cache=cache, index=s + pos)
        else:
            logits, kv = fwd(x, s, e, want_kv=prefix_cache, index=s + pos)
            if prefix_cache:  # freeze keys/values of everything before the block: (B, Hkv, s, hd) per layer
                cache = [(k[:, :, :s], v[:, :, :s]) for k, v in kv]
                del kv
        x0, conf = propose(logits, temperature, remasking, generator)  # (B, m)
        conf = torch.where(valid, conf, -math.inf)
        if threshold is None:
            if schedule[step] > 0:
                top = conf.topk(schedule[step], dim=-1).indices
                block.scatter_(1, pos.gather(1, top), x0.gather(1, top))
                m -= schedule[step]
        else:
            commit = valid & (conf >= threshold)
            best = conf.argmax(-1, keepdim=True)  # at least one token per row per step (if any is left)
            commit.scatter_(1, best, valid.gather(1, best))
            block.scatter_(1, pos, torch.where(commit, x0, block.gather(1, pos)))
            m = int((block == mask_id).sum(1).max())  # rows commit different numbers (one host sync per step)
        if on_step:
            on_step(x, s, e)
        if threshold is not None and m == 0:
            break
        step += 1


# -----------------------------------------------------------------------------
# Dream's sampler (its diffusion_generate): the whole canvas over timesteps t = linspace(1, eps, steps + 1)

DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")


def filter_logits(logits, top_p=None, top_k=None):
    """Nucleus (top_p < 1: keep the smallest set of most likely tokens whose probability reaches top_p, the token that
    crosses it included) and top-k filtering; a dropped token gets the dtype's lowest value."""
    low = torch.finfo(logits.dtype).min
    if top_p is not None and top_p < 1:
        srt, idx = logits.sort(-1, descending=True)
        drop = srt.softmax(-1).cumsum(-1) > top_p
        drop[..., 1:] = drop[..., :-1].clone()  # shift right: keep the token that crosses top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), low)
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, low)
    return logits


def dream_propose(logits, temperature, top_p, top_k, alg, generator):
    """Dream's sample_tokens on logits (n, V) -> (confidence (n,), proposal x0 (n,)): at temperature 0 the most likely
    token and its probability, else a draw from softmax(logits / T) (after top-p / top-k) and its probability; then
    the algorithm's confidence: top-1 minus top-2 probability (topk_margin) or the negative entropy (entropy)."""
    if temperature > 0:
        logits = logits / temperature
    probs = filter_logits(logits.float(), top_p, top_k).softmax(-1)
    if temperature > 0:
        x0 = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        conf = probs.gather(-1, x0[:, None]).squeeze(-1)
    else:
        conf, x0 = probs.max(-1)
    if alg == "topk_margin":
        top2 = probs.topk(2, -1).values
        conf = top2[:, 0] - top2[:, 1]
    elif alg == "entropy":
        conf = (probs * (probs + 1e-10).log()).sum(-1)
    return conf, x0


@torch.no_grad()
def dream_generate(model, prompt_ids, attention_mask=None, *, gen_length=128, steps=64, temperature=0.0,
                   alg="entropy", alg_temp=None, top_p=None, top_k=None, eps=1e-3, generator=None, on_step=None,
                   mask_id=None):
    """Dream's diffusion_generate on a left-padded batch: the canvas [prompt ; L masks] is decoded as a whole (no
    blocks) over timesteps t_i = linspace(1, eps, steps + 1). At step i (t = t_i, s = t_(i+1)), every masked position
    gets a proposal (dream_propose), then
      origin       each masked position is committed with probability 1 - s / t (1 at the last step);
      the others   n = int(m (1 - s / t)) positions per row (m: masked per row; all that remain at the last step),
                   the most confident (alg_temp None or 0) or sampled from softmax(confidence / alg_temp).
    Only the masked positions get logits (logits_index), as in LLaDA's exact sampler; Dream's logit shift is inside
    the model. All randomness comes from `generator`."""
    if alg not in DREAM_ALGS:
        raise ValueError(f"alg {alg!r}: choose one of {', '.join(DREAM_ALGS)}")
    if steps <= 0 or gen_length <= 0:
        raise ValueError(f"gen_length ({gen_length}) and steps ({steps}) must be > 0")
    mask_id = model.cfg.mask_token_id if mask_id is None else mask_id
    B, P = prompt_ids.shape
    if generator is None:
        generator = torch.Generator(device=prompt_ids.device).manual_seed(0)
    x = torch.cat([prompt_ids, prompt_ids.new_full((B, gen_length), mask_id)], dim=1)
    attn = None if attention_mask is None or bool(attention_mask.all()) else torch.cat(
        [attention_mask.to(torch.long), attention_mask.new_ones((B, gen_length), dtype=torch.long)], dim=1)
    timesteps = torch.linspace(1, eps, steps + 1)  # float32, as Dream's
    canvas, m, passes = x[:, P:], gen_length, 0  # canvas: a view; m: the most masked positions in any row
    for i in range(steps):
        last = i == steps - 1
        frac = 1 - timesteps[i + 1] / timesteps[i]  # 1 - s / t, a float32 scalar: Dream's arithmetic exactly
        if alg == "origin":  # each row commits a random number: its masked positions first, the rest flagged
            pos, valid = masked_first(canvas, mask_id, m)  # (B, m)
            logits = model(x, attn, logits_index=P + pos)  # (B, m, V)
            passes += 1
            conf, x0 = dream_propose(logits[valid], temperature, top_p, top_k, alg, generator)  # (n,) row-major
            commit = torch.rand(conf.shape, generator=generator, device=conf.device) < (1.0 if last else float(frac))
            canvas.scatter_(1, pos, canvas.gather(1, pos).masked_scatter(valid, torch.where(commit, x0, mask_id)))
            m = int((canvas == mask_id).sum(1).max())  # one host sync per step
        else:
            # Every row holds m masks and commits the same n = int(m (1 - s/t)) (all that remain at the last step):
            # int() of the float32 product, as Dream's (in float64 it could round the other way near an integer).
            # A step that commits nothing needs no forward pass.
            n = m if last else int(m * frac)
            if n > 0:
                pos, _ = masked_first(canvas, mask_id, m)  # (B, m), all masked
                logits = model(x, attn, logits_index=P + pos)  # (B, m, V)
                passes += 1
                conf, x0 = (t.view(B, m) for t in dream_propose(logits.flatten(0, 1), temperature, top_p, top_k,
                                                                 alg, generator))
                top = conf.topk(n, -1).indices if not alg_temp else \
                    torch.multinomial((conf / alg_temp).softmax(-1), n, generator=generator)  # (B, n)
                canvas.scatter_(1, pos.gather(1, top), x0.gather(1, top))
                m -= n
        if on_step:
            on_step(x, P, P + gen_length)
        if m == 0:
            break
    return Generation(x, canvas, passes, passes, passes * B * (P + gen_length))


class CanvasPrinter:
    """generate(on_step=...) for `sample.py --show`: after every K-th denoising step, row 0's canvas as one line:
    masked positions as a placeholder, EOS as '.', and the tokens committed since the last line highlighted (ANSI
    inverse video on a terminal, [brackets] otherwise), with the step, the block and how many are still masked.

        step  3 | block 1/2 |  9 masked | <answer>▒▒▒[3]▒[1]...
    """

    def __init__(self, tok, P, block_length, mask_id, eos_id, every=1, color=None, write=print):
        self.tok, self.P, self.bl, self.mask_id, self.eos_id = tok, P, block_length, mask_id, eos_id
        self.every, self.write, self.step, self.prev = every, write, 0, None
        self.color = color

    def _piece(self, t, new):
        text = "_" if t == self.mask_id else "." if t == self.eos_id else self.tok.decode([t])
        if t == self.mask_id and self.color:
            text = "\u2592"  # a shaded block
        if new:
            return f"\x1b[7m{text}\x1b[0m" if self.color else f"[{text}]"
        return text

    def __call__(self, x, s, e):
        self.step += 1
        row = x[0, self.P:].tolist()
        done = self.mask_id not in row
        if self.step % self.every and not done:
            return
        prev = self.prev or [self.mask_id] * len(row)
        line = "".join(self._piece(t, t != self.mask_id and p == self.mask_id) for t, p in zip(row, prev))
        n_blocks = len(row) // self.bl
        self.write(f"step {self.step:3d} | block {(s - self.P) // self.bl + 1}/{n_blocks} | "
                   f"{row.count(self.mask_id):3d} masked | {line}")
        self.prev = row


def completion_mask(completion, eos_id):
    """(B, L) -> (B, L) bool: tokens up to and including the first EOS (everything if there is none). The model
    fills the rest of its canvas with EOS; those are padding for scoring, RL losses and length statistics."""
    is_eos = completion == eos_id
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1), completion.shape[1])  # (B,)
    return torch.arange(completion.shape[1], device=completion.device)[None, :] <= first[:, None]


def decode_completions(tokenizer, completion, eos_id):
    """Completion ids (B, L) -> text up to the first EOS, special tokens removed."""
    keep = completion_mask(completion, eos_id)
    return [tokenizer.decode(row[m].tolist(), skip_special_tokens=True) for row, m in zip(completion, keep)]


def render_prompts(tokenizer, texts, prefill=""):
    """The exact text the model is given: each user text (or chat message list) through the chat template (LLaDA's
    always ends with the assistant header), then an optional prefill (d1's evaluation starts with '<reasoning>')."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}] if isinstance(t, str) else t,
                                          tokenize=False) + prefill for t in texts]


def encode_prompts(tokenizer, texts, device="cpu", prefill="", keep_last=None):
    """render_prompts, tokenized and left-padded: (ids (B, P), attention_mask (B, P), prompts cut). With keep_last
    a longer prompt keeps its last N tokens (d1/TRL's left truncation, diffu_grpo.py --max-prompt-length)."""
    lists = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in render_prompts(tokenizer, texts, prefill)]
    cut = keep_last or max(len(p) for p in lists)
    ids, attn = pad_left([p[-cut:] for p in lists], tokenizer.pad_token_id, device)
    return ids, attn, sum(len(p) > cut for p in lists)


def pad_left(rows, pad_id, device="cpu"):
    """List of id lists -> (ids (B, P), attention_mask (B, P)) left-padded, so every completion starts at column P."""
    P = max(len(r) for r in rows)
    ids = torch.full((len(rows), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), P), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, P - len(r):] = torch.tensor(r)
            mask[i, P - len(r):] = 1
    return ids.to(device), mask.to(device)


# The sampler's flags, described once: sample.py and eval.py build them with add_sampling_args, diffu_grpo.py declares
# them in its config with the same names, help and meaning.
SAMPLING_FLAGS = {
    "gen_length": ("tokens to generate (the canvas length)", dict(type=int)),
    "block_length": ("semi-autoregressive block size, in tokens (divides --gen-length)", dict(type=int)),
    "steps": ("denoising steps in total, split evenly over the blocks", dict(type=int, aliases=["--diffusion-steps"])),
    "temperature": ("0 = greedy; > 0 = Gumbel-max sampling in float64", dict(type=float)),
    "cfg_scale": ("classifier-free guidance weight (0 = off)", dict(type=float)),
    "remasking": ("which proposals to commit each step: the most confident, or random ones",
                  dict(choices=["low_confidence", "random"])),
    "threshold": ("fast mode: commit every proposal with confidence >= this (e.g. 0.9); unset = the exact sampler",
                  dict(type=float)),
    "prefix_cache": ("fast mode: reuse the K/V of the positions before the current block", {}),
    "alg": ("Dream's sampler instead (the whole canvas, no blocks), committing by this confidence: origin (each "
            "masked token with probability 1 - s/t), maskgit_plus (top probability), topk_margin (top-1 minus top-2) "
            "or entropy (negative entropy); unset = LLaDA's block sampler", dict(type=str, choices=DREAM_ALGS)),
    "alg_temp": ("with --alg: sample the positions to commit from softmax(confidence / this) (unset or 0: the most "
                 "confident)", dict(type=float)),
    "top_p": ("with --alg: nucleus filtering of the proposals", dict(type=float)),
    "top_k": ("with --alg: top-k filtering of the proposals", dict(type=int)),
}


def sampling_option(name, default):
    """A config field (config.option) for one of the sampler's flags: diffu_grpo.py's rollout settings."""
    help, kw = SAMPLING_FLAGS[name]
    kw = {k: v for k, v in kw.items() if k != "type" or default is None}  # a None default needs its type
    return option(default, help, "sampling (rollouts)", **kw)


def add_sampling_args(ap, gen_length=128, block_length=32, steps=64, temperature=0.0, several_lengths=False):
    """The sampler's flags for sample.py and eval.py (eval.py takes several generation lengths), in one group."""
    g = ap.add_argument_group("sampling")
    defaults = dict(gen_length=gen_length, block_length=block_length, steps=steps, temperature=temperature,
                    cfg_scale=0.0, remasking="low_confidence", threshold=None, prefix_cache=False, alg=None,
                    alg_temp=None, top_p=None, top_k=None)
    for name, (help, kw) in SAMPLING_FLAGS.items():
        kw, d = dict(kw), defaults[name]
        names = ["--" + name.replace("_", "-")] + kw.pop("aliases", [])
        if name == "prefix_cache":
            kw["action"] = "store_true"
        elif d is not None:
            help += f" (default: {' '.join(map(str, d)) if isinstance(d, list) else d})"
        if name == "gen_length" and several_lengths:
            kw["nargs"], help = "+", help.replace("length)", "length; one run per value)")
        if name == "steps" and d is None:
            help += " (default: gen_length // 2)"
        g.add_argument(*names, dest=name, default=d, help=help, **kw)
    return g


def sampling_kwargs(args):
    """generate()'s keywords from parsed flags or a config (one without Dream's flags samples with LLaDA's)."""
    return dict(gen_length=args.gen_length, block_length=args.block_length, steps=args.steps,
                temperature=args.temperature, cfg_scale=args.cfg_scale, remasking=args.remasking,
                threshold=args.threshold, prefix_cache=args.prefix_cache,
                **{k: getattr(args, k) for k in ("alg", "alg_temp", "top_p", "top_k") if getattr(args, k, None)})


def main(argv=None):
    """python sample.py: sample completions of a few prompts from any model, optionally watching the canvas."""
    ap = Parser(description="\n\n".join(__doc__.split("\n\n")[:2]), formatter_class=HelpFormatter)
    add_model_args(ap)
    g = ap.add_argument_group("prompts")
    g.add_argument("--prompt", action="append", default=None,
                   help="user message; repeat the flag for several prompts, batched together (default: two examples)")
    s = add_sampling_args(ap)
    s.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (with --temperature > 0)")
    w = ap.add_argument_group("watching the canvas")
    w.add_argument("--show", action="store_true", help="print the first prompt's canvas after every denoising step: "
                   "masked positions as a placeholder, the tokens committed at that step highlighted")
    w.add_argument("--show-every", type=int, default=1, metavar="K", help="with --show, every K-th step (and the last)")
    w.add_argument("--color", default="auto", choices=["auto", "always", "never"],
                   help="highlight with ANSI colours (auto: when stdout is a terminal)")
    args = ap.parse_args(argv)
    try:
        check_sampling(args.gen_length, args.gen_length if args.alg else args.block_length, args.steps,
                       args.temperature, args.cfg_scale, args.remasking, args.threshold, args.alg)
    except ValueError as e:
        ap.error(str(e))
    if args.alg and args.prefix_cache:
        ap.error("--prefix-cache belongs to LLaDA's block sampler, not to --alg (Dream's sampler)")
    if args.show_every < 1:
        ap.error(f"--show-every must be >= 1, not {args.show_every}")
    model, tok, device = setup_model(args)
    prompts = args.prompt or ["What is 2+2?", "Write the digits 1 to 4."]
    ids, mask, _ = encode_prompts(tok, prompts, device)
    g = torch.Generator(device=device).manual_seed(args.seed)
    t0 = time.perf_counter()
    show = None
    if args.show:
        color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
        show = CanvasPrinter(tok, ids.shape[1], args.gen_length if args.alg else args.block_length,
                             model.cfg.mask_token_id, model.cfg.eos_token_id, args.show_every, color)
        print(f"### {prompts[0]}")
    out = generate(model, ids, mask, generator=g, on_step=show, **sampling_kwargs(args))
    dt = time.perf_counter() - t0
    for p, text in zip(prompts, decode_completions(tok, out.completion, model.cfg.eos_token_id)):
        print(f"### {p}\n{text}\n")
    print(f"{ids.shape[0]} x {args.gen_length} tokens in {dt:.2f}s ({ids.shape[0] * args.gen_length / dt:.1f} tok/s) | "
          f"{out.forward_passes} forward passes ({out.full_passes} full-canvas) | {out.query_tokens} query tokens")


if __name__ == "__main__":
    cli(main)
