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
  grpo     - one full diffu-GRPO rollout batch split into rollout / old log-probs / reference log-probs / update.
--plan prints the memory plan of a run instead (memory.py: peak GPU memory per rank, broken down, and the largest
update micro-batch that fits --gpu-gib); it builds no model, so it runs anywhere in a second or two.
Configs: cpu-small (4 layers, d_model 256, LLaDA's real 126,464-token vocabulary, so the per-step vocabulary work is
represented) and llada-8b (the full architecture, random init, bf16: for a GPU).

    python bench.py --config cpu-small --temperature 0 --out BENCHMARKS.md
    python bench.py --config llada-8b --device cuda --dtype bfloat16 --sections sampler logprob grpo
    python bench.py --plan --config llada-8b                     # d1's per-device diffu-GRPO setting
    python bench.py --plan --config llada-8b --prompt-len 0 --gen-length 4096 --micro-batch-size 1 \
        --lora-targets q_proj,k_proj,v_proj --grad-ckpt            # d1's SFT on s1K, one example per device
"""

import argparse
import contextlib
import math
import platform
import time

import torch
import torch.nn.functional as F

from common import HelpFormatter

import diffu_grpo as D
import memory as Mem
import model as M
import sample as S

CONFIGS = {
    "cpu-small": dict(d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, mlp_hidden_size=768, vocab_size=126464,
                      embedding_size=126464, max_sequence_length=4096),
    "llada-8b": dict(),  # LLaDAConfig's defaults are LLaDA-8B's
}


@torch.no_grad()
def reference_style_generate(model, prompt, attn, gen_length, block_length, steps, temperature, mask_id,
                             max_blocks=None):
    """The public code's loop, costs included: full-canvas logits and softmax (in the logits' dtype), float64 Gumbel
    noise over the canvas x vocabulary at temperature > 0, per-row top-k. Semantics equal sample.generate's exact
    mode."""
    B, P = prompt.shape
    x = torch.cat([prompt, torch.full((B, gen_length), mask_id, device=prompt.device)], 1)
    attn = torch.cat([attn, torch.ones((B, gen_length), dtype=attn.dtype, device=attn.device)], 1)
    nb = gen_length // block_length
    spb = steps // nb
    passes = 0
    for b in range(nb if max_blocks is None else min(nb, max_blocks)):
        s, e = P + b * block_length, P + (b + 1) * block_length
        m = (x[:, s:e] == mask_id).sum(1, keepdim=True)
        k = (m // spb).repeat(1, spb)
        for j in range(B):
            k[j, : int(m[j] % spb)] += 1
        for i in range(spb):
            mask_index = x == mask_id
            logits = model(x, attn)
            passes += 1
            if temperature > 0:
                l64 = logits.to(torch.float64)
                x0 = (l64.exp() / (-torch.log(torch.rand_like(l64))) ** temperature).argmax(-1)
            else:
                x0 = logits.argmax(-1)
            p = F.softmax(logits, dim=-1)
            conf = torch.gather(p, -1, x0[..., None]).squeeze(-1)
            conf[:, e:] = -math.inf
            x0 = torch.where(mask_index, x0, x)
            conf = torch.where(mask_index, conf, -math.inf)
            for j in range(B):
                idx = torch.topk(conf[j], int(k[j, i])).indices
                x[j, idx] = x0[j, idx]
    return x[:, P:], passes


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
    (ref_out, ref_passes), t_ref = timed(lambda: reference_style_generate(
        model, prompt, attn, L, args.block_length, args.steps, args.temperature, model.cfg.mask_token_id,
        max_blocks=ref_blocks), device)
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
    return table(f"Sampler: batch {B}, prompt {prompt.shape[1]}, gen {L}, block {args.block_length}, "
                 f"{args.steps} steps, temperature {args.temperature}",
                 ["sampler", "forward passes", "full-canvas passes", "s / pass", "total s", "tokens/s", "speed-up",
                  "same tokens (block 1+)"],
                 rows)


def bench_logprob_and_grpo(model, tok, args, device, sections):
    """One diffu-GRPO rollout batch with d1's per-device settings, timed by rl_step's own clock."""
    out = ""
    M.apply_lora(model, args.lora_r, 64.0, 0.05, generator=torch.Generator().manual_seed(0))
    rl = D.get_args(["--task", "sudoku", "--gen-length", str(args.gen_length), "--block-length",
                     str(args.block_length), "--steps", str(args.steps), "--num-iterations", str(args.mu),
                     "--num-generations", str(args.batch), "--prompts-per-step", "1",
                     "--micro-batch-size", str(args.batch), "--max-prompt-length", str(args.prompt_len)])
    from data import load_task
    rows = [load_task("sudoku", "train", n=1)[0]]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    gens = {k: torch.Generator(device=device).manual_seed(i) for i, k in enumerate(("rollout", "mask"))}
    (metrics, _), total = timed(lambda: D.rl_step(D.Policy(model), opt, sched, params, rows, tok, rl, 1, gens,
                                                  contextlib.nullcontext(), device), device)
    mem = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else "-"
    t = {k.split("/")[1]: v for k, v in metrics.items() if k.startswith("time/")}
    if "logprob" in sections:
        per_pass = t["old_logps"] / args.mu
        out += table("One-step log-prob estimator (forward only, whole rollout batch)",
                     ["rows", "positions", "s / pass"], [[args.batch, args.prompt_len + args.gen_length,
                                                          f"{per_pass:.3f}"]])
    if "grpo" in sections:
        rows_ = [[k, f"{v:.2f}", f"{100 * v / total:.0f}%"] for k, v in t.items()]
        rows_.append(["total (incl. rewards)", f"{total:.2f}", "100%"])
        out += table(f"diffu-GRPO rollout batch: {args.batch} completions, mu={args.mu}, LoRA r={args.lora_r}, "
                     f"peak memory {mem}", ["phase", "s", "share"], rows_)
    return out


def print_plan(args):
    """The memory plan of one rank for the given settings, and the largest micro-batch within --gpu-gib."""
    dtype = torch.bfloat16 if args.dtype == "float32" and args.config == "llada-8b" else getattr(torch, args.dtype)
    cfg = M.LLaDAConfig(**CONFIGS[args.config])
    s = Mem.Setting(cfg, micro_batch=args.micro_batch_size, prompt_len=args.prompt_len, completion_len=args.gen_length,
                    dtype=dtype, lora_r=args.lora_r, lora_targets=D.lora_targets(args.lora_targets),
                    grad_ckpt=args.grad_ckpt, full_ft_reference=args.full_ft_reference,
                    logp_rows=args.logp_batch_size or args.micro_batch_size)
    p = Mem.plan(s)
    fit = Mem.largest_micro_batch(s, args.gpu_gib * Mem.GIB)
    text = (f"## Memory plan: --config {args.config}, {str(dtype).replace('torch.', '')}, LoRA r {args.lora_r} on "
            f"{','.join(s.lora_targets) if args.lora_r else '(full fine-tuning)'}, micro-batch {args.micro_batch_size} "
            f"x ({args.prompt_len} prompt + {args.gen_length} completion tokens), gradient checkpointing "
            f"{'on' if args.grad_ckpt else 'off'}\n\n{Mem.format_plan(p, args.gpu_gib)}\n\n"
            f"Largest update micro-batch within {args.gpu_gib:.0f} GiB: {fit}\n")
    print(text)
    return p


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--config", default="cpu-small", choices=sorted(CONFIGS), help="model size")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weight dtype")
    ap.add_argument("--sections", nargs="+", default=["sampler", "logprob", "grpo"], help="what to time")
    ap.add_argument("--batch", type=int, default=6, help="rollouts per batch (d1: 6 per device)")
    ap.add_argument("--prompt-len", type=int, default=200, help="prompt tokens")
    ap.add_argument("--gen-length", type=int, default=256, help="generated tokens")
    ap.add_argument("--block-length", type=int, default=32, help="block length")
    ap.add_argument("--steps", type=int, default=128, help="denoising steps")
    ap.add_argument("--temperature", type=float, default=0.0, help="sampling temperature")
    ap.add_argument("--ref-blocks", type=int, default=1, help="blocks the reference-style loop runs (0 = all)")
    ap.add_argument("--skip-fast", action="store_true",
                    help="time only the reference loop and exact mode (random weights never reach a 0.9 confidence, "
                         "so threshold decoding degenerates to one token per step on them)")
    ap.add_argument("--mu", type=int, default=12, help="inner iterations in the GRPO step")
    ap.add_argument("--lora-r", type=int, default=128, help="LoRA rank in the GRPO step")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default=None, help="append the tables to this markdown file")
    # Memory plan
    ap.add_argument("--plan", action="store_true", help="print the memory plan of these settings and exit")
    ap.add_argument("--micro-batch-size", type=int, default=6, help="--plan: update micro-batch (d1: 6)")
    ap.add_argument("--logp-batch-size", type=int, default=None,
                    help="--plan: rows per no-grad old/ref log-prob forward (default: --micro-batch-size)")
    ap.add_argument("--lora-targets", default="d1", help="--plan: 'd1', 'wide' or module names (see diffu_grpo.py)")
    ap.add_argument("--grad-ckpt", action="store_true", help="--plan: gradient checkpointing")
    ap.add_argument("--full-ft-reference", action="store_true",
                    help="--plan with --lora-r 0: a frozen reference copy (diffu-GRPO with beta > 0)")
    ap.add_argument("--gpu-gib", type=float, default=80.0, help="--plan: memory per GPU")
    args = ap.parse_args(argv)
    if args.plan:
        return print_plan(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
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
        report += bench_logprob_and_grpo(model, tok, args, device, args.sections) + "\n"
    print(report)
    if args.out:
        with open(args.out, "a") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()
