"""
Plumbing shared by every script, written once: model/device flags, torchrun initialisation, rank-0 printing,
atomic checkpoint directories and JSONL logs. Nothing here is specific to diffusion or to d1.
"""

import contextlib
import json
import math
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist

import model as M

# -----------------------------------------------------------------------------
# Model, device and dtype


def add_model_args(ap, default_model="tiny"):
    ap.add_argument("--model", default=default_model,
                    help=f"'tiny' (random CPU-sized model, char tokenizer), a local checkpoint directory in the official "
                         f"layout, or a hub id such as {M.LLADA_HUB_ID} (default: {default_model})")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="weight dtype; auto = bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda, ...")
    ap.add_argument("--adapter", default=None, help="a LoRA adapter (directory or .safetensors) to apply on top")


def resolve_device(spec="auto", local_rank=0):
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def resolve_dtype(spec, device):
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, spec)


def local_rank0_first(fn):
    """fn() on each node's local rank 0 first, then (after a barrier) on the other ranks. M.build downloads a hub
    checkpoint into the local cache: one process per node fetches the 16 GB while the others wait, then they all read
    the cached files, instead of every rank downloading the same snapshot at once."""
    first = int(os.environ.get("LOCAL_RANK", 0)) == 0
    if dist.is_initialized() and not first:
        dist.barrier()
    out = fn()
    if dist.is_initialized() and first:
        dist.barrier()
    return out


def build_model(name, dtype, device, seed=0):
    """M.build on every rank, local rank 0 first (local_rank0_first)."""
    return local_rank0_first(lambda: M.build(name, dtype, device, seed=seed))


def setup_model(args, local_rank=0, seed=0):
    """(model, tokenizer, device) from the flags of add_model_args."""
    device = resolve_device(args.device, local_rank)
    model, tok = build_model(args.model, resolve_dtype(args.dtype, device), device, seed=seed)
    if getattr(args, "adapter", None):
        M.load_lora(model, args.adapter)
    return model, tok, device


def training_setup(args, device, targets):
    """What sft.py and diffu_grpo.py both start with: (model, tok, params, dtype, autocast).
    LoRA keeps the base in the run's dtype (bf16 on a GPU; adapters fp32); full fine-tuning keeps fp32 master weights
    and computes in bf16 under autocast on a GPU (a 1e-5 update is below bf16's resolution for most weights)."""
    dtype = resolve_dtype(args.dtype, device) if args.lora_r else torch.float32
    model, tok = build_model(args.model, dtype, device, seed=args.seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    params = make_trainable(model, args, targets)
    return model, tok, params, dtype, autocast


def make_optimizer(params, args, total_steps):
    """AdamW with the run's betas and weight decay, and the lr schedule of lr_lambda."""
    opt = torch.optim.AdamW(params, lr=args.lr, betas=tuple(args.adam_betas), weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.warmup_steps, total_steps, args.lr_schedule))
    return opt, sched


def maybe_resume(args, model, opt, sched):
    """With --resume, restore OUT_DIR/checkpoint into the model and optimizer; returns its meta (None without)."""
    if not args.resume:
        return None
    path = os.path.join(args.out_dir, "checkpoint")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    meta = load_checkpoint(path, model, opt, sched)
    print0(f"resumed from {path} at step {meta['step']}")
    return meta


def make_trainable(model, args, targets):
    """Set up what a training script trains; returns the trainable parameters.
    The starting model may carry an adapter (--adapter, or an exact export of an earlier stage). With LoRA
    (--lora-r > 0) it is kept as frozen low-rank factors, part of the starting model (and of diffu-GRPO's reference
    policy), and a fresh adapter on `targets` is trained: nothing is rounded into bf16 weights. Full fine-tuning
    (fp32 weights) merges it exactly first."""
    if getattr(args, "adapter", None):
        M.load_lora(model, args.adapter)
    if M.has_lora(model) and not args.lora_r:
        M.merge_lora(model, torch.float32)
    if args.lora_r:
        M.apply_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, targets,
                     generator=torch.Generator().manual_seed(args.seed))
    model.gradient_checkpointing = args.grad_ckpt
    return [p for p in model.parameters() if p.requires_grad]


# -----------------------------------------------------------------------------
# Distributed: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; NCCL on GPU, gloo on CPU (so CPU tests run this path).


def compute_init(device_spec="auto"):
    """Returns (rank, local_rank, world_size, device). Works with and without torchrun."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        device = resolve_device(device_spec, local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return rank, local_rank, world, device
    return 0, 0, 1, resolve_device(device_spec)


EXIT_AFTER_CLEANUP = False  # set by a script run from the command line (its `if __name__ == "__main__":`)


def compute_cleanup():
    """The end of a distributed run: every rank waits at a barrier, so all work (the export included) is done.
    A script run from the command line then ends its process at once with os._exit(0): on CPU a gloo worker has,
    rarely and only at interpreter teardown after a finished run, aborted in C++ with "terminate called without an
    active exception", failing a run whose results were all written. Called from Python (tests), it destroys the
    process group instead and returns."""
    if dist.is_initialized():
        dist.barrier()
        if EXIT_AFTER_CLEANUP:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        dist.destroy_process_group()


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*a, **k):
    if is_main():
        print(*a, **k, flush=True)


def all_reduce_grads(params, world):
    """Average gradients over ranks: one flat all-reduce instead of one call per tensor (the LoRA model has
    hundreds of small tensors). Parameters without a gradient contribute zeros, so every rank stays in step."""
    if world == 1:
        return
    params = [p for p in params if p.requires_grad]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])
    dist.all_reduce(flat)
    flat /= world
    i = 0
    for p in params:
        n = p.numel()
        p.grad = flat[i:i + n].view_as(p).to(p.dtype)
        i += n


def broadcast_params(params, world):
    """Make every rank start from rank 0's weights (and prove they are in sync by construction)."""
    if world == 1:
        return
    for p in params:
        dist.broadcast(p.data, 0)


