"""
A memory plan: the peak GPU memory one rank needs for a training run, from the architecture's shapes and the bytes
autograd actually saves, before a node is booked.

How it is derived (nothing here is a guessed constant per model size):
  1. saved activations   One block, and the LM head with the loss, run at a reduced width on the CPU under
     saved_tensors_hooks, in the run's dtype. Every saved tensor (parameters excluded, shared storage counted once)
     is recorded with its shape, and each dimension is matched to a symbol of the reduced config (micro-batch b,
     sequence T, completion L, d_model, mlp hidden F, heads H, head dim hd, vocab V, LoRA rank r; all chosen
     distinct). Substituting the target config's values scales every tensor exactly: T x d tensors grow with d,
     T x F ones with F, and so on.
  2. static              weights (dtype) + trainable parameters in fp32 with AdamW's two moments (LoRA: and their
     gradients, 16 bytes each) + a frozen reference copy for full fine-tuning with beta > 0.
  3. transients          backward of the log-prob/loss head: the logits' gradient arrives from two consumers
     (logsumexp and gather) in fp32 and is cast to the logits' dtype: 4 + 4 + 2 = 10 bytes per logit element (8 in
     fp32) on top of what is saved; backward of one block holds about one block's saved tensors again. Full
     fine-tuning's fp32 gradients grow while the backward pass frees the activations, so they count only where they
     exceed them.
  4. sharding (--fsdp)   weights, gradients and optimizer state 1/world each, plus what FSDP2 gathers whole.
  The update micro-batch's peak is static + n_layers x block + head + transients (with gradient checkpointing: one
  block input per layer + one block's saved set). The no-grad old/reference passes are also planned: logits of
  --logp-batch-size rows in bf16 and fp32 (6 bytes per element).

tests/test_memory.py checks the plan against the peak memory measured on the CPU for small configs.
"""

import functools
import itertools
import math
from dataclasses import dataclass

import torch

import model as M
from common import lora_targets

GIB = 2**30
# The reduced config the hooks run on: every dimension distinct, so each can be told apart in a saved tensor's shape.
_PROBE = dict(b=2, P=17, L=23, H=3, hd=14, F=110, V=97, r=5)


@dataclass
class Setting:
    """What a run's memory depends on (per rank)."""
    cfg: M.LLaDAConfig
    micro_batch: int  # rows per forward/backward in the update
    prompt_len: int  # P (SFT: 0, the whole canvas is T = L)
    completion_len: int  # L: positions whose logits are computed
    dtype: torch.dtype = torch.bfloat16
    lora_r: int = 128
    lora_targets: tuple = M.LORA_TARGETS
    grad_ckpt: bool = False
    full_ft_reference: bool = False  # full fine-tuning with beta > 0 keeps a frozen copy
    logp_rows: int = 0  # rows per no-grad log-prob forward (diffu-GRPO's --logp-batch-size); 0 = none
    world: int = 1  # ranks; with fsdp, what each rank holds of the weights and optimizer state is 1/world
    fsdp: bool = False  # --fsdp (parallel.py): FSDP2 shards; without it every rank holds everything (DDP)


def _symbols(cfg, s):
    return dict(b=s.micro_batch, T=s.prompt_len + s.completion_len, L=s.completion_len, d=cfg.d_model,
                F=cfg.mlp_hidden_size, H=cfg.n_heads, hd=cfg.head_dim, V=cfg.embedding_size, r=max(1, s.lora_r))


def _probe_symbols():
    p = _PROBE
    return dict(b=p["b"], T=p["P"] + p["L"], L=p["L"], d=p["H"] * p["hd"], F=p["F"], H=p["H"], hd=p["hd"], V=p["V"],
                r=p["r"])


def _factor(value, probe):
    """A dimension's size as a product of probe symbols (fewest symbols first), e.g. 46 -> ('b', 'L')."""
    names = sorted(probe)
    for k in range(0, 4):
        for combo in itertools.combinations_with_replacement(names, k):
            if math.prod(probe[n] for n in combo) == value:
                return combo
    raise ValueError(f"memory plan: cannot attribute a saved dimension of size {value} to the config")


