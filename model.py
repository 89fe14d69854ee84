"""
LLaDA: a bidirectional transformer that predicts masked tokens (Nie et al., arXiv 2502.09992).

    python model.py                         # build the tiny model, print its size and one forward pass

This file is the network, readable top to bottom:
  1. LLaDAConfig   - the fields of the official config.json that matter (and a check for the ones we don't support)
  2. RMSNorm, RoPE, Block, LLaDA - the network; module names equal the official safetensors keys exactly
  3. LoRA          - low-rank adapters (Hu et al. 2021) in a few dozen lines, with an "adapters off" switch
  4. tiny_tokenizer / tiny_config - a laptop-sized model that runs through the very same code
Reading and writing it on disk (the official checkpoint layout, adapters, PEFT, the hub) is weights.py.

LLaDA is Llama without the causal mask: every position attends to every other position, and the network is
trained to predict the original token at every [MASK] position. Generation (sample.py) starts from an all-mask
canvas and unmasks it over a number of steps.

Dream-7B (cfg.arch == "dream") is the same network with three differences, each marked where it acts: biases on
q, k and v; positions counted from each row's first real token; and the logit shift (Dream kept Qwen's next-token
head, so the prediction for position j comes from position j - 1). weights.py renames its checkpoint's keys.
"""

