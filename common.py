"""
Plumbing shared by every script, written once: model/device flags, torchrun initialisation, rank-0 printing,
atomic checkpoint directories and JSONL logs. Nothing here is specific to diffusion or to d1.
"""

import contextlib
import json
import os
import shutil
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


def setup_model(args, local_rank=0, seed=0):
    """(model, tokenizer, device) from the flags of add_model_args."""
    device = resolve_device(args.device, local_rank)
    model, tok = M.build(args.model, resolve_dtype(args.dtype, device), device, seed=seed)
    if getattr(args, "adapter", None):
        M.load_lora(model, args.adapter)
    return model, tok, device


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


def compute_cleanup():
    if dist.is_initialized():
        dist.barrier()
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


def rng_state(*generators):
    return {"torch": torch.get_rng_state(), "generators": [g.get_state() for g in generators]}


def set_rng_state(state, *generators):
    torch.set_rng_state(state["torch"])
    for g, s in zip(generators, state["generators"]):
        g.set_state(s)


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
