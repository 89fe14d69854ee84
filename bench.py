"""
Benchmarks: where the time of a diffu-GRPO step goes, and how our sampler compares with a reference-style loop.

    python bench.py --config cpu-small --temperature 0         # a few minutes on a laptop CPU

Sections (each prints a markdown table; --out appends them to a file):
  sampler  - tokens/s and forward passes of: a reference-style sampler (LLaDA/d1's public loop: logits, softmax
             and, at temperature > 0, float64 Gumbel noise over the WHOLE canvas and vocabulary every step, and a
             Python loop over rows for the top-k), our exact mode, threshold decoding, and threshold + prefix cache.
             The reference-style loop is slow, so by default it runs only the first block (--ref-blocks 1) and its
             per-step time is projected to the full run; its block-1 tokens are compared with ours (greedy).
  logprob  - one one-step log-prob pass (the estimator) over the rollout batch, forward only.
  grpo     - one whole diffu-GRPO rollout batch by phase (generation, rewards, old + reference log-probs, the mu
             inner updates), side by side with the same step written the way d1's trainer works (the reference-style
             sampler with autograd on and noise in the model's dtype, full-sequence logits in the log-prob passes;
             --skip-d1 omits it), --repeat times alternating; then ours in generated tokens/s, seconds per rollout
             batch and peak memory (GPU).
--plan prints the memory plan of a run instead (memory.py: peak GPU memory per rank, broken down, and the largest
update micro-batch that fits --gpu-gib); it builds no model, so it runs anywhere in a second or two.
Configs: cpu-small (4 layers, d_model 256, LLaDA's real 126,464-token vocabulary, so the per-step vocabulary work is
represented) and llada-8b (the full architecture, random init, bf16: for a GPU).

    python bench.py --config cpu-small --temperature 0 --out BENCHMARKS.md
    python bench.py --config llada-8b --device cuda --dtype bfloat16 --sections sampler logprob grpo
    python bench.py --config cpu-small --sections grpo --gen-length 64 --block-length 32 --steps 32 --temperature 0.3 \
        --mu 2 --lora-r 8 --repeat 3                              # d1's per-device knobs, ours vs d1-style
    python bench.py --plan --config llada-8b                     # d1's per-device diffu-GRPO setting
    python bench.py --plan --config llada-8b --prompt-len 0 --gen-length 4096 --micro-batch-size 1 \
        --lora-targets q_proj,k_proj,v_proj --grad-ckpt            # d1's SFT on s1K, one example per device
    python bench.py --plan --config llada-8b --lora-r 0 --full-ft-reference --fsdp --world-size 8
                                                                 # full fine-tuning, sharded over 8 GPUs
"""

import contextlib
import copy
import math
import os
import platform
import time

import torch
import torch.nn.functional as F

from common import Trainer, cli, compute_init
from config import HelpFormatter, Parser
from rewards import weighted_rewards

import diffu_grpo as D
import memory as Mem
import model as M
import parallel as P
import sample as S

CONFIGS = {
    "cpu-small": dict(d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, mlp_hidden_size=768, vocab_size=126464,
                      embedding_size=126464, max_sequence_length=4096),
    "llada-8b": dict(),  # LLaDAConfig's defaults are LLaDA-8B's
    "dream-7b": dict(d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4, mlp_hidden_size=18944, vocab_size=152064,
                     embedding_size=152064, rope_theta=1e6, rms_norm_eps=1e-6, max_sequence_length=4096, arch="dream"),
}