import contextlib
import math
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
    arch: str = "llada"  # or "dream": Dream-7B, this network with three differences (the module docstring)
    # other config.json fields, kept so that a round trip loses nothing
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def head_dim(self):
        return self.d_model // self.n_heads

    # Dream's config.json names (Qwen2's) -> ours.
    _DREAM_NAMES = {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
                    "num_key_value_heads": "n_kv_heads", "intermediate_size": "mlp_hidden_size",
                    "vocab_size": "embedding_size", "rope_theta": "rope_theta", "rms_norm_eps": "rms_norm_eps",
                    "tie_word_embeddings": "weight_tying", "max_position_embeddings": "max_sequence_length",
                    "mask_token_id": "mask_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "pad_token_id"}
    _DREAM_REQUIRED = {"hidden_act": "silu", "rope_scaling": None, "use_sliding_window": False}

    # Settings of the official code we do not implement. (field, value we require)
    _REQUIRED = {"block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms", "include_bias": False,
                 "include_qkv_bias": False, "alibi": False, "rope": True, "input_emb_norm": False,
                 "scale_logits": False, "attention_layer_norm": False, "rope_full_precision": True}

    @classmethod
    def from_dict(cls, d):
        dream = str(d.get("model_type", "")).lower() == "dream"
        for key, want in (cls._DREAM_REQUIRED if dream else cls._REQUIRED).items():
            if d.get(key, want) not in (want, None):
                raise ValueError(f"config.json: {key}={d[key]!r} is not supported by this implementation "
                                 f"({'Dream-7B' if dream else 'LLaDA-8B'} uses {key}={want!r})")
        cfg = cls._from_dream(d) if dream else cls._from_llada(d)
        if cfg.d_model % cfg.n_heads or cfg.n_heads % cfg.n_kv_heads:
            raise ValueError(f"config.json: d_model={cfg.d_model}, n_heads={cfg.n_heads}, n_kv_heads={cfg.n_kv_heads} "
                             "must satisfy d_model % n_heads == 0 and n_heads % n_kv_heads == 0")
        return cfg

    @classmethod
    def _from_llada(cls, d):
        names = {f.name for f in fields(cls)} - {"extra"}
        kw = {k: d[k] for k in names if d.get(k) is not None}
        if d.get("mlp_hidden_size") is None and "mlp_ratio" in d:  # mlp_ratio only counts when mlp_hidden_size is unset
            kw["mlp_hidden_size"] = d["mlp_ratio"] * d["d_model"]
        kw.setdefault("embedding_size", kw.get("vocab_size", cls.vocab_size))
        return cls(**kw, extra={k: v for k, v in d.items() if k not in names})

    @classmethod
    def _from_dream(cls, d):
        kw = {ours: d[theirs] for theirs, ours in cls._DREAM_NAMES.items() if d.get(theirs) is not None}
        # Dream's vocab_size is its embedding's rows (152,064 for the 7B, more than the tokenizer's tokens)
        return cls(**kw, vocab_size=kw.get("embedding_size", cls.embedding_size), arch="dream",
                   extra={k: v for k, v in d.items() if k not in cls._DREAM_NAMES})

    def to_dict(self):
        if self.arch == "dream":  # Dream's own names; model_type, auto_map etc. come back from `extra`
            d = {"model_type": "Dream", "architectures": ["DreamModel"], "hidden_act": "silu", "rope_scaling": None,
                 "use_sliding_window": False, "attention_dropout": 0.0, **self.extra}
            d.update({theirs: getattr(self, ours) for theirs, ours in self._DREAM_NAMES.items()})
            return d
        # The official field names, so the official modeling code loads our checkpoints.
        d = {"model_type": "llada", "architectures": ["LLaDAModelLM"],
             "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                          "AutoModel": "modeling_llada.LLaDAModelLM",
                          "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
             **{k: v for k, v in self._REQUIRED.items()}, "mlp_ratio": 4, "attention_dropout": 0.0,
             "residual_dropout": 0.0, "embedding_dropout": 0.0, "layer_norm_with_affine": True,
             "bias_for_layer_norm": False}
        d.update(self.extra)
        d.update({f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("extra", "arch")})
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
    """Rotary embedding angles (Su et al. 2021) for integer positions (T,) or (B, T) -> cos, sin (..., head_dim), fp32.
    inv_freq_i = theta^(-2i/head_dim) for i < head_dim/2; the angles are duplicated as cat(freqs, freqs) because
    LLaDA uses the rotate-half layout (the head dim is split into two halves, not interleaved pairs)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    freqs = positions.float()[..., None] * inv_freq  # (..., T, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (..., T, head_dim)
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
        qkv_bias = cfg.arch == "dream"  # Dream (Qwen2) has biases on q, k and v (and nowhere else); LLaDA has none
        self.q_proj = nn.Linear(D, cfg.n_heads * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(D, cfg.n_kv_heads * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(D, cfg.n_kv_heads * hd, bias=qkv_bias)
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
        positions = torch.arange(P, P + T, device=input_ids.device)
        if self.cfg.arch == "dream" and key_mask is not None:
            # Dream counts each row's positions from its first real token: cumsum(mask) - 1 (pads get 1; never read).
            # LLaDA's official code keeps 0 .. T-1 whatever the padding.
            pos = attention_mask.long().cumsum(-1) - 1
            positions = pos.masked_fill(attention_mask == 0, 1)[:, P:]  # (B, T)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)
        if cos.dim() == 3:  # per-row positions: broadcast over heads
            cos, sin = cos[:, None], sin[:, None]
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
        if self.cfg.arch == "dream":
            # The logit shift. Dream's head predicts token i + 1 at position i (Qwen's next-token head): position j's
            # prediction is read from position j - 1, and position 0 reuses its own. Aligned here, once, on the
            # hidden states (ln_f and the head act per position), every consumer (the sampler, the estimators, the SFT
            # loss, evaluation) reads logits[:, j] as the prediction for token j, for LLaDA and Dream alike.
            # Only the rows that get logits are read (index j - 1 instead of j), nothing is copied.
            if past_kv is not None:
                raise UsageError("the prefix cache does not apply to Dream: position P's prediction comes from the "
                                 "cached position P - 1")
            if logits_index is not None:
                logits_index = (logits_index - 1).clamp(min=0)
            else:
                rows = torch.arange(T, device=h.device)[logits_slice if logits_slice is not None else slice(None)]
                h, logits_slice = h[:, (rows - 1).clamp(min=0)], None
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
        """Random init for tiny models and benchmarks: ones for the norms, normal(0, 0.1) for Dream's q/k/v biases,
        normal(0, 1/sqrt(fan_in)) for every matrix (a Linear's weight is (out, in) and an embedding's (vocab,
        d_model), so fan_in is shape[-1]), or normal(0, std) if `std` is given. Why fan-in and not a fixed 0.02: at
        the tiny width (128) 0.02 is 4x below the fan-in scale, the attention logits start near 0 (~0.05), and the
        tiny Sudoku model then sat on a loss plateau (digits learned, given cells not yet copied) for 250 to 400+
        steps, exiting at a step that changed with the CPU's float rounding. With fan-in init the same runs left it
        by step 50-75 (docs/tiny_sudoku_rl_probes.md, 4).
        """
        for name, p in self.named_parameters():
            if name.endswith("proj.bias"):  # Dream's q/k/v biases: small, but not zero (a test must see them)
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.dtype) * 0.1)
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                s = std if std is not None else p.shape[-1] ** -0.5
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.dtype) * s)
        return self

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


# -----------------------------------------------------------------------------
# 3. LoRA: W x + (alpha / r) * B (A dropout(x)), with B = 0 at the start so the adapted model equals the base one.

# d1's RL targets AS RUN. d1's config asks PEFT for q/k/v/o/up/down/gate projections, but LLaDA names its modules
# q_proj, k_proj, v_proj, attn_out, ff_proj, up_proj, ff_out: only q_proj, k_proj, v_proj and up_proj match, so
# those four are what d1 adapted (and not the LM head). LORA_TARGETS_WIDE adapts every linear layer of the blocks
# plus the untied LM head (model.transformer.ff_out shares the name ff_out with the MLP's output projection).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj")
LORA_TARGETS_WIDE = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")


class LoRALinear(nn.Module):
    """Replaces an nn.Linear in place. It keeps the base Parameters under the same names (`weight`, `bias`), so the
    state_dict key of the base weight does not change; the adapter adds `lora_A` (r, in) and `lora_B` (out, r).
    The adapters are kept in fp32 (a 3e-6 learning rate would vanish in bf16's 8-bit mantissa) and cast to the
    activation dtype for the matmul; gradients flow back through the cast into the fp32 master copy.

    An earlier stage's adapter (RL starting from the SFT model) is kept as FROZEN factors `lora_frozen_A/B`
    (scale folded into B) instead of being merged into a bf16 weight, where a small update rounds away (see
    merge_survival). They are part of the starting model: always on, also for the reference policy."""

    def __init__(self, base, r, alpha, dropout, generator=None):  # base: an nn.Linear (or a LoRALinear to re-arm)
        super().__init__()
        self.weight, self.bias = base.weight, base.bias  # Dream's q/k/v carry a bias: frozen with the weight
        for p in (self.weight, self.bias):
            if p is not None:
                p.requires_grad_(False)
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
        y = F.linear(x, self.weight, self.bias)
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


# Dream's weight names (Qwen2's) <-> ours (model.py's modules, LLaDA's official names), as (theirs, ours) prefixes:
# weights.py renames a checkpoint's keys at the file's edge, so one network serves both; LoRA targets and PEFT
# adapters of a Dream model use its names too.
_DREAM_TOP = (("model.embed_tokens.", "model.transformer.wte."), ("lm_head.", "model.transformer.ff_out."),
              ("model.norm.", "model.transformer.ln_f."))
_DREAM_BLOCK = (("input_layernorm.", "attn_norm."), ("post_attention_layernorm.", "ff_norm."),
                ("self_attn.q_proj.", "q_proj."), ("self_attn.k_proj.", "k_proj."), ("self_attn.v_proj.", "v_proj."),
                ("self_attn.o_proj.", "attn_out."), ("mlp.gate_proj.", "ff_proj."), ("mlp.up_proj.", "up_proj."),
                ("mlp.down_proj.", "ff_out."))
_LAYERS = ("model.layers.", "model.transformer.blocks.")


def dream_key(key, arch, to_official):
    """A parameter name in the official checkpoint's naming (to_official) or in ours (from it); the identity for
    LLaDA, whose official names are ours. A Dream name that matches nothing comes back as 'unknown:NAME' (a key
    check then reports it)."""
    if arch != "dream":
        return key
    src, dst = (1, 0) if to_official else (0, 1)
    for pair in _DREAM_TOP:
        if key.startswith(pair[src]):
            return pair[dst] + key[len(pair[src]):]
    if key.startswith(_LAYERS[src]):
        n, _, rest = key[len(_LAYERS[src]):].partition(".")
        for pair in _DREAM_BLOCK:
            if rest.startswith(pair[src]):
                return f"{_LAYERS[dst]}{n}.{pair[dst]}{rest[len(pair[src]):]}"
    return "unknown:" + key


def official_leaf(path, arch):
    """The official name of the linear layer at module path `path` (ours: model.transformer.blocks.3.ff_out): LLaDA's
    is ours; Dream's is Qwen2's (o_proj, gate_proj, down_proj; its head is lm_head, not ff_out)."""
    return dream_key(path + ".weight", arch, to_official=True).split(".")[-2]


def apply_lora(model, r, alpha, dropout=0.0, targets=LORA_TARGETS, generator=None):
    """Wrap every nn.Linear whose name is in `targets` (ours, or for Dream its own: o_proj, gate_proj, down_proj,
    lm_head); freeze everything else. A model that already has adapters (loaded from an SFT export, or --adapter)
    keeps them as frozen factors of the starting model, and every LoRALinear gets a fresh trainable adapter (so a
    module the earlier stage adapted but `targets` omits stays adapted). Returns the model."""
    freeze_lora(model)
    for p in model.parameters():
        p.requires_grad_(False)
    arch = getattr(getattr(model, "cfg", None), "arch", "llada")
    for path, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                fresh = LoRALinear(child, r, alpha, dropout, generator)
                fresh.set_frozen(child.lora_frozen_A.detach(), child.lora_frozen_B.detach())
                setattr(parent, name, fresh)
            elif isinstance(child, nn.Linear) and (name in targets or official_leaf(f"{path}.{name}", arch) in targets):
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
                lin = nn.Linear(child.weight.shape[1], child.weight.shape[0], bias=child.bias is not None,
                                device=child.weight.device, dtype=dtype)
                with torch.no_grad():
                    lin.weight.copy_(child.merged_weight(dtype))
                    if child.bias is not None:  # Dream's q/k/v
                        lin.bias.copy_(child.bias)
                setattr(parent, name, lin)
    return model


def load_adapter_state(model, sd, meta):
    """Apply what save_lora wrote (tensors `sd`, metadata r / alpha / targets) to a model: wrap it first if it has
    no adapters, restore an earlier stage's frozen factors (their shapes come from the file), then load the
    factors. Every key must match. Returns the model."""
    if not has_lora(model):
        apply_lora(model, int(meta["r"]), float(meta["alpha"]), targets=tuple(meta["targets"].split(",")))
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear) and name + ".lora_frozen_A" in sd:
            m.set_frozen(sd[name + ".lora_frozen_A"], sd[name + ".lora_frozen_B"])
    missing, extra = set(lora_state_dict(model)) - set(sd), set(sd) - set(lora_state_dict(model))
    if missing or extra:
        raise KeyError(f"adapter keys do not match the model (missing e.g. {sorted(missing)[:3]}, unexpected e.g. "
                       f"{sorted(extra)[:3]})")
    model.load_state_dict(sd, strict=False)
    return model


def lora_state_dict(model):
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}


# -----------------------------------------------------------------------------
# 4. The tiny model: a character-level tokenizer with LLaDA's special tokens and chat template, and a small config.

SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                 "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
                 "<|start_header_id|>assistant<|end_header_id|>\n\n{{ '' }}")
# (the final {{ '' }} stops Jinja from dropping the template's trailing newline)


# Dream's (Qwen's) special tokens and chat turns, for the tiny Dream (--model tiny-dream). Without the default
# system line Qwen's template adds (34 characters: the tiny recipe's canvas is sized for a 46-token prompt); a real
# Dream checkpoint brings its own tokenizer and template.
DREAM_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]
DREAM_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                       "{% endfor %}<|im_start|>assistant\n{{ '' }}")


def tiny_tokenizer(arch="llada"):
    """A transformers fast tokenizer built in-process with the `tokenizers` library: one token per printable ASCII
    character (plus newline and tab), and LLaDA's special tokens matched whole. Same roles as LLaDA's: BOS comes
    from the chat template, <|endoftext|> is both EOS and PAD, <|mdm_mask|> is the mask. arch="dream": Dream's
    special tokens and chat template instead (no BOS; <|endoftext|> is EOS and PAD, <|mask|> the mask)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    chars = ["\n", "\t"] + [chr(c) for c in range(32, 127)]
    specials = DREAM_SPECIAL_TOKENS if arch == "dream" else SPECIAL_TOKENS
    vocab = {t: i for i, t in enumerate(specials + ["<unk>"] + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character alone
    tok.decoder = decoders.Fuse()  # concatenate, no spaces in between
    tok.add_special_tokens(specials)
    roles = dict(mask_token="<|mask|>") if arch == "dream" else dict(bos_token="<|startoftext|>",
                                                                     mask_token="<|mdm_mask|>")
    t = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                unk_token="<unk>", **roles)
    t.chat_template = DREAM_CHAT_TEMPLATE if arch == "dream" else CHAT_TEMPLATE
    t.padding_side = "left"
    return t


def tiny_config(tokenizer=None, **overrides):
    """A few layers, small width; vocabulary = the tiny tokenizer's. GQA on (4 query heads share 2 K/V heads) so
    that path is exercised everywhere. arch="dream" in overrides: the tiny Dream (biases, positions, the shift)."""
    tokenizer = tokenizer or tiny_tokenizer(overrides.get("arch", "llada"))
    kw = dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, mlp_hidden_size=384, vocab_size=len(tokenizer),
              embedding_size=128, rope_theta=10000.0, max_sequence_length=1024,
              mask_token_id=tokenizer.mask_token_id, eos_token_id=tokenizer.eos_token_id,
              pad_token_id=tokenizer.pad_token_id)
    kw.update(overrides)
    assert kw["embedding_size"] >= kw["vocab_size"]
    return LLaDAConfig(**kw)


if __name__ == "__main__":
    tok = tiny_tokenizer()
    model = LLaDA(tiny_config(tok)).init_weights(torch.Generator().manual_seed(0)).eval()
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    logits = model(ids)
    print(f"tiny: {model.num_params():,} parameters | config {model.cfg}")
    print(f"prompt {text!r} -> {ids.shape[1]} tokens -> logits {tuple(logits.shape)} {logits.dtype}")
    print("a real checkpoint: python sample.py --model DIR_OR_HUB_ID (weights.py loads it)")