# -----------------------------------------------------------------------------
# Checkpoints and logs


@contextlib.contextmanager
def atomic_dir(final):
    """Write a checkpoint into FINAL.tmp, then rename it into place: a crash mid-write never leaves a half-written
    checkpoint under the final name (rename within one filesystem is atomic)."""
    tmp = final.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    yield tmp
    old = final.rstrip("/") + ".old"
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


class JsonlLog:
    """Append one JSON object per line (rank 0 only); opened per write so a crash never loses earlier lines."""

    def __init__(self, path):
        self.path = path
        if path and is_main():
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(self, **rec):
        if self.path and is_main():
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": time.time(), **rec}) + "\n")


def fmt_metrics(step, metrics):
    """One log line, fields split by '|'."""
    parts = [f"step {step}"]
    for k, v in metrics.items():
        parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    return " | ".join(parts)


def lr_lambda(warmup, total, schedule):
    """Multiplier of the base lr at a step: linear warmup, then constant, linear or cosine decay to 0."""
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - frac if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * frac))
    return f


def batch_for(step, batch_size, n, seed):
    """Indices of global step `step`'s batch: the training set is read as a stream of seeded permutations (one per
    epoch) cut into consecutive batches, so a batch may span two epochs and any batch size works with any set size
    (even a set smaller than one batch). A function of the step alone, so a resumed run reads the same data. sft.py
    draws its examples with it, diffu_grpo.py its prompts."""
    idx, pos = [], step * batch_size
    while len(idx) < batch_size:
        epoch, off = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        take = perm[off:off + batch_size - len(idx)]
        idx += take.tolist()
        pos += len(take)
    return torch.tensor(idx)


def save_checkpoint(path, model, tokenizer, optimizer, scheduler, meta, extra=None):
    """A resumable checkpoint, written atomically: the trainable weights (the LoRA adapter alone, or the full
    model in the official layout), optimizer and scheduler state, meta.json (args, step, metrics) and, if given,
    extra.pt (other tensors a trainer must restore, e.g. sft.py's best weights for early stopping)."""
    if not is_main():
        return
    with atomic_dir(path) as tmp:
        if M.has_lora(model):
            M.save_lora(model, tmp)
        else:
            M.save_model(model, tmp, tokenizer)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                   os.path.join(tmp, "trainer_state.pt"))
        if extra is not None:
            torch.save(extra, os.path.join(tmp, "extra.pt"))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2, default=str)


def load_checkpoint(path, model, optimizer, scheduler):
    """Restore what save_checkpoint wrote into an already built model/optimizer/scheduler; returns meta."""
    from safetensors.torch import load_file
    if M.has_lora(model):
        M.load_lora(model, path)
    else:
        sd = {}
        for shard in M._checkpoint_shards(path):
            sd.update(load_file(os.path.join(path, shard)))
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in sd.items()})
    state = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    with open(os.path.join(path, "meta.json")) as f:
        return json.load(f)


def add_export_args(ap):
    ap.add_argument("--export", default="exact", choices=["exact", "merged"],
                    help="how OUT_DIR/final is written for a LoRA run. exact: base weights + adapter.safetensors; "
                         "model.py applies the adapter at load, so the loaded model IS the trained policy. merged: "
                         "W + BA merged in fp32 and saved in fp32 under the official keys (for the official code; 2x "
                         "the size of bf16 weights, and loading it back in bf16 rounds a small update away)")
    ap.add_argument("--no-export", action="store_true", help="skip the final export")


def export_model(path, model, tokenizer, meta=None, mode="exact"):
    """The final model in the official layout. The contract: `--model PATH` loads the policy that was trained.
    mode 'exact' keeps any LoRA adapter beside the base weights (model.load_model applies it); 'merged' folds it in
    fp32 (model.save_model; refused if the cast would lose more than 1% of the update). Prints how much of the
    update a merge into the base dtype would keep, so the cost of a bf16 merge is never a surprise."""
    if not is_main():
        return
    if M.has_lora(model):
        base_dtype = next(m.weight.dtype for m in model.modules() if isinstance(m, M.LoRALinear))
        print0(f"export ({mode}): a merge into {base_dtype} would keep {100 * M.merge_survival(model, base_dtype):.1f}% "
               f"of the LoRA update (the exported model keeps 100%)")
    with atomic_dir(path) as tmp:
        M.save_model(model, tmp, tokenizer, merge=mode == "merged")
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({**(meta or {}), "export": mode}, f, indent=2, default=str)


def assert_ranks_in_sync(params, world):
    """Gather a fingerprint of the weights from every rank and fail loudly if any rank differs."""
    if world == 1:
        return True
    fp = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().abs().sum()]) for p in params])
    fp = fp.flatten().to(params[0].device)
    gathered = [torch.zeros_like(fp) for _ in range(world)]
    dist.all_gather(gathered, fp)
    if not all(torch.equal(gathered[0], g) for g in gathered[1:]):
        raise RuntimeError("ranks hold different weights: distributed training is out of sync")
    return True
