"""
LLaDA in lm-evaluation-harness, the harness LLaDA's own numbers come from (an optional extra: pip install lm_eval).

    python lmeval.py --model llada --model_args pretrained=out/grpo/final,gen_length=256,steps=256,block_length=32 \
        --tasks gsm8k --num_fewshot 4 --batch_size 8                        # any export, the tiny model, a hub id
    torchrun --nproc_per_node=8 lmeval.py --model llada --model_args pretrained=GSAI-ML/LLaDA-8B-Instruct ...

This file registers the model `llada` with the harness and then runs the harness's own command line, so every
lm_eval flag works as usual. The harness asks a model three things:
  generate_until          the project's sampler (sample.generate, every sampling flag a model_arg), batched and
                          left-padded; the text up to EOS, cut at the task's first stop sequence
  loglikelihood           LLaDA's Monte Carlo estimate of log p(continuation | context) (Nie et al., App. B.6):
                          mask l of the continuation's L tokens, l spread evenly over 1..L across a batch of samples
                          from a random offset; sum the masked tokens' cross-entropy weighted by L / l; average over
                          mc_num samples (one suffices for a single-token continuation: its only mask is exact).
                          Its greedy flag unmasks the continuation one token at a time, most confident first, and
                          asks whether that reproduces it.
  loglikelihood_rolling   not defined for a masked diffusion model: refused with a message
Randomness (masks, sampling noise) comes from generators seeded by `seed` and the request's text, so a request gets
the same numbers whatever its batch, order or rank. Under torchrun the harness shards the requests over the ranks;
this model gives it torch.distributed's gather (gloo on CPU, NCCL on GPU).
"""

import hashlib
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from common import compute_init, resolve_dtype
from sample import check_sampling, decode_completions, generate, pad_left
import weights as W

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:  # the functions below still import (and are tested) without the harness
    LM, register_model = object, lambda *names: (lambda cls: cls)

INSTALL = "lmeval.py needs lm-evaluation-harness, an optional extra: pip install lm_eval"

# -----------------------------------------------------------------------------
# LLaDA's likelihood estimate and its greedy check, as pure functions over token ids


def draw_masks(L, n, generator):
    """n mask patterns over a continuation of L tokens, (n, L) bool: sample i masks l_i tokens, the l_i spread evenly
    over 1..L from a random offset (l_i = ((k + i L / n) rounded - 1) mod L + 1), at uniformly random positions."""
    k = torch.randint(1, L + 1, (), generator=generator).item()
    counts = (torch.linspace(k, k + (n - 1) * L / n, n).round().long() - 1) % L + 1
    order = torch.rand(n, L, generator=generator).argsort(-1).argsort(-1)  # a random rank per position
    return order < counts[:, None]


def logits_of(model, x, prompt_len, mask_id, cfg_scale=0.0):
    """logits (n, T, V) of canvases x (n, T), with classifier-free guidance when cfg_scale > 0: the unconditional
    pass masks the whole prompt, and logits = u + (cfg_scale + 1) (c - u)."""
    if cfg_scale <= 0:
        return model(x).float()
    un = x.clone()
    un[:, :prompt_len] = mask_id
    c, u = model(torch.cat([x, un])).float().chunk(2)
    return u + (cfg_scale + 1) * (c - u)


@torch.no_grad()
def masked_nll(model, prefix, target, masks, mask_id, cfg_scale=0.0):
    """The estimate's terms for given masks: for each row of masks (n, L), sum over its masked positions k of
    -log p(target_k | canvas) * L / l, with canvas = prefix + target under the mask. Returns (n,) fp32."""
    n, L = masks.shape
    x = torch.cat([prefix, target])[None].repeat(n, 1)
    x[:, len(prefix):][masks] = mask_id
    logits = logits_of(model, x, len(prefix), mask_id, cfg_scale)[:, len(prefix):]       # (n, L, V)
    nll = F.cross_entropy(logits.flatten(0, 1), target.repeat(n), reduction="none").view(n, L)
    return (nll * masks).sum(1) * L / masks.sum(1)


def loglikelihood_of(model, prefix, target, mask_id, mc_num=128, batch_size=32, generator=None, cfg_scale=0.0):
    """LLaDA's Monte Carlo estimate of log p(target | prefix): minus the mean of masked_nll over mc_num samples,
    drawn batch_size at a time (one sample for a single-token target, whose one mask is exact)."""
    L = len(target)
    total = 0.0
    samples = 1 if L == 1 else mc_num
    for start in range(0, samples, batch_size):
        n = min(batch_size, samples - start)
        total += masked_nll(model, prefix, target, draw_masks(L, n, generator), mask_id, cfg_scale).sum().item()
    return -total / samples


@torch.no_grad()
def is_greedy(model, prefix, target, mask_id, cfg_scale=0.0):
    """Whether unmasking the target one token at a time, the most confident masked position first (its argmax
    token), reproduces it exactly."""
    x = torch.cat([prefix, torch.full_like(target, mask_id)])[None]
    for _ in range(len(target)):
        masked = x[0] == mask_id
        p = logits_of(model, x, len(prefix), mask_id, cfg_scale)[0].softmax(-1)  # (T, V)
        conf, token = p.max(-1)
        i = torch.where(masked, conf, -1.0).argmax()
        x[0, i] = token[i]
    return bool((x[0, len(prefix):] == target).all())


