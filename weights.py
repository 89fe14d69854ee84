"""
The official checkpoint layout on disk, both ways: LLaDA's config.json + sharded safetensors (+ index), LoRA adapters
beside the base weights, PEFT's adapter format, the tokenizer, and the hub.

    model, tok = build("GSAI-ML/LLaDA-8B-Instruct", torch.bfloat16, "cuda")    # or "tiny", a directory, an export

  1. load_model / save_model - one shard at a time; keys checked strictly against model.py's module names
  2. save_lora / load_lora    - an adapter alone (adapter.safetensors), with frozen earlier-stage factors
  3. read_peft / load_peft / save_peft - PEFT's LoRA folders (adapter_config.json + adapter_model.safetensors)
  4. build                    - `--model tiny|DIR|HUB_ID` (or a PEFT folder) -> (model, tokenizer), for every script
"""

import json
import math
import os
import shlex
import shutil

import torch
import torch.nn as nn

from model import (LLADA_HUB_ID, LLaDA, LLaDAConfig, LoRALinear, UsageError, dream_key, has_lora, load_adapter_state,
                   lora_state_dict, merge_survival, merged_state_dict, official_leaf, tiny_config, tiny_tokenizer)

ADAPTER_FILE = "adapter.safetensors"
TINY = {"tiny": "llada", "tiny-dream": "dream"}  # --model names of the random CPU-sized models, and their arch
# The code an export ships for AutoModel.from_pretrained(EXPORT, trust_remote_code=True): file in the export -> here.
TRANSFORMERS_CODE = {"configuration_llada.py": "hf/configuration_llada.py", "modeling_llada.py": "hf/modeling_llada.py",
                     "llada_model.py": "model.py"}


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
# -----------------------------------------------------------------------------
# 1. The official checkpoint layout: config.json + model-0000i-of-0000N.safetensors + model.safetensors.index.json


def resolve_model_dir(name_or_path):
    """A local directory is used as it is; anything else is a hub id fetched with huggingface_hub (config, weights
    and tokenizer files only). Without network and without a cached copy we fail at once with a clear message."""
    if os.path.isdir(name_or_path):
        if not os.path.exists(os.path.join(name_or_path, "config.json")):
            raise UsageError(run_dir_hint(name_or_path, "--model") or f"--model {name_or_path}: no config.json "
                             f"there (a checkpoint directory in the official layout holds config.json + safetensors)")
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


def run_dir_hint(path, flag):
    """What a run's OUT_DIR given as --model or --adapter is, and what to pass instead (None if it is not one): a
    finished run's model is OUT_DIR/final; an unfinished run (a checkpoint, no final/) is named as such, with the
    command that finishes it (the checkpoint records the command of its run)."""
    final, ckpt = os.path.join(path, "final"), os.path.join(path, "checkpoint")
    if os.path.isfile(os.path.join(final, "meta.json")):
        return f"{flag} {path} is a run's directory; its trained model is {final}: pass {flag} {final}"
    if os.path.isfile(os.path.join(ckpt, "meta.json")):
        with open(os.path.join(ckpt, "meta.json")) as f:
            meta = json.load(f)
        words, skip = [], False
        for w in shlex.split(meta.get("command", "")):  # the command again, less what would not finish it
            if not skip and w not in ("--resume", "--overwrite", "--halt-after") and not w.startswith("--halt-after="):
                words.append(w)
            skip = w == "--halt-after"
        again = shlex.join(words) + " --resume" if words else "its command again with --resume"
        alone = f"; or use the checkpoint's weights as they are: {flag} {ckpt}" if flag == "--model" and \
            os.path.isfile(os.path.join(ckpt, "config.json")) else ""
        return (f"{flag} {path} is an unfinished run (its last checkpoint is at step {meta.get('step')}, and it has "
                f"no final/ yet; it may still be running): finish it with {again}{alone}")
    if os.path.isfile(os.path.join(path, "metrics.jsonl")):
        return f"{flag} {path} is a run that stopped before its first checkpoint: there is no model in it"
    return None


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