def reference_style_generate(model, prompt, attn, gen_length, block_length, steps, temperature, mask_id,
                             max_blocks=None, grad=False, noise_dtype=torch.float64, phases=None):
    """LLaDA's generate.py loop, costs included: full-canvas logits and softmax (in the logits' dtype), float64
    Gumbel noise over the canvas x vocabulary at temperature > 0, a Python loop over rows for the top-k. Semantics
    equal sample.generate's exact mode. The sampler inside d1's trainer is the same loop with autograd on (grad=True)
    and the noise in the model's dtype (noise_dtype). phases: a dict that receives the seconds spent in the forward
    pass, the noise and the rest (softmax, top-k)."""
    B, P = prompt.shape
    x = torch.cat([prompt, torch.full((B, gen_length), mask_id, device=prompt.device)], 1)
    attn = torch.cat([attn, torch.ones((B, gen_length), dtype=attn.dtype, device=attn.device)], 1)
    nb = gen_length // block_length
    spb = steps // nb
    passes = 0
    clock = Clock(prompt.device, phases)
    with torch.set_grad_enabled(grad):
        for b in range(nb if max_blocks is None else min(nb, max_blocks)):
            s, e = P + b * block_length, P + (b + 1) * block_length
            m = (x[:, s:e] == mask_id).sum(1, keepdim=True)
            k = (m // spb).repeat(1, spb)
            for j in range(B):
                k[j, : int(m[j] % spb)] += 1
            for i in range(spb):
                mask_index = x == mask_id
                with clock("forward"):
                    logits = model(x, attn)  # (B, P + L, V): every position of the canvas
                passes += 1
                with clock("noise"):
                    if temperature > 0:
                        ln = logits.to(noise_dtype)
                        x0 = (ln.exp() / (-torch.log(torch.rand_like(ln))) ** temperature).argmax(-1)
                        del ln
                    else:
                        x0 = logits.argmax(-1)
                with clock("softmax and top-k"):
                    p = F.softmax(logits, dim=-1)
                    conf = torch.gather(p, -1, x0[..., None]).squeeze(-1)
                    conf[:, e:] = -math.inf
                    x0 = torch.where(mask_index, x0, x)
                    conf = torch.where(mask_index, conf, -math.inf)
                    for j in range(B):
                        idx = torch.topk(conf[j], int(k[j, i])).indices
                        x[j, idx] = x0[j, idx]
                    del p, logits
    return x[:, P:].detach(), passes


def d1_style_logps(model, prompt_ids, prompt_attn, completion, pattern, mask_id):
    """The one-step estimator as d1's trainer computes it: logits for the WHOLE sequence (B, P + L, V), then the
    completion's slice, then log-softmax at the completion tokens. Same numbers as diffu_grpo.per_token_logps."""
    P, L = prompt_ids.shape[1], completion.shape[1]
    x = D.masked_input(prompt_ids, pattern, L, mask_id)
    logits = model(x, torch.cat([prompt_attn, torch.ones_like(completion)], 1))[:, P:].float()
    return logits.gather(-1, completion[..., None]).squeeze(-1) - logits.logsumexp(-1)


def d1_style_step(policy, opt, params, rows, tok, cfg, gens, device):
    """One rollout batch the way d1's DiffuGRPOTrainer spends it: the same calls of the same shapes as
    diffu_grpo.rl_step (sampler forwards, mu old and mu ref passes, mu forward+backward, mu optimizer steps), with
    d1's costs: the reference-style sampler with autograd on, full-sequence logits in every log-prob pass.
    Returns {phase: seconds}."""
    model, G, mu, mask_id = policy.model, cfg.num_generations, cfg.num_iterations, policy.model.cfg.mask_token_id
    t, clock = {}, Clock(device, None)
    clock.phases = t
    rows = [r for r in rows for _ in range(G)]
    prompt_ids, prompt_attn, _ = S.encode_prompts(tok, [r["prompt"] for r in rows], device,
                                                  keep_last=cfg.max_prompt_length)
    model.train(cfg.rollout_mode == "train")
    inside = {}  # the sampler's own split: forward, noise, softmax and top-k
    with clock("generation"):
        torch.manual_seed(0)  # the reference draws from the global generator
        completion, _ = reference_style_generate(model, prompt_ids, prompt_attn, cfg.gen_length, cfg.block_length,
                                                 cfg.steps, cfg.temperature, mask_id, grad=True,
                                                 noise_dtype=next(model.parameters()).dtype, phases=inside)
    t["noise"] = inside.get("noise", 0.0)
    with clock("rewards"):
        cmask = S.completion_mask(completion, model.cfg.eos_token_id).float()
        texts = S.decode_completions(tok, completion, model.cfg.eos_token_id)
        _, adv, _ = D.score_rollouts(rows, texts, weighted_rewards(cfg.task, cfg.reward_weights), G,
                                       cfg.scale_rewards)
        adv = adv.to(device)
    patterns = D.prompt_mask_patterns(gens["mask"], mu, prompt_attn, cfg.p_mask_prompt)
    with clock("old + ref log-probs"), torch.no_grad():  # old: only when mu > 1, as in rl_step
        old = [d1_style_logps(model, prompt_ids, prompt_attn, completion, patterns[j], mask_id) if mu > 1 else None
               for j in range(mu)]
        with policy.ref_context():
            ref = [d1_style_logps(model, prompt_ids, prompt_attn, completion, patterns[j], mask_id)
                   for j in range(mu)] if cfg.beta > 0 else [None] * mu
    with clock("inner updates"):
        model.train()
        for j in range(mu):
            for i in range(0, len(rows), cfg.micro_batch_size):
                sl = slice(i, i + cfg.micro_batch_size)
                logp = d1_style_logps(model, prompt_ids[sl], prompt_attn[sl], completion[sl], patterns[j][sl],
                                      mask_id)
                ref_j = None if ref[j] is None else ref[j][sl]
                old_j = logp.detach() if old[j] is None else old[j][sl]
                loss, _ = D.grpo_token_loss(logp, old_j, ref_j, adv[sl], cmask[sl], cfg.epsilon, cfg.beta)
                (loss / cmask.sum().clamp(min=1)).backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return t


class Clock:
    """with clock("name"): ... adds the block's seconds to phases["name"] (synchronising a GPU first)."""

    def __init__(self, device, phases):
        self.device, self.phases = device, phases

    @contextlib.contextmanager
    def __call__(self, name):
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        yield
        sync()
        if self.phases is not None:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t0


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def table(title, header, rows):
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def bench_sampler(model, prompt, attn, args, device):
    kw = dict(gen_length=args.gen_length, block_length=args.block_length, steps=args.steps,
              temperature=args.temperature)
    B, L = prompt.shape[0], args.gen_length
    nb = L // args.block_length
    g = lambda: torch.Generator(device=device).manual_seed(0)
    rows = []
    ref_blocks = args.ref_blocks if args.ref_blocks > 0 else nb
    phases = {}
    (ref_out, ref_passes), t_ref = timed(lambda: reference_style_generate(
        model, prompt, attn, L, args.block_length, args.steps, args.temperature, model.cfg.mask_token_id,
        max_blocks=ref_blocks, phases=phases), device)
    per_step = t_ref / ref_passes
    t_ref_full = per_step * args.steps
    note = "" if ref_blocks == nb else f" (measured {ref_passes} steps, projected)"
    rows.append(["reference-style loop", args.steps, args.steps, f"{per_step:.3f}", f"{t_ref_full:.1f}{note}",
                 f"{B * L / t_ref_full:.1f}", "1.00x", "-"])
    exact, t_exact = timed(lambda: S.generate(model, prompt, attn, generator=g(), **kw), device)
    same = "-"
    if args.temperature == 0:
        n = ref_blocks * args.block_length
        same = "yes" if torch.equal(exact.completion[:, :n], ref_out[:, :n]) else "NO"
    fast = [] if args.skip_fast else [
                         ("ours, threshold 0.9", *timed(lambda: S.generate(model, prompt, attn, generator=g(),
                                                                          threshold=0.9, **kw), device)),
                         ("ours, threshold 0.9 + prefix cache",
                          *timed(lambda: S.generate(model, prompt, attn, generator=g(), threshold=0.9,
                                                    prefix_cache=True, **kw), device))]
    for name, out, t in [("ours, exact", exact, t_exact)] + fast:
        rows.append([name, out.forward_passes, out.full_passes, f"{t / out.forward_passes:.3f}", f"{t:.1f}",
                     f"{B * L / t:.1f}",
                     f"{t_ref_full / t:.2f}x", same if name == "ours, exact" else "-"])
    where = ", ".join(f"{k} {v / ref_passes:.3f} s" for k, v in phases.items())
    return table(f"Sampler: batch {B}, prompt {prompt.shape[1]}, gen {L}, block {args.block_length}, "
                 f"{args.steps} steps, temperature {args.temperature}",
                 ["sampler", "forward passes", "full-canvas passes", "s / pass", "total s", "tokens/s", "speed-up",
                  "same tokens (block 1+)"],
                 rows) + f"\nOne step of the reference-style loop: {where}.\n"


def rl_config(args):
    """The diffu-GRPO settings of one rank's rollout batch: one Sudoku prompt x --batch completions."""
    return D.get_args(["--task", "sudoku", "--gen-length", str(args.gen_length), "--block-length",
                       str(args.block_length), "--steps", str(args.steps), "--temperature", str(args.temperature),
                       "--num-iterations", str(args.mu), "--beta", str(args.beta), "--num-generations",
                       str(args.batch), "--prompts-per-step", "1", "--micro-batch-size", str(args.batch),
                       "--max-prompt-length", str(args.prompt_len), "--lora-r", str(args.lora_r),
                       "--lora-targets", args.lora_targets])


PHASES = {"generation": ["rollout"], "rewards": ["rewards"], "old + ref log-probs": ["old_logps", "ref_logps"],
          "inner updates": ["update"]}


def bench_grpo(model, tok, args, device, sections):
    """One rollout batch of diffu-GRPO (rl_step, timed by its own clock) and, unless --skip-d1, the same batch
    stepped the way d1's trainer does it (d1_style_step), alternating --repeat times from the same weights."""
    if args.lora_r:
        M.apply_lora(model, args.lora_r, 64.0, 0.05, targets=D.lora_targets(args.lora_targets),
                     generator=torch.Generator().manual_seed(0))
    else:
        model.requires_grad_(True)
    cfg = rl_config(args)
    from data import load_task
    rows = [load_task("sudoku", "train", n=1)[0]]
    world = int(os.environ.get("WORLD_SIZE", 1))  # under torchrun: DDP, or FSDP2 with --fsdp (parallel.py)
    # Full fine-tuning with beta > 0 keeps a frozen reference copy (sharded too with --fsdp), as diffu_grpo.py does.
    policy_ref = copy.deepcopy(model).requires_grad_(False) if not args.lora_r and args.beta else None
    if policy_ref is not None:
        P.distribute(policy_ref, args.fsdp, world, device)
    params = P.distribute(model, args.fsdp, world, device)
    start = [p.detach().clone() for p in params]
    policy = D.Policy(model, policy_ref)
    runs = []
    for _ in range(args.repeat):
        for who in (["d1"] if not args.skip_d1 else []) + ["ours"]:
            with torch.no_grad():
                for p, p0 in zip(params, start):
                    p.copy_(p0)
            opt = torch.optim.AdamW(params, lr=3e-6)
            gens = {k: torch.Generator(device=device).manual_seed(i) for i, k in enumerate(("rollout", "mask"))}
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            if who == "d1":
                (t, total) = timed(lambda: d1_style_step(policy, opt, params, rows, tok, cfg, gens, device), device)
            else:
                sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
                tr = Trainer(model, opt, sched, params, world)
                (metrics, _), total = timed(lambda: D.rl_step(policy, tr, rows, tok, cfg, gens), device)
                t = {k: sum(metrics[f"time/{n}"] for n in names) for k, names in PHASES.items()}
            t["whole step"] = total
            t["peak"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
            runs.append((who, t))
    mean = lambda who, k: sum(t[k] for w, t in runs if w == who) / args.repeat
    L, N = args.gen_length, args.batch
    head = (f"diffu-GRPO step: {N} completions of one Sudoku prompt (<= {args.prompt_len} tokens), gen {L}, block "
            f"{args.block_length}, {args.steps} steps, T {args.temperature}, mu {args.mu}, beta {args.beta}, "
            f"LoRA r {args.lora_r} on {args.lora_targets}, micro-batch {N}; mean of {args.repeat} run(s)"
            + (f"; rank 0 of {world}, {'FSDP2' if args.fsdp else 'DDP'}" if world > 1 else "")
            + ("" if P.GATHER_ONCE or not args.fsdp else ", weights gathered at every forward pass"))
    out = ""
    if "logprob" in sections:
        out += table("One-step log-prob estimator (forward only, whole rollout batch)", ["rows", "s / pass"],
                     [[N, f"{mean('ours', 'old + ref log-probs') / (args.mu * (1 + (args.beta > 0))):.3f}"]])
    if "grpo" not in sections:
        return out
    keys = list(PHASES) + ["whole step"]
    if args.skip_d1:
        rows_ = [[k, f"{mean('ours', k):.2f}"] for k in keys]
        out += table(head, ["phase", "ours, s"], rows_)
    else:
        rows_ = [[k, f"{mean('d1', k):.2f}", f"{mean('ours', k):.2f}",
                  f"{mean('d1', k) / max(mean('ours', k), 1e-9):.2f}x"]
                 for k in keys]
        per_run = [f"{d['whole step'] / o['whole step']:.2f}x" for (_, d), (_, o) in zip(runs[0::2], runs[1::2])]
        out += table(head, ["phase", "d1-style step, s", "ours, s", "ratio"], rows_)
        out += f"\nWhole-step ratio per run: {', '.join(per_run)}\n"
        bare = mean("d1", "whole step") - mean("d1", "noise")
        out += (f"\nThe d1-style sampler's noise took {mean('d1', 'noise'):.2f} s of its generation. Without any noise "
                f"(a lower bound for a step with full-canvas logits) the d1-style step takes {bare:.2f} s: "
                f"{bare / mean('ours', 'whole step'):.2f}x ours.\n")
    ours = [t for w, t in runs if w == "ours"]
    peak = ours[-1]["peak"]
    out += (f"\nOurs: {N * L / mean('ours', 'generation'):.1f} generated tokens/s, {mean('ours', 'whole step'):.2f} s "
            f"per rollout batch ({args.mu} optimizer steps), peak memory "
            f"{'-' if peak is None else f'{peak:.1f} GiB'}\n")
    return out


def print_plan(args):
    """The memory plan of one rank for the given settings, and the largest micro-batch within --gpu-gib."""
    dtype = torch.bfloat16 if args.dtype == "float32" and args.config != "cpu-small" else getattr(torch, args.dtype)
    cfg = M.LLaDAConfig(**CONFIGS[args.config])
    s = Mem.Setting(cfg, micro_batch=args.micro_batch_size, prompt_len=args.prompt_len, completion_len=args.gen_length,
                    dtype=dtype, lora_r=args.lora_r, lora_targets=D.lora_targets(args.lora_targets),
                    grad_ckpt=args.grad_ckpt, full_ft_reference=args.full_ft_reference,
                    logp_rows=args.logp_batch_size or args.micro_batch_size, world=args.world_size, fsdp=args.fsdp)
    p = Mem.plan(s)
    fit = Mem.largest_micro_batch(s, args.gpu_gib * Mem.GIB)
    text = (f"## Memory plan: --config {args.config}, {str(dtype).replace('torch.', '')}, LoRA r {args.lora_r} on "
            f"{','.join(s.lora_targets) if args.lora_r else '(full fine-tuning)'}, micro-batch {args.micro_batch_size} "
            f"x ({args.prompt_len} prompt + {args.gen_length} completion tokens), gradient checkpointing "
            f"{'on' if args.grad_ckpt else 'off'}, {args.world_size} rank(s)"
            f"{', FSDP2 (--fsdp)' if args.fsdp else ''}\n\n{Mem.format_plan(p, args.gpu_gib)}\n\n"
            f"Largest update micro-batch within {args.gpu_gib:.0f} GiB: {fit}\n")
    print(text)
    return p


def main(argv=None):
    ap = Parser(description=__doc__.split("\n")[1],
                                 formatter_class=HelpFormatter)
    m = ap.add_argument_group("model (random weights at a named size) and machine")
    m.add_argument("--config", default="cpu-small", choices=sorted(CONFIGS), help="model size")
    m.add_argument("--device", default="cpu", help="cpu or cuda")
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weight dtype")
    m.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    w = ap.add_argument_group("what to time")
    w.add_argument("--sections", nargs="+", default=["sampler", "logprob", "grpo"], choices=["sampler", "logprob",
                   "grpo"], help="the sampler against the reference-style loop, the log-prob estimator, a whole "
                   "diffu-GRPO step")
    w.add_argument("--repeat", type=int, default=1, help="GRPO step: runs of each side, alternating")
    w.add_argument("--ref-blocks", type=int, default=1, help="blocks the reference-style loop runs (0 = all)")
    w.add_argument("--skip-fast", action="store_true",
                   help="time only the reference loop and exact mode (random weights never reach a 0.9 confidence, "
                        "so threshold decoding degenerates to one token per step on them)")
    w.add_argument("--skip-d1", action="store_true",
                   help="time only our GRPO step, not also the step written the way d1's trainer works")
    w.add_argument("--out", default=None, help="append the tables to this markdown file")
    r = ap.add_argument_group("the rollout batch (timing and --plan)")
    r.add_argument("--batch", type=int, default=6, help="rollouts per batch (d1: 6 per device)")
    r.add_argument("--prompt-len", type=int, default=200, help="prompt tokens")
    r.add_argument("--gen-length", type=int, default=256, help="generated tokens")
    r.add_argument("--block-length", type=int, default=32, help="block length")
    r.add_argument("--steps", type=int, default=128, help="denoising steps")
    r.add_argument("--temperature", type=float, default=0.0, help="sampling temperature")
    r.add_argument("--mu", type=int, default=12, help="inner iterations in the GRPO step")
    r.add_argument("--beta", type=float, default=0.04, help="KL coefficient in the GRPO step (0: no reference passes)")
    r.add_argument("--lora-r", type=int, default=128, help="LoRA rank (0 = full fine-tuning)")
    r.add_argument("--lora-targets", default="d1", help="'d1', 'wide' or module names (see diffu_grpo.py)")
    p = ap.add_argument_group("the memory plan (--plan: print it and exit, nothing is timed)")
    p.add_argument("--plan", action="store_true", help="print the memory plan of these settings and exit")
    p.add_argument("--micro-batch-size", type=int, default=6, help="update micro-batch (d1: 6)")
    p.add_argument("--logp-batch-size", type=int, default=None,
                   help="rows per no-grad old/ref log-prob forward (default: --micro-batch-size)")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing")
    p.add_argument("--full-ft-reference", action="store_true",
                   help="with --lora-r 0: a frozen reference copy (diffu-GRPO with beta > 0)")
    p.add_argument("--gpu-gib", type=float, default=80.0, help="memory per GPU")
    p.add_argument("--world-size", type=int, default=1, help="ranks (GPUs) of the run")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (parallel.py): planned over --world-size "
                   "ranks with --plan; timed (grpo section) when launched with torchrun")
    p.add_argument("--gather-every-pass", action="store_true", help="with --fsdp: gather the weights at every "
                   "forward pass of the rollout and the old/ref passes, as plain FSDP2 does (to time what "
                   "parallel.gathered saves)")
    args = ap.parse_args(argv)
    if args.plan:
        return print_plan(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, _, world, device = compute_init(args.device)
    if world > 1 and not args.skip_d1:
        raise M.UsageError("under torchrun, time only ours: pass --skip-d1 (the d1-style step is one process)")
    P.GATHER_ONCE = not args.gather_every_pass
    dtype = getattr(torch, args.dtype)
    tok = M.tiny_tokenizer()  # token ids < 104 are valid in any config; the vocabulary size is the config's
    cfg = M.LLaDAConfig(**CONFIGS[args.config], mask_token_id=tok.mask_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    with torch.device(device):
        model = M.LLaDA(cfg)
    model.init_weights(torch.Generator().manual_seed(0)).to(dtype).eval()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(7, 104, (args.batch, args.prompt_len), generator=g).to(device)
    attn = torch.ones_like(prompt)
    hw = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or 'CPU'}, " \
                                                                     f"{torch.get_num_threads()} threads"
    report = (f"## bench.py --config {args.config} ({model.num_params() / 1e6:.1f}M params, {args.dtype}) on {hw}, "
              f"torch {torch.__version__}\n\n")
    if "sampler" in args.sections:
        report += bench_sampler(model, prompt, attn, args, device) + "\n"
    if "logprob" in args.sections or "grpo" in args.sections:
        report += bench_grpo(model, tok, args, device, args.sections) + "\n"
    if rank:
        return
    print(report)
    if args.out:
        with open(args.out, "a") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    cli(main)