def _saved_tensors(fn, params):
    """[(shape, dtype)] of what autograd saves while fn() runs; parameters and repeated storage excluded."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_ptrs and ptr not in seen:
            seen[ptr] = (tuple(t.shape), t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return list(seen.values())


def probe(dtype, lora_r, lora_targets):
    """Saved tensors of one block and of the head + loss at the probe width, each as (symbol tuple per dim, dtype)."""
    return _probe(dtype, bool(lora_r), tuple(lora_targets))


@functools.lru_cache(maxsize=None)
def _probe(dtype, lora, lora_targets):
    p, sym = _PROBE, _probe_symbols()
    mask_id = p["V"] - 1
    cfg = M.LLaDAConfig(d_model=sym["d"], n_layers=1, n_heads=p["H"], n_kv_heads=p["H"], mlp_hidden_size=p["F"],
                        vocab_size=p["V"], embedding_size=p["V"], mask_token_id=mask_id, eos_token_id=p["V"] - 2,
                        pad_token_id=p["V"] - 2, rope_theta=1e4)
    model = M.LLaDA(cfg).init_weights(torch.Generator().manual_seed(0)).to(dtype)
    if lora:
        M.apply_lora(model, p["r"], 2 * p["r"], 0.0, lora_targets, generator=torch.Generator().manual_seed(0))
    else:
        model.requires_grad_(True)
    model.train()
    params = list(model.parameters())
    B, T, L = p["b"], sym["T"], p["L"]
    ids = torch.randint(0, p["V"] - 2, (B, T), generator=torch.Generator().manual_seed(0))
    attn = torch.ones(B, T, dtype=torch.long)
    attn[0, 0] = 0  # left padding: the masked attention path
    block = model.model.transformer.blocks[0]
    h = model.model.transformer.wte(ids).detach().requires_grad_(True)
    cos, sin = M.rope_cos_sin(torch.arange(T), cfg.head_dim, cfg.rope_theta)
    key_mask = attn.bool()[:, None, None, :]
    block_saved = _saved_tensors(lambda: block(h, cos, sin, key_mask), params)
    t = model.model.transformer

    def head():  # ln_f + LM head on the completion positions + the estimator's log-softmax gather
        logits = t.ff_out(t.ln_f(h[:, T - L:])).float()
        (logits.gather(-1, ids[:, T - L:, None]).squeeze(-1) - logits.logsumexp(-1)).sum()

    head_saved = _saved_tensors(head, params)
    as_symbols = lambda saved: [(tuple(_factor(n, sym) for n in shape), dt) for shape, dt in saved]
    return as_symbols(block_saved), as_symbols(head_saved)


def _bytes(saved, values):
    return sum(math.prod(math.prod(values[s] for s in dim) for dim in shape) * torch.empty((), dtype=dt).element_size()
               for shape, dt in saved)


def trainable_params(cfg, lora_r, lora_targets):
    """Trainable parameter count: LoRA r (in + out) per adapted linear layer, or every weight."""
    with torch.device("meta"):
        model = M.LLaDA(cfg)
    if not lora_r:
        return sum(p.numel() for p in model.parameters())
    n = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in lora_targets:
            n += lora_r * (mod.in_features + mod.out_features)
    return n


def plan(s):
    """{part: bytes} for one rank, and 'total' (the larger of the update's peak and the no-grad passes' peak).
    With fsdp (FSDP2 over s.world ranks) the weights, gradients and AdamW state are 1/world each, plus what is
    gathered whole: in the update, the root's weights (embeddings, head, final norm) and two blocks (the one running
    and the one prefetched) in the compute dtype, and one block's unsharded gradients before the reduce-scatter;
    in the no-grad passes (rollouts, old and reference estimates: parallel.gathered) the whole model; and the
    gradients not yet reduce-scattered."""
    cfg, v = s.cfg, _symbols(s.cfg, s)
    block_saved, head_saved = probe(s.dtype, s.lora_r, s.lora_targets)
    params = _meta_params(cfg)
    n_params = sum(p.numel() for p in params)
    n_block = sum(p.numel() for p in _meta_block_params(cfg))
    shard = s.world if s.fsdp else 1
    per = f" (1/{shard} each)" if shard > 1 else ""
    esize = torch.empty((), dtype=s.dtype if s.lora_r else torch.float32).element_size()
    csize = torch.empty((), dtype=s.dtype).element_size()  # compute dtype: full fine-tuning gathers bf16 copies
    out = {"weights" + per: n_params * esize / shard}
    if s.full_ft_reference and not s.lora_r:
        out["frozen reference copy" + per] = n_params * esize / shard
    n_train = trainable_params(cfg, s.lora_r, s.lora_targets)
    if s.lora_r:
        out["LoRA params, grads, AdamW (fp32)" + per] = 16 * n_train / shard
    else:  # the weights above are the fp32 master copy; the gradients come below
        out["AdamW moments (fp32)" + per] = 8 * n_train / shard
    static = sum(out.values())
    if shard > 1:
        out["gathered for the update (root + 2 blocks)"] = (n_params - cfg.n_layers * n_block + 2 * n_block) * csize
        # The head's gradient is whole (fp32 at the reduce) from the start of the backward pass, with the activations.
        out["the head's unsharded gradient"] = 0 if s.lora_r else 4 * cfg.embedding_size * cfg.d_model
    block = _bytes(block_saved, v)
    if s.grad_ckpt:
        act = cfg.n_layers * v["b"] * v["T"] * cfg.d_model * torch.empty((), dtype=s.dtype).element_size() + block
        out["activations (checkpointed: block inputs + one block)"] = act
    else:
        out["activations (saved by autograd, all blocks)"] = act = cfg.n_layers * block
    out["head and loss (saved)"] = head = _bytes(head_saved, v)
    logits = v["b"] * v["L"] * v["V"]
    cast = csize if csize < 4 else 0  # fp32 logit gradients cast to the logits' dtype (none in fp32)
    out["backward transients (logit gradients, one block)"] = trans = (8 + cast) * logits + block
    if not s.lora_r:
        # Full fine-tuning's fp32 gradients (1/world each with FSDP2, plus one block's whole before its reduce-scatter)
        # fill up as the backward pass frees the activations: what they add is what exceeds the activations.
        grads = 4 * n_train / shard + (4 * n_block if shard > 1 else 0)
        out["gradients (fp32) beyond the activations they replace"] = max(0.0, grads - (act + head + trans))
    out["update peak"] = sum(out.values())
    if s.logp_rows:
        gathered = n_params * csize if shard > 1 else 0  # the whole model, gathered once (parallel.gathered)
        out["no-grad log-prob pass peak"] = static + gathered + 6 * s.logp_rows * v["L"] * v["V"]
    out["total"] = max(out["update peak"], out.get("no-grad log-prob pass peak", 0))
    return out


def _meta_params(cfg):
    with torch.device("meta"):
        return list(M.LLaDA(cfg).parameters())


def _meta_block_params(cfg):
    with torch.device("meta"):
        return list(M.Block(cfg).parameters())


def largest_micro_batch(s, budget_bytes, limit=1024):
    """The largest update micro-batch whose plan fits in budget_bytes (0 if even 1 does not); the plan grows with
    the micro-batch, so a binary search suffices."""
    fits = lambda mb: plan(Setting(**{**s.__dict__, "micro_batch": mb}))["total"] <= budget_bytes
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def format_plan(p, budget_gib=None):
    lines = ["| part | GiB |", "|---|---|"]
    for k, b in p.items():
        bold = "**" if k == "total" else ""
        lines.append(f"| {bold}{k}{bold} | {bold}{b / GIB:.1f}{bold} |")
    if budget_gib:
        lines.append(f"| budget | {budget_gib:.0f} |")
    return "\n".join(lines)


def check_fits(s, device, force=False, budget_bytes=None):
    """At start-up: on a GPU (or with an explicit budget) print the plan's total, and stop unless `force` when it
    exceeds the memory, with the plan and what would fit. Returns the plan (None on a CPU without a budget)."""
    if budget_bytes is None:
        if device.type != "cuda":
            return None
        budget_bytes = torch.cuda.get_device_properties(device).total_memory
    p = plan(s)
    print(f"memory plan: {p['total'] / GIB:.1f} GiB per rank of {budget_bytes / GIB:.1f} GiB (bench.py --plan for "
          f"the breakdown)", flush=True)
    if p["total"] > budget_bytes and not force:
        mb = largest_micro_batch(s, budget_bytes)
        fix = (f"--micro-batch-size {mb}" if mb else "LoRA (--lora-r 128)") + \
            ("" if s.grad_ckpt else ", or --grad-ckpt") + ("" if s.fsdp else ", or --fsdp on several GPUs")
        raise SystemExit(f"the memory plan exceeds the GPU's memory ({p['total'] / GIB:.1f} > "
                         f"{budget_bytes / GIB:.1f} GiB per rank):\n{format_plan(p)}\nFlags that would fit: {fix}. "
                         f"Or pass --force to run anyway.")
    return p


def check_rl_memory(cfg, model_cfg, dtype, device, copies=1, world=1):
    """diffu_grpo.py's plan (a GRPOConfig, with `copies` masked copies of each row per forward batch: 1 for d1)
    against the GPU's memory; stops before the first step if it does not fit, unless --force."""
    targets = lora_targets(cfg.lora_targets)
    check_fits(Setting(model_cfg, micro_batch=cfg.micro_batch_size * copies, prompt_len=cfg.max_prompt_length or 256,
                       completion_len=cfg.gen_length, dtype=dtype, lora_r=cfg.lora_r, lora_targets=targets,
                       grad_ckpt=cfg.grad_ckpt, full_ft_reference=not cfg.lora_r and cfg.beta > 0,
                       logp_rows=(cfg.logp_batch_size or cfg.micro_batch_size) * copies, world=world,
                       fsdp=cfg.fsdp), device, cfg.force)