def read_shards(model_dir, arch, device="cpu"):
    """A checkpoint's tensors one shard at a time, under model.py's names ({name: tensor} per shard): a Dream
    checkpoint carries Dream's own names (model.dream_key renames them). Loading and --resume both read this way."""
    for shard in sorted(_checkpoint_shards(model_dir)):
        yield {dream_key(k, arch, to_official=False): v
               for k, v in read_safetensors(os.path.join(model_dir, shard), device).items()}


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
    expected = {dream_key(k, cfg.arch, to_official=True) for k in model.state_dict()}
    found = {k for keys in shards.values() for k in keys}
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise KeyError(f"{model_dir}: checkpoint keys do not match the {cfg.arch} architecture of its config.json.\n"
                       f"  missing ({len(missing)}): {missing[:10]}\n"
                       f"  unexpected ({len(unexpected)}): {unexpected[:10]}")
    for sd in read_shards(model_dir, cfg.arch, device):  # assign: the loaded tensors become the parameters
        model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=False, assign=True)
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
    """Write the official layout into out_dir (which should be a fresh temporary directory; harness.py's atomic
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
    official = {dream_key(k, model.cfg.arch, to_official=True): v for k, v in sd.items()}  # Dream: its own names
    _write_safetensors(official, out_dir, max_shard_bytes)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(model.cfg.to_dict(), f, indent=2)
    here = os.path.dirname(os.path.abspath(__file__))
    for name, src in TRANSFORMERS_CODE.items() if model.cfg.arch == "llada" else ():  # what auto_map names
        shutil.copyfile(os.path.join(here, src), os.path.join(out_dir, name))
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


# -----------------------------------------------------------------------------
# 2. A LoRA adapter alone: adapter.safetensors (what a LoRA run checkpoints, and its exact export's adapter)


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
        raise UsageError(run_dir_hint(path, "--adapter") or f"--adapter {path!r}: no {ADAPTER_FILE} there (the "
                         f"final/ of a LoRA run of sft.py or diffu_grpo.py, a PEFT folder, or the .safetensors file)")
    try:
        with safe_open(f, framework="pt") as fh:
            meta = fh.metadata()
            sd = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as e:
        raise UsageError(f"{f}: not a readable adapter file ({type(e).__name__}: {str(e)[:120]})") from None
    try:
        return load_adapter_state(model, sd, meta)
    except KeyError as e:
        raise UsageError(f"{f}: {e.args[0]}") from None


# -----------------------------------------------------------------------------
# 3. PEFT's LoRA format, both ways (no dependency on PEFT: the format is two files). PeftModel wraps the official
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
    arch = model.cfg.arch  # a Dream adapter names Dream's modules (model.layers.N.self_attn.q_proj): ours from them
    factors = {dream_key(m + ".weight", arch, to_official=False)[:-len(".weight")]: f for m, f in factors.items()}
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
        official = dream_key(name + ".weight", model.cfg.arch, to_official=True)[:-len(".weight")]  # Dream: its own
        sd[f"{PEFT_PREFIX}{official}.lora_A.weight"] = A.contiguous().cpu()
        sd[f"{PEFT_PREFIX}{official}.lora_B.weight"] = B.contiguous().cpu()
    m0 = next(iter(mods.values()))
    alpha = float(r) if stacked else m0.scale * m0.r
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
           "r": r, "lora_alpha": alpha, "lora_dropout": 0.0, "use_rslora": False, "use_dora": False, "bias": "none",
           "target_modules": sorted({official_leaf(n, model.cfg.arch) for n in mods}), "modules_to_save": None,
           "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
           "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "revision": None}
    os.makedirs(out_dir, exist_ok=True)
    save_file(sd, os.path.join(out_dir, PEFT_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(out_dir, PEFT_CONFIG), "w") as f:
        json.dump(cfg, f, indent=2)


# -----------------------------------------------------------------------------
# 4. --model: the tokenizer and the model, from 'tiny', a directory, a hub id or a PEFT folder


def load_tokenizer(name_or_path):
    if name_or_path in TINY:
        return tiny_tokenizer(TINY[name_or_path])
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
    if name_or_path in TINY:
        tok = tiny_tokenizer(TINY[name_or_path])
        model = LLaDA(tiny_config(tok, arch=TINY[name_or_path])).init_weights(torch.Generator().manual_seed(seed))
        return model.to(device=device, dtype=dtype).eval(), tok
    return load_model(name_or_path, dtype, device), load_tokenizer(name_or_path)
