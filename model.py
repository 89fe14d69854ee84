"""
LLaDA: a bidirectional transformer that predicts masked tokens (Nie et al., arXiv 2502.09992).

    python model.py --model tiny            # build the tiny model, print its size and one forward pass

This file is the whole model, readable top to bottom:
  1. LLaDAConfig   - the fields of the official config.json that matter (and a check for the ones we don't support)
  2. RMSNorm, RoPE, Block, LLaDA - the network; module names equal the official safetensors keys exactly
  3. load_model / save_model - the official checkpoint layout (sharded safetensors + index), one shard at a time
  4. LoRA          - low-rank adapters (Hu et al. 2021) in a few dozen lines, with an "adapters off" switch
  5. tiny_tokenizer / tiny_config - a laptop-sized model that runs through the very same code

LLaDA is Llama without the causal mask: every position attends to every other position, and the network is
trained to predict the original token at every [MASK] position. Generation (sample.py) starts from an all-mask
canvas and unmasks it over a number of steps.

    python model.py --model /path/to/LLaDA-8B-Instruct --dtype bfloat16 --device cuda
"""

import argparse
import contextlib
import json
import math
import os
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LLADA_HUB_ID = "GSAI-ML/LLaDA-8B-Instruct"


class UsageError(ValueError):
    """A mistake in what was asked for (a flag, a path, a file's contents, a run directory), not in the program.
    Every script reports it in one line and exits with status 2, as argparse does (common.cli); a program error
    keeps its traceback. Defined here, in the module every other one imports."""