def request_generator(seed, *texts, device="cpu"):
    """A generator seeded by `seed` and a request's text (not its position): the same numbers in any batch, order
    or rank. hashlib, not hash(): Python salts string hashes per process."""
    digest = hashlib.sha256("\x00".join(texts).encode()).digest()
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + int.from_bytes(digest[:6], "big")) % 2**63)


def cut_at_stops(text, until):
    """The text before the first of the stop sequences (lm-eval's `until`)."""
    for stop in until or ():
        if stop and stop in text:
            text = text[:text.index(stop)]
    return text


# -----------------------------------------------------------------------------
# The model the harness calls


@register_model("llada")
class LLaDAEvalModel(LM):
    """model_args: pretrained (tiny | a directory | a hub id), dtype, device, gen_length, block_length, steps,
    temperature, remasking, threshold, prefix_cache, cfg_scale, alg, alg_temp, top_p, top_k (the sampler's flags, as
    sample.py's; a Dream model decodes with Dream's sampler, alg=entropy, unless alg is given), mc_num (the
    likelihood estimate's samples), seed. lm_eval's --batch_size is the prompts per generate call and the samples
    per likelihood forward pass. Dream's logit shift is inside the model: the likelihood needs nothing more."""

    def __init__(self, pretrained="tiny", dtype="auto", device="auto", gen_length=256, block_length=32, steps=None,
                 temperature=0.0, remasking="low_confidence", threshold=None, prefix_cache=False, cfg_scale=0.0,
                 mc_num=128, batch_size=32, seed=1234, alg=None, alg_temp=None, top_p=None, top_k=None, **ignored):
        batch_size = 32 if batch_size in (None, "auto") else batch_size  # lm_eval's --batch_size auto: a default
        if LM is object:
            raise ImportError(INSTALL)
        super().__init__()
        if str(device).startswith("cuda") and not torch.cuda.is_available():  # lm_eval's --device defaults to cuda
            print(f"lmeval.py: no CUDA here; running on the CPU instead of --device {device}", file=sys.stderr)
            device = "cpu"
        self._rank, _, self._world_size, device = compute_init(device or "auto")
        self._device = device
        self.model, self.tok = W.build(str(pretrained), resolve_dtype(dtype, device), device)
        self.model.eval()
        self.mask_id = self.model.cfg.mask_token_id
        self.sampling = dict(gen_length=int(gen_length), block_length=int(block_length),
                             steps=int(steps or gen_length), temperature=float(temperature), remasking=remasking,
                             threshold=None if threshold in (None, "None") else float(threshold),
                             prefix_cache=str(prefix_cache).lower() in ("true", "1"), cfg_scale=float(cfg_scale))
        alg = alg or ("entropy" if self.model.cfg.arch == "dream" else None)
        num = lambda v, t: None if v in (None, "None") else t(v)
        self.sampling.update({k: v for k, v in dict(alg=alg, alg_temp=num(alg_temp, float), top_p=num(top_p, float),
                                                     top_k=num(top_k, int)).items() if v is not None})
        check = {k: v for k, v in self.sampling.items() if k not in ("prefix_cache", "alg_temp", "top_p", "top_k")}
        check_sampling(**{**check, "block_length": self.sampling["gen_length"]} if alg else check)  # no blocks
        self.mc_num, self.batch_size, self.seed = int(mc_num), int(batch_size), int(seed)

    def ids(self, text):
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def loglikelihood(self, requests, disable_tqdm=False):
        out = []
        for req in requests:
            context, continuation = req.args
            # The continuation's tokens as they come in the whole text (a boundary may merge differently alone).
            whole, prefix = self.ids(context + continuation), self.ids(context)
            prefix = torch.tensor(whole[:len(prefix)], device=self.device)
            target = torch.tensor(whole[len(prefix):], device=self.device)
            g = request_generator(self.seed, context, continuation, device=self.device)
            ll = loglikelihood_of(self.model, prefix, target, self.mask_id, self.mc_num, self.batch_size, g,
                                  self.sampling["cfg_scale"])
            out.append((ll, is_greedy(self.model, prefix, target, self.mask_id, self.sampling["cfg_scale"])))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise NotImplementedError("loglikelihood_rolling (perplexity) is not defined for a masked diffusion model, "
                                  "which has no left-to-right factorisation; use generation or multiple-choice tasks")

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm=False):
        """Batches of batch_size requests, left-padded, each batch sampled with the generator of its first
        request; a request's own max_gen_toks is not used: the canvas is gen_length (a model_arg)."""
        out = []
        for i in range(0, len(requests), self.batch_size):
            chunk = requests[i:i + self.batch_size]
            ids, mask = pad_left([self.ids(r.args[0]) for r in chunk], self.tok.pad_token_id, self.device)
            g = request_generator(self.seed, chunk[0].args[0], device=self.device)
            completion = generate(self.model, ids, mask, generator=g, **self.sampling).completion
            texts = decode_completions(self.tok, completion, self.model.cfg.eos_token_id)
            out += [cut_at_stops(t, r.args[1].get("until")) for t, r in zip(texts, chunk)]
        return out

    # torch.distributed for the harness's gathers (it shards the requests over ranks itself)
    def all_gather(self, tensor):
        if self.world_size == 1:
            return tensor
        parts = [torch.zeros_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj, dst=0):
        if self.world_size == 1:
            return [obj]
        parts = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, parts, dst=dst)
        return parts

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()


def main():
    if LM is object:
        print(INSTALL, file=sys.stderr)
        sys.exit(2)
    from lm_eval.__main__ import cli_evaluate
    cli_evaluate()


if __name__ == "__main__":
    main()