def hub_reachable(timeout=3.0):
    """Whether the Hugging Face hub can be reached: False at once under HF_HUB_OFFLINE=1, else one TCP connection
    with a short timeout. Without it, huggingface_hub and datasets retry for half a minute before failing."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    import socket
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def read_safetensors(path, device="cpu", keys_only=False):
    """The tensors of one .safetensors file (or only its keys); a truncated or foreign file is a UsageError that
    names it."""
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            return list(f.keys()) if keys_only else {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a bad header or a short file
        raise UsageError(f"{path}: not a readable safetensors file ({type(e).__name__}: {str(e)[:120]}); it is "
                         f"truncated or was written by something else: copy it again") from None
LLADA_MASK_ID = 126336  # <|mdm_mask|> in LLaDA's tokenizer; code reads the id from the config, this is only a default

# -----------------------------------------------------------------------------
# 1. Config


@dataclass
class LLaDAConfig:
    # Defaults are LLaDA-8B's (NOT the GPT-2-like defaults of the official configuration_llada.py).
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32  # < n_heads means grouped-query attention: each K/V head serves n_heads // n_kv_heads queries
    mlp_hidden_size: int = 12288
    vocab_size: int = 126464
    embedding_size: int = 126464  # rows of wte / ff_out; may exceed vocab_size (padding for fast matmuls)
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    weight_tying: bool = False  # True: the LM head reuses wte.weight
    max_sequence_length: int = 4096
    mask_token_id: int = LLADA_MASK_ID
    eos_token_id: int = 126081
    pad_token_id: int = 126081
    # other config.json fields, kept so that a round trip loses nothing
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def head_dim(self):
        return self.d_model // self.n_heads

    # Settings of the official code we do not implement. (field, value we require)
    _REQUIRED = {"block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms", "include_bias": False,
                 "include_qkv_bias": False, "alibi": False, "rope": True, "input_emb_norm": False,
                 "scale_logits": False, "attention_layer_norm": False, "rope_full_precision": True}

    @classmethod
    def from_dict(cls, d):
        for key, want in cls._REQUIRED.items():
            if key in d and d[key] is not None and d[key] != want:
                raise ValueError(f"config.json: {key}={d[key]!r} is not supported by this implementation "
                                 f"(LLaDA-8B uses {key}={want!r})")
        names = {f.name for f in fields(cls)} - {"extra"}
        kw = {k: d[k] for k in names if d.get(k) is not None}
        if d.get("mlp_hidden_size") is None and "mlp_ratio" in d:  # mlp_ratio only counts when mlp_hidden_size is unset
            kw["mlp_hidden_size"] = d["mlp_ratio"] * d["d_model"]
        kw.setdefault("embedding_size", kw.get("vocab_size", cls.vocab_size))
        extra = {k: v for k, v in d.items() if k not in names}
        cfg = cls(**kw, extra=extra)
        if cfg.d_model % cfg.n_heads or cfg.n_heads % cfg.n_kv_heads:
            raise ValueError(f"config.json: d_model={cfg.d_model}, n_heads={cfg.n_heads}, n_kv_heads={cfg.n_kv_heads} "
                             "must satisfy d_model % n_heads == 0 and n_heads % n_kv_heads == 0")
        return cfg

    def to_dict(self):
        # The official field names, so the official modeling code loads our checkpoints.
        d = {"model_type": "llada", "architectures": ["LLaDAModelLM"],
             "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                          "AutoModel": "modeling_llada.LLaDAModelLM",
                          "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
             **{k: v for k, v in self._REQUIRED.items()}, "mlp_ratio": 4, "attention_dropout": 0.0,
             "residual_dropout": 0.0, "embedding_dropout": 0.0, "layer_norm_with_affine": True,
             "bias_for_layer_norm": False}
        d.update(self.extra)
        d.update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"})
        return d


# -----------------------------------------------------------------------------
# 2. The network


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight. The normalisation runs in fp32 (bf16 has an 8-bit mantissa, and
    mean(x^2) over 4096 features loses digits); the result is cast back to the input dtype BEFORE the weight
    multiply, exactly as the official code does, so bf16 logits match bit for bit."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # (..., D)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


def rope_cos_sin(positions, head_dim, theta):
    """Rotary embedding angles (Su et al. 2021) for integer positions (T,) -> cos, sin of shape (T, head_dim), fp32.
    inv_freq_i = theta^(-2i/head_dim) for i < head_dim/2; the angles are duplicated as cat(freqs, freqs) because
    LLaDA uses the rotate-half layout (the head dim is split into two halves, not interleaved pairs)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, head_dim)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    """x (B, H, T, hd) rotated in fp32 (the official rope_full_precision=True) and cast back. rotate_half maps
    (x1, x2) -> (-x2, x1), so each pair (x[i], x[i + hd/2]) turns by angle pos * inv_freq_i."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class Block(nn.Module):
    """One pre-norm Llama block without a causal mask:
        h = h + attn_out(Attention(attn_norm(h)))
        h = h + ff_out(silu(ff_proj(x)) * up_proj(x)),  x = ff_norm(h)
    Attribute names equal the official keys: blocks.{i}.q_proj.weight, ..., blocks.{i}.ff_out.weight."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D, hd = cfg.d_model, cfg.head_dim
        self.attn_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(D, cfg.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(D, cfg.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(D, cfg.n_kv_heads * hd, bias=False)
        self.attn_out = nn.Linear(cfg.n_heads * hd, D, bias=False)
        self.ff_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.ff_proj = nn.Linear(D, cfg.mlp_hidden_size, bias=False)  # the GATE: SiLU is applied to this one
        self.up_proj = nn.Linear(D, cfg.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(cfg.mlp_hidden_size, D, bias=False)  # down projection

    def forward(self, h, cos, sin, key_mask, past_kv=None):
        """h (B, T, D); cos/sin (T, hd) for these T positions; key_mask None or bool (B, 1, 1, S) with S = P + T
        (True = attend); past_kv None or (k, v) of P earlier positions, already rotated, (B, Hkv, P, hd).
        Returns h and this call's (k, v) (B, Hkv, T, hd) so a caller can cache them."""
        B, T, D = h.shape
        cfg, hd = self.cfg, self.cfg.head_dim
        x = self.attn_norm(h)
        q = self.q_proj(x).view(B, T, cfg.n_heads, hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, cfg.n_kv_heads, hd).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, cfg.n_kv_heads, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        new_kv = (k, v)
        if past_kv is not None:  # prefix KV cache (sample.py's fast mode): keys/values of frozen earlier positions
            k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
        if cfg.n_kv_heads != cfg.n_heads:  # GQA: K/V head j serves query heads j*g .. j*g+g-1
            g = cfg.n_heads // cfg.n_kv_heads
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        # is_causal=False is the whole difference from an autoregressive LM: a masked position sees both sides.
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, is_causal=False)  # scale 1/sqrt(hd)
        h = h + self.attn_out(a.transpose(1, 2).reshape(B, T, cfg.n_heads * hd))
        x = self.ff_norm(h)
        h = h + self.ff_out(F.silu(self.ff_proj(x)) * self.up_proj(x))
        return h, new_kv


class LLaDA(nn.Module):
    """The mask predictor p_theta(x_0 | x_t). state_dict() keys are exactly the official ones
    (model.transformer.wte.weight, model.transformer.blocks.0.q_proj.weight, ...), so loading is a strict key match."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.model = nn.Module()
        self.model.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.embedding_size, cfg.d_model),
            blocks=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)]),
            ln_f=RMSNorm(cfg.d_model, cfg.rms_norm_eps),
        ))
        if not cfg.weight_tying:
            self.model.transformer["ff_out"] = nn.Linear(cfg.d_model, cfg.embedding_size, bias=False)
        self.gradient_checkpointing = False  # recompute each block in backward: activations O(layers) -> O(1) blocks

    def forward(self, input_ids, attention_mask=None, *, past_kv=None, return_kv=False, logits_slice=None,
                logits_index=None):
        """input_ids (B, T) -> logits (B, T, V) in the weights' dtype.

        attention_mask: None or (B, P + T) with 1 = real token, 0 = padding. It only hides padded KEYS; the rows of
            padded queries compute garbage nobody reads. An all-ones mask takes exactly the no-mask path (SDPA then
            runs its fastest kernel, and results are bit-identical to passing nothing).
        past_kv: None, or a list with one (k, v) per layer for P positions that precede input_ids (prefix cache,
            sample.py's fast mode). input_ids then sit at positions P .. P+T-1.
        return_kv: also return the per-layer (k, v) of these T positions (to build such a cache).
        logits_slice: a slice of positions that need logits (e.g. only the block being decoded). The LM head is
            the largest matmul for a 126k vocabulary, so this is the sampler's biggest saving.
        logits_index: (B, m) long, per row the m positions that need logits (the sampler's still-masked positions,
            which differ between rows): logits (B, m, V).
        """
        B, T = input_ids.shape
        P = 0 if past_kv is None else past_kv[0][0].shape[2]
        key_mask = None
        if attention_mask is not None:
            assert attention_mask.shape == (B, P + T), f"attention_mask {tuple(attention_mask.shape)} != {(B, P + T)}"
            if not bool(attention_mask.all()):
                key_mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, S): broadcast over heads and queries
        cos, sin = rope_cos_sin(torch.arange(P, P + T, device=input_ids.device), self.cfg.head_dim, self.cfg.rope_theta)
        h = self.model.transformer.wte(input_ids)  # (B, T, D)
        kvs = []
        for i, block in enumerate(self.model.transformer.blocks):
            past = None if past_kv is None else past_kv[i]
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h, kv = checkpoint(block, h, cos, sin, key_mask, past, use_reentrant=False)
            else:
                h, kv = block(h, cos, sin, key_mask, past)
            if return_kv:
                kvs.append(kv)
        if logits_slice is not None:
            h = h[:, logits_slice]
        if logits_index is not None:
            h = h.gather(1, logits_index[..., None].expand(-1, -1, h.shape[-1]))  # (B, m, D)
        h = self.model.transformer.ln_f(h)
        t = self.model.transformer
        # (B, T', V); no logit scaling in LLaDA. Call the head module (not its weight) so a LoRA wrapper applies.
        logits = F.linear(h, t.wte.weight) if self.cfg.weight_tying else t.ff_out(h)
        return (logits, kvs) if return_kv else logits

    @torch.no_grad()
    def init_weights(self, generator=None, std=None):
        """Random init for tiny models and benchmarks: ones for the norms, normal(0, 1/sqrt(fan_in)) for every matrix
        (a Linear's weight is (out, in) and an embedding's (vocab, d_model), so fan_in is shape[-1]), or normal(0, std)
        if `std` is given. Why fan-in and not a fixed 0.02: at the tiny width (128) 0.02 is 4x below the fan-in scale,
        the attention logits start near 0 (~0.05), and the tiny Sudoku model then sat on a loss plateau (digits
        learned, given cells not yet copied) for 250 to 400+ steps, exiting at a step that changed with the CPU's
        float rounding. With fan-in init the same runs left it by step 50-75 (docs/tiny_sudoku_rl_probes.md, 4).
        """
        for name, p in self.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                s = std if std is not None else p.shape[-1] ** -0.5
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.dtype) * s)
        return self

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


# -----------------------------------------------------------------------------
# 3. The official checkpoint layout: config.json + model-0000i-of-0000N.safetensors + model.safetensors.index.json


def resolve_model_dir(name_or_path):
    """A local directory is used as it is; anything else is a hub id fetched with huggingface_hub (config, weights
    and tokenizer files only). Without network and without a cached copy we fail at once with a clear message."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path):
        raise UsageError(f"--model {name_or_path!r} is a file; pass the checkpoint DIRECTORY "
                         f"(config.json + safetensors)")
    if name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1:  # a path, not an org/name id
        raise UsageError(f"--model {name_or_path!r}: no such directory (a local checkpoint directory, or a hub "
                                "id such as GSAI-ML/LLaDA-8B-Instruct)")
    from huggingface_hub import snapshot_download
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.py"]
    try:
        if not hub_reachable():  # a cached copy, or fail now rather than after half a minute of retries
            return snapshot_download(name_or_path, allow_patterns=patterns, local_files_only=True)
        return snapshot_download(name_or_path, allow_patterns=patterns)
    except Exception as e:  # offline, unknown repo, gated, ...
        raise UsageError(
            f"Could not get model {name_or_path!r} from the Hugging Face hub ({type(e).__name__}: {str(e)[:200]}). "
            f"Download it where you have network (huggingface-cli download {name_or_path} --local-dir DIR) and pass "
            f"the local directory instead: --model DIR") from None


def _checkpoint_shards(model_dir):
    """{shard file: [keys]} from model.safetensors.index.json (never hard-code shard names), or the single file."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        shards = {}
        for key, shard in weight_map.items():
            shards.setdefault(shard, []).append(key)
        return shards
    single = os.path.join(model_dir, "model.safetensors")
    if not os.path.exists(single):
        raise UsageError(f"{model_dir}: neither model.safetensors.index.json nor model.safetensors found")
    return {"model.safetensors": read_safetensors(single, keys_only=True)}


def load_model(name_or_path, dtype=torch.float32, device="cpu"):
    """Load an official-format LLaDA checkpoint. The model is built on the meta device (no memory), then each shard
    is read and its tensors ASSIGNED into the model (cast to `dtype` on `device`) before the next shard is opened,
    so peak memory is the model plus about one shard. The key check is strict and happens before any weight is
    read. A directory saved with LoRA adapters (adapter.safetensors) gets them applied."""
    model_dir = resolve_model_dir(name_or_path)
    config = os.path.join(model_dir, "config.json")
    try:
        with open(config) as f:
            cfg = LLaDAConfig.from_dict(json.load(f))
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{config}: cannot read the model's config ({e})") from None
    with torch.device("meta"):
        model = LLaDA(cfg)
    shards = _checkpoint_shards(model_dir)
    expected = set(model.state_dict().keys())
    found = {k for keys in shards.values() for k in keys}
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise KeyError(f"{model_dir}: checkpoint keys do not match the LLaDA architecture of its config.json.\n"
                       f"  missing ({len(missing)}): {missing[:10]}\n"
                       f"  unexpected ({len(unexpected)}): {unexpected[:10]}")
    for shard in sorted(shards):
        sd = read_safetensors(os.path.join(model_dir, shard), device)
        sd = {k: v.to(dtype) for k, v in sd.items()}
        model.load_state_dict(sd, strict=False, assign=True)  # assign: the loaded tensors become the parameters
        del sd
    model.eval()
    if os.path.exists(os.path.join(model_dir, ADAPTER_FILE)):
        load_lora(model, model_dir)
    meta = os.path.join(model_dir, "meta.json")
    if dtype != torch.float32 and os.path.exists(meta):
        with open(meta) as f:
            if json.load(f).get("export") == "merged":
                print(f"warning: {model_dir} holds fp32 weights with a LoRA update merged in; loading them as {dtype} "
                      f"rounds a small update away. Load with float32, or export with --export exact.")
    return model.to(device)


def _write_safetensors(state_dict, out_dir, max_shard_bytes):
    from safetensors.torch import save_file
    shards, current, size = [], {}, 0
    for k, v in state_dict.items():
        nbytes = v.numel() * v.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = v.detach().contiguous().cpu()
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
        for k, v in shard.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def save_model(model, out_dir, tokenizer=None, max_shard_bytes=5 * 2**30, merge=False, merge_dtype=torch.float32):
    """Write the official layout into out_dir (which should be a fresh temporary directory; common.py's atomic
    checkpoint renames it into place).

    With LoRA there are two exports, and the default is the exact one:
      merge=False  base weights as they are + adapter.safetensors (fp32). load_model applies the adapter, so the
                   loaded model computes exactly what was trained (the same forward, bit for bit).
      merge=True   W + (alpha/r) B A under the official keys, merged in fp32 and saved as `merge_dtype` (default
                   fp32: the official code can load it). Casting to bf16 would round a small RL update away, so a
                   merge that keeps less than 99% of the update is refused (merge_lora / merge_survival)."""
    os.makedirs(out_dir, exist_ok=True)
    if has_lora(model) and merge:
        kept = merge_survival(model, merge_dtype)
        if kept < 0.99:
            raise ValueError(f"a merged export in {merge_dtype} would keep only {100 * kept:.1f}% of the LoRA update; "
                             f"export merged in torch.float32, or unmerged (base weights + adapter)")
        sd = merged_state_dict(model, merge_dtype)
    else:
        sd = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
        if has_lora(model):
            save_lora(model, out_dir)
    _write_safetensors(sd, out_dir, max_shard_bytes)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(model.cfg.to_dict(), f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


# -----------------------------------------------------------------------------
# 4. LoRA: W x + (alpha / r) * B (A dropout(x)), with B = 0 at the start so the adapted model equals the base one.

# d1's RL targets AS RUN. d1's config asks PEFT for q/k/v/o/up/down/gate projections, but LLaDA names its modules
# q_proj, k_proj, v_proj, attn_out, ff_proj, up_proj, ff_out: only q_proj, k_proj, v_proj and up_proj match, so
# those four are what d1 adapted (and not the LM head). LORA_TARGETS_WIDE adapts every linear layer of the blocks
# plus the untied LM head (model.transformer.ff_out shares the name ff_out with the MLP's output projection).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj")
LORA_TARGETS_WIDE = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")
ADAPTER_FILE = "adapter.safetensors"


class LoRALinear(nn.Module):
    """Replaces an nn.Linear in place. It keeps the base Parameter under the same name (`weight`), so the
    state_dict key of the base weight does not change; the adapter adds `lora_A` (r, in) and `lora_B` (out, r).
    The adapters are kept in fp32 (a 3e-6 learning rate would vanish in bf16's 8-bit mantissa) and cast to the
    activation dtype for the matmul; gradients flow back through the cast into the fp32 master copy.

    An earlier stage's adapter (RL starting from the SFT model) is kept as FROZEN factors `lora_frozen_A/B`
    (scale folded into B) instead of being merged into a bf16 weight, where a small update rounds away (see
    merge_survival). They are part of the starting model: always on, also for the reference policy."""

    def __init__(self, base, r, alpha, dropout, generator=None):  # base: an nn.Linear (or a LoRALinear to re-arm)
        super().__init__()
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.r, self.scale, self.dropout = r, alpha / r, dropout
        self.enabled = True
        self.lora_frozen_A = self.lora_frozen_B = None
        dev, (out_features, in_features) = base.weight.device, base.weight.shape
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=dev, dtype=torch.float32))
        bound = 1.0 / math.sqrt(in_features)  # kaiming-uniform(a=sqrt(5)) bound, as for nn.Linear
        with torch.no_grad():
            self.lora_A.copy_(torch.rand(self.lora_A.shape, generator=generator) * 2 * bound - bound)

    def set_frozen(self, A, B):
        """Frozen low-rank delta B @ A (B already scaled) of an earlier stage: fp32, no gradient."""
        self.lora_frozen_A = nn.Parameter(A.float().to(self.weight.device), requires_grad=False)
        self.lora_frozen_B = nn.Parameter(B.float().to(self.weight.device), requires_grad=False)

    def forward(self, x):
        y = F.linear(x, self.weight)
        if self.lora_frozen_A is not None:
            y = y + F.linear(F.linear(x, self.lora_frozen_A.to(x.dtype)), self.lora_frozen_B.to(x.dtype))
        if not self.enabled:
            return y
        x = F.dropout(x, self.dropout, self.training) if self.dropout > 0 else x
        return y + self.scale * F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))

    def delta(self):
        """The whole update in fp32 (out, in): frozen + trainable."""
        d = self.scale * self.lora_B @ self.lora_A
        return d if self.lora_frozen_A is None else d + self.lora_frozen_B @ self.lora_frozen_A

    def merged_weight(self, dtype=torch.float32):
        return (self.weight.float() + self.delta()).to(dtype)


def apply_lora(model, r, alpha, dropout=0.0, targets=LORA_TARGETS, generator=None):
    """Wrap every nn.Linear whose attribute name is in `targets`; freeze everything else. A model that already has
    adapters (loaded from an SFT export, or --adapter) keeps them as frozen factors of the starting model, and every
    LoRALinear gets a fresh trainable adapter (so a module the earlier stage adapted but `targets` omits stays
    adapted). Returns the model."""
    freeze_lora(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                fresh = LoRALinear(child, r, alpha, dropout, generator)
                fresh.set_frozen(child.lora_frozen_A.detach(), child.lora_frozen_B.detach())
                setattr(parent, name, fresh)
            elif name in targets and isinstance(child, nn.Linear):
                setattr(parent, name, LoRALinear(child, r, alpha, dropout, generator))
    if not has_lora(model):
        raise ValueError(f"apply_lora: no nn.Linear named any of {targets}")
    return model


def freeze_lora(model):
    """Fold every trainable adapter into its module's frozen factors: [A_frozen; A] and [B_frozen, scale B], so
    (B_frozen A_frozen + scale B A) is kept exactly, as a low-rank product, never rounded into the base weight."""
    for m in model.modules():
        if isinstance(m, LoRALinear):
            A, B = m.lora_A.detach(), m.scale * m.lora_B.detach()
            if m.lora_frozen_A is not None:
                A, B = torch.cat([m.lora_frozen_A, A]), torch.cat([m.lora_frozen_B, B], dim=1)
            m.set_frozen(A, B)
    return model


def has_lora(model):
    return any(isinstance(m, LoRALinear) for m in model.modules())


@contextlib.contextmanager
def lora_disabled(model):
    """Inside this block the model is the STARTING model (trainable adapters off, frozen earlier-stage factors on):
    this is how diffu-GRPO gets the reference policy's log-probs without a second copy of 8B weights."""
    mods = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m in mods:
            m.enabled = True


def merged_state_dict(model, dtype=None):
    """Official-key state dict with every adapter folded into its base weight (in fp32, then cast to `dtype`,
    default: the base weight's dtype)."""
    sd = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            sd[name + ".weight"] = m.merged_weight(dtype or m.weight.dtype).detach()
    return sd


@torch.no_grad()
def merge_survival(model, dtype):
    """How much of the adapters' update survives a merge into `dtype` weights: 1 - ||cast(W + dW) - (W + dW)|| /
    ||dW|| over all adapted weights (fp32 arithmetic). 1.0 = exact. A bf16 merge of d1's RL update (lr 3e-6: dW is
    ~1e-4 of W, far below bf16's 2^-8 relative step) rounds nearly all of it away."""
    err = norm = 0.0
    for m in model.modules():
        if isinstance(m, LoRALinear):
            exact = m.weight.float() + m.delta()
            err += (exact.to(dtype).float() - exact).pow(2).sum().item()
            norm += m.delta().pow(2).sum().item()
    return 1.0 if norm == 0 else 1.0 - math.sqrt(err / norm)


def merge_lora(model, dtype=None, min_survival=0.99):
    """Fold the adapters into the weights and put plain nn.Linear modules back, in `dtype` (default: the base
    dtype). Refuses when more than 1 - min_survival of the update would round away (merge_survival)."""
    dtype = dtype or next(m.weight.dtype for m in model.modules() if isinstance(m, LoRALinear))
    kept = merge_survival(model, dtype)
    if kept < min_survival:
        raise ValueError(f"merging the LoRA update into {dtype} weights keeps only {100 * kept:.1f}% of it (the rest "
                         f"rounds away); merge into torch.float32, or keep the adapter unmerged")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                lin = nn.Linear(child.weight.shape[1], child.weight.shape[0], bias=False,
                                device=child.weight.device, dtype=dtype)
                with torch.no_grad():
                    lin.weight.copy_(child.merged_weight(dtype))
                setattr(parent, name, lin)
    return model


def lora_state_dict(model):
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}


def save_lora(model, out_dir):
    """The adapter alone (a few MB-GB instead of 16 GB), with its r/alpha/targets in the file's metadata; frozen
    earlier-stage factors, if any, travel in the same file."""
    from safetensors.torch import save_file
    m = next(m for m in model.modules() if isinstance(m, LoRALinear))
    targets = sorted({n.split(".")[-1] for n, mod in model.named_modules() if isinstance(mod, LoRALinear)})
    meta = {"r": str(m.r), "alpha": str(m.scale * m.r), "targets": ",".join(targets)}
    sd = {k: v.detach().contiguous().cpu() for k, v in lora_state_dict(model).items()}
    save_file(sd, os.path.join(out_dir, ADAPTER_FILE), metadata=meta)


def load_lora(model, path):
    """Load an adapter saved by save_lora (a directory or the file), or a PEFT LoRA folder (load_peft); wraps the
    model first if it has no adapters."""
    from safetensors import safe_open
    if os.path.isdir(path) and os.path.exists(os.path.join(path, PEFT_CONFIG)):
        return load_peft(model, path)
    f = path if path.endswith(".safetensors") else os.path.join(path, ADAPTER_FILE)
    if not os.path.exists(f):
        raise UsageError(f"--adapter {path!r}: no {ADAPTER_FILE} there (a directory written by sft.py or "
                                f"diffu_grpo.py, or the .safetensors file itself)")
    try:
        with safe_open(f, framework="pt") as fh:
            meta = fh.metadata()
            sd = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as e:
        raise UsageError(f"{f}: not a readable adapter file ({type(e).__name__}: {str(e)[:120]})") from None
    if not has_lora(model):
        apply_lora(model, int(meta["r"]), float(meta["alpha"]), targets=tuple(meta["targets"].split(",")))
    for name, m in model.named_modules():  # frozen factors: shapes come from the file
        if isinstance(m, LoRALinear) and name + ".lora_frozen_A" in sd:
            m.set_frozen(sd[name + ".lora_frozen_A"], sd[name + ".lora_frozen_B"])
    missing = set(lora_state_dict(model)) - set(sd)
    if missing or set(sd) - set(lora_state_dict(model)):
        raise KeyError(f"{f}: adapter keys do not match the model (missing e.g. {sorted(missing)[:3]})")
    model.load_state_dict(sd, strict=False)
    return model


# -----------------------------------------------------------------------------
# 4b. PEFT's LoRA format, both ways (no dependency on PEFT: the format is two files). PeftModel wraps the official
# LLaDAModelLM, whose modules are model.transformer..., so a key reads
#   base_model.model.model.transformer.blocks.0.q_proj.lora_A.weight   (r, in)     and   ....lora_B.weight (out, r)
# and the update PEFT adds is (lora_alpha / r) B A, or (lora_alpha / sqrt(r)) B A with use_rslora.

PEFT_CONFIG, PEFT_WEIGHTS, PEFT_PREFIX = "adapter_config.json", "adapter_model.safetensors", "base_model.model."
# adapter_config.json fields whose non-default values this implementation does not apply: refused, never ignored.
PEFT_UNSUPPORTED = {"use_dora": (False, None), "bias": ("none",), "modules_to_save": (None, []),
                    "layers_to_transform": (None,), "layers_pattern": (None, []), "rank_pattern": ({}, None),
                    "alpha_pattern": ({}, None), "fan_in_fan_out": (False,), "use_qalora": (False, None),
                    "lora_bias": (False, None)}


def read_peft(path):
    """(adapter_config, {module path: (A (r, in), B (out, r))}) of a PEFT LoRA folder, checked."""
    with open(os.path.join(path, PEFT_CONFIG)) as f:
        cfg = json.load(f)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UsageError(f"{path}: a {cfg.get('peft_type')} adapter; only PEFT's LORA is supported")
    for key, ok in PEFT_UNSUPPORTED.items():
        if key in cfg and cfg[key] not in ok:
            raise UsageError(f"{path}/{PEFT_CONFIG}: {key}={cfg[key]!r} is not supported (only plain LoRA: no DoRA, "
                             f"no bias, no modules_to_save, no per-layer selection or rank/alpha patterns)")
    weights = os.path.join(path, PEFT_WEIGHTS)
    if not os.path.exists(weights):
        raise UsageError(f"{path}: no {PEFT_WEIGHTS} (save the adapter with safe_serialization=True)")
    factors = {}
    for key, t in read_safetensors(weights).items():
        if not key.startswith(PEFT_PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise UsageError(f"{weights}: unexpected key {key!r} (a plain LoRA adapter holds only lora_A/lora_B)")
        module, which = key[len(PEFT_PREFIX):-len(".lora_A.weight")], key[-len("A.weight")]
        factors.setdefault(module, {})[which] = t.float()
    return cfg, {m: (f["A"], f["B"]) for m, f in factors.items()}


def load_peft(model, path):
    """Apply a PEFT LoRA folder to a plain model as its adapter (later stages keep it as frozen factors): every
    module with factors gets W x + s B A x with PEFT's s = lora_alpha / r (or / sqrt(r) with use_rslora)."""
    cfg, factors = read_peft(path)
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    modules = dict(model.named_modules())
    missing = sorted(m for m in factors if m not in modules or not isinstance(modules[m], (nn.Linear, LoRALinear)))
    if missing:
        raise UsageError(f"{path}: the adapter adapts modules this model does not have, e.g. {missing[:3]}")
    if has_lora(model):
        raise UsageError(f"{path}: the model already carries an adapter; apply one adapter at a time")
    for name, (A, B) in factors.items():
        parent, leaf = name.rsplit(".", 1)
        lin = LoRALinear(modules[name], A.shape[0], 1.0, 0.0)
        lin.scale = scale
        with torch.no_grad():
            lin.lora_A.copy_(A)
            lin.lora_B.copy_(B)
        setattr(modules[parent], leaf, lin)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def save_peft(model, out_dir, base_model_name_or_path):
    """The model's whole update as ONE PEFT LoRA adapter that PeftModel.from_pretrained(official model, out_dir)
    loads. One stage: its A, B, r and alpha as trained. Stacked stages (an SFT adapter frozen under the RL one): the
    factors are stacked, A = [A_frozen; A] (r1 + r2, in) and B = [B_frozen, s B] (out, r1 + r2), so B A is the sum
    of both updates exactly; lora_alpha = r then makes PEFT's scale 1. Modules with fewer stacked rows are padded
    with zero rows, which add nothing."""
    from safetensors.torch import save_file
    mods = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    stacked = any(m.lora_frozen_A is not None for m in mods.values())
    tensors, ranks = {}, {}
    for name, m in mods.items():
        A, B = m.lora_A.detach().float(), m.lora_B.detach().float()
        if stacked:
            A, B = A, m.scale * B
            if m.lora_frozen_A is not None:
                A, B = torch.cat([m.lora_frozen_A, A]), torch.cat([m.lora_frozen_B, B], dim=1)
        tensors[name] = (A, B)
        ranks[name] = A.shape[0]
    r = max(ranks.values())
    sd = {}
    for name, (A, B) in tensors.items():
        pad = r - A.shape[0]
        A, B = torch.cat([A, A.new_zeros(pad, A.shape[1])]), torch.cat([B, B.new_zeros(B.shape[0], pad)], dim=1)
        sd[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A.contiguous().cpu()
        sd[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B.contiguous().cpu()
    m0 = next(iter(mods.values()))
    alpha = float(r) if stacked else m0.scale * m0.r
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
           "r": r, "lora_alpha": alpha, "lora_dropout": 0.0, "use_rslora": False, "use_dora": False, "bias": "none",
           "target_modules": sorted({n.rsplit(".", 1)[1] for n in mods}), "modules_to_save": None,
           "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
           "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "revision": None}
    os.makedirs(out_dir, exist_ok=True)
    save_file(sd, os.path.join(out_dir, PEFT_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(out_dir, PEFT_CONFIG), "w") as f:
        json.dump(cfg, f, indent=2)


# -----------------------------------------------------------------------------
# 5. The tiny model: a character-level tokenizer with LLaDA's special tokens and chat template, and a small config.

SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                 "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
                 "<|start_header_id|>assistant<|end_header_id|>\n\n{{ '' }}")
# (the final {{ '' }} stops Jinja from dropping the template's trailing newline)


def tiny_tokenizer():
    """A transformers fast tokenizer built in-process with the `tokenizers` library: one token per printable ASCII
    character (plus newline and tab), and LLaDA's special tokens matched whole. Same roles as LLaDA's: BOS comes
    from the chat template, <|endoftext|> is both EOS and PAD, <|mdm_mask|> is the mask."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    chars = ["\n", "\t"] + [chr(c) for c in range(32, 127)]
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + ["<unk>"] + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character alone
    tok.decoder = decoders.Fuse()  # concatenate, no spaces in between
    tok.add_special_tokens(SPECIAL_TOKENS)
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                pad_token="<|endoftext|>", mask_token="<|mdm_mask|>", unk_token="<unk>")
    t.chat_template = CHAT_TEMPLATE
    t.padding_side = "left"
    return t


def tiny_config(tokenizer=None, **overrides):
    """A few layers, small width; vocabulary = the tiny tokenizer's. GQA on (4 query heads share 2 K/V heads) so
    that path is exercised everywhere."""
    tokenizer = tokenizer or tiny_tokenizer()
    kw = dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, mlp_hidden_size=384, vocab_size=len(tokenizer),
              embedding_size=128, rope_theta=10000.0, max_sequence_length=1024,
              mask_token_id=tokenizer.mask_token_id, eos_token_id=tokenizer.eos_token_id,
              pad_token_id=tokenizer.pad_token_id)
    kw.update(overrides)
    assert kw["embedding_size"] >= kw["vocab_size"]
    return LLaDAConfig(**kw)


def load_tokenizer(name_or_path):
    if name_or_path == "tiny":
        return tiny_tokenizer()
    from transformers import PreTrainedTokenizerFast
    # LLaDA ships a plain fast tokenizer (tokenizer.json). AutoTokenizer would read config.json, see the custom
    # model_type 'llada' with its auto_map, and ask to run remote code; the tokenizer needs none.
    tok = PreTrainedTokenizerFast.from_pretrained(resolve_model_dir(name_or_path))
    tok.padding_side = "left"  # prompts are left-padded so every completion starts at the same column
    return tok


def peft_base(path):
    """The base model a PEFT adapter folder names (base_model_name_or_path), or None when `path` is not one."""
    if os.path.isdir(path) and os.path.exists(os.path.join(path, PEFT_CONFIG)) and \
            not os.path.exists(os.path.join(path, "config.json")):
        with open(os.path.join(path, PEFT_CONFIG)) as f:
            return json.load(f).get("base_model_name_or_path") or LLADA_HUB_ID
    return None


def build(name_or_path, dtype=torch.float32, device="cpu", seed=0):
    """(model, tokenizer) for `--model tiny|PATH|HUB_ID`. 'tiny' is randomly initialised from `seed`. A PEFT
    adapter folder loads its base (base_model_name_or_path) with the adapter applied."""
    base = peft_base(name_or_path)
    if base is not None:
        model, tok = build(base, dtype, device, seed)
        return load_peft(model, name_or_path), tok
    if name_or_path == "tiny":
        tok = tiny_tokenizer()
        model = LLaDA(tiny_config(tok)).init_weights(torch.Generator().manual_seed(seed))
        return model.to(device=device, dtype=dtype).eval(), tok
    return load_model(name_or_path, dtype, device), load_tokenizer(name_or_path)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Build or load a LLaDA model and run one forward pass.")
    ap.add_argument("--model", default="tiny", help="'tiny' (random, CPU-sized), a local checkpoint directory, "
                                                    f"or a hub id such as {LLADA_HUB_ID} (default: tiny)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="weight dtype (default: float32)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    args = ap.parse_args()
    model, tok = build(args.model, getattr(torch, args.dtype), args.device)
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]], device=args.device)
    logits = model(ids)
    print(f"{args.model}: {model.num_params():,} parameters | config {model.cfg}")
    print(f"prompt {text!r} -> {ids.shape[1]} tokens -> logits {tuple(logits.shape)} {logits.dtype}")
