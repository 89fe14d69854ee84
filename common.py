"""
The small shared rest of every script: torchrun and the device, the model a script starts from, the optimizer step
that SFT and RL share, the order of the training data, and the command-line entry point (one line, exit 2, for a
usage error). The recipe's flags are config.py; the run around a training loop is harness.py.
"""

import atexit
import contextlib
import dataclasses
import math
import os
import signal
import sys

import torch
import torch.distributed as dist
from tqdm import tqdm

import model as M
import parallel as P
import weights as W


# -----------------------------------------------------------------------------
# 1. Distributed: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; NCCL on GPU, gloo on CPU (so CPU tests run this path)


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


def compute_cleanup(exit_code=0):
    """The end of a distributed run: every rank waits at a barrier, so all work (the export included) is done.
    A script run from the command line then ends its process at once with os._exit(exit_code): on CPU a gloo worker has,
    rarely and only at interpreter teardown after a finished run, aborted in C++ with "terminate called without an
    active exception", failing a run whose results were all written. Called from Python (tests), it destroys the
    process group instead and returns."""
    if dist.is_initialized():
        dist.barrier()
        if EXIT_AFTER_CLEANUP:
            exit_now(exit_code)
        dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*a, **k):
    if is_main():
        print(*a, **k, flush=True)


def peak_memory(device):
    """{'peak_mem_gib': the most GPU memory this rank has allocated so far} on a GPU, {} on the CPU: logged with every
    step, so a run's metrics.jsonl says what it needed (compare the memory plan, bench.py --plan)."""
    return {"peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30} if device.type == "cuda" else {}


def reduce_metrics(metrics, world, device):
    """Mean of every metric over ranks (for logging only)."""
    if world == 1:
        return metrics
    keys = sorted(metrics)
    t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: v / world for k, v in zip(keys, t.tolist())}


def distribute(cfg, model, world, device, frozen=None):
    """The model (and the frozen reference policy, if any) spread over the ranks, DDP or --fsdp (parallel.py).
    Returns the trainable parameters to build the optimizer on. Every rank starts from the same weights: DDP
    broadcasts rank 0's; FSDP2 shards copies that are identical by construction (the same checkpoint, the same
    seeded init). Full fine-tuning on a GPU computes in bf16 from fp32 master weights (FSDP2's mixed precision)."""
    if cfg.fsdp and world == 1:
        print0("--fsdp on one process: nothing to shard over; checkpoints are still written by "
               "torch.distributed.checkpoint, so the run can resume on more ranks")
    mixed = not cfg.lora_r and device.type == "cuda"
    if frozen is not None and cfg.fsdp:
        P.distribute(frozen, True, world, device, mixed)
    return P.distribute(model, cfg.fsdp, world, device, mixed)


# -----------------------------------------------------------------------------
# 2. The model a script starts from: device, dtype, weights, what is trained


def lora_targets(spec):
    """--lora-targets: 'd1', 'wide' or a comma-separated list of module names -> a tuple of names."""
    return {"d1": M.LORA_TARGETS, "wide": M.LORA_TARGETS_WIDE}.get(spec) or tuple(spec.split(","))


def resolve_device(spec="auto", local_rank=0):
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if spec == "cuda":  # each torchrun rank its own GPU
        return torch.device(f"cuda:{local_rank}")
    return torch.device(spec)


def resolve_dtype(spec, device):
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, spec)


def local_rank0_first(fn):
    """fn() on each node's local rank 0 first, then (after a barrier) on the other ranks. W.build downloads a hub
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
    """W.build on every rank, local rank 0 first (local_rank0_first)."""
    return local_rank0_first(lambda: W.build(name, dtype, device, seed=seed))


def setup_model(args, local_rank=0, seed=0):
    """(model, tokenizer, device) from the flags of add_model_args."""
    device = resolve_device(args.device, local_rank)
    model, tok = build_model(args.model, resolve_dtype(args.dtype, device), device, seed=seed)
    if getattr(args, "adapter", None):
        W.load_lora(model, args.adapter)
    return model, tok, device


def training_setup(args, device, targets):
    """What sft.py and diffu_grpo.py both start with: (model, tok, params, dtype, autocast).
    LoRA keeps the base in the run's dtype (bf16 on a GPU; adapters fp32); full fine-tuning keeps fp32 master weights
    and computes in bf16 under autocast on a GPU (a 1e-5 update is below bf16's resolution for most weights).
    The model is on `device` once common.distribute has run."""
    dtype = resolve_dtype(args.dtype, device) if args.lora_r else torch.float32
    # --fsdp on several ranks: the model is built on the CPU and FSDP2 moves each rank's shards to the device, block
    # by block (parallel.distribute), so no GPU ever holds the whole fp32 model (nor its reference copy).
    sharded = args.fsdp and int(os.environ.get("WORLD_SIZE", 1)) > 1
    model, tok = build_model(args.model, dtype, torch.device("cpu") if sharded else device, seed=args.seed)
    if getattr(args, "prefix_cache", False) and model.cfg.arch == "dream":  # refused now, not at the first rollout
        raise M.UsageError("--prefix-cache does not apply to Dream (with its logit shift a block's first position is "
                           "predicted from the cached position before it): leave it off")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    params = make_trainable(model, args, targets)
    return model, tok, params, dtype, autocast


def make_trainable(model, args, targets):
    """Set up what a training script trains; returns the trainable parameters.
    The starting model may carry an adapter (--adapter, or an exact export of an earlier stage). With LoRA
    (--lora-r > 0) it is kept as frozen low-rank factors, part of the starting model (and of diffu-GRPO's reference
    policy), and a fresh adapter on `targets` is trained: nothing is rounded into bf16 weights. Full fine-tuning
    (fp32 weights) merges it exactly first."""
    if getattr(args, "adapter", None):
        W.load_lora(model, args.adapter)
    if M.has_lora(model) and not args.lora_r:
        M.merge_lora(model, torch.float32)
    if args.lora_r:
        M.apply_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, targets,
                     generator=torch.Generator().manual_seed(args.seed))
    model.gradient_checkpointing = args.grad_ckpt
    return [p for p in model.parameters() if p.requires_grad]


# -----------------------------------------------------------------------------
# 3. The optimizer step, one for SFT and RL


@dataclasses.dataclass
class Trainer:
    """What every update needs, bundled because it always travels together: the model, its AdamW optimizer and lr
    schedule, the parameters they train, the world size (gradients are averaged over ranks), the clipping norm, and
    the autocast context of the forward passes (bf16 compute on a GPU with fp32 weights; a no-op on the CPU)."""
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    params: list
    world: int = 1
    max_grad_norm: float = 1.0
    autocast: object = dataclasses.field(default_factory=contextlib.nullcontext)
    skip_nonfinite: bool = False  # --skip-nonfinite: skip a step whose loss or gradient is not finite (counted)
    skipped: int = 0              # steps skipped so far
    checkpoint: str = "no checkpoint was written"  # what OUT_DIR/checkpoint holds (harness.Run keeps it current)


def make_trainer(model, params, cfg, total_steps, world=1, autocast=None):
    """A Trainer with AdamW (the run's betas and weight decay) and the lr schedule of lr_lambda."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, total_steps, cfg.lr_schedule))
    return Trainer(model, opt, sched, params, world, cfg.max_grad_norm, autocast or contextlib.nullcontext(),
                   cfg.skip_nonfinite)


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


def optimizer_step(tr, loss=None):
    """The end of every update, SFT's and RL's (the gradients are already averaged over ranks: DDP and FSDP2 reduce
    them during backward): clipped to tr.max_grad_norm, one AdamW step, one schedule step. Returns the gradient
    norm before clipping.
    A non-finite gradient norm, or a non-finite `loss` (this rank's loss of the step) on any rank, never reaches
    the weights: the step is skipped on every rank (counted in tr.skipped) with tr.skip_nonfinite, and otherwise
    the run stops (Diverged) before any weight moves."""
    norm = P.scalar(torch.nn.utils.clip_grad_norm_(tr.params, tr.max_grad_norm))
    bad = [] if math.isfinite(norm) else [f"the gradient norm is {norm}"]
    loss_bad = loss is not None and not math.isfinite(loss)
    if tr.world > 1:  # the norm is the same on every rank (reduced gradients); the loss is this rank's
        flag = torch.tensor([float(loss_bad)], device=tr.params[0].device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        loss_bad = bool(flag.item())
    if loss_bad:
        bad.insert(0, "the loss is " + (str(loss) if loss is not None and not math.isfinite(loss) else
                                        "not finite on another rank"))
    if bad:
        tr.opt.zero_grad(set_to_none=True)
        step = tr.sched.last_epoch + 1
        if not tr.skip_nonfinite:
            raise Diverged(f"diverged at optimizer step {step}: {' and '.join(bad)}; no weight was updated, nothing "
                           f"was exported, and {tr.checkpoint}. Start over with a lower --lr (--overwrite), or "
                           f"continue with --resume --skip-nonfinite to skip such steps")
        tr.skipped += 1
        tr.sched.step()  # the schedule follows the step count, skipped steps included
        return norm
    tr.opt.step()
    tr.sched.step()
    tr.opt.zero_grad(set_to_none=True)
    return norm


def check_finite(model, what):
    """Refuse (Diverged) to write `what` if any weight of `model` is not finite: no checkpoint or export ever holds
    one."""
    bad = P.nonfinite(model)
    if bad:
        raise Diverged(f"{bad[0]} holds non-finite values: {what} is not written (the weights have diverged; "
                       f"lower --lr)")


# -----------------------------------------------------------------------------
# 4. The order of the training data, and the seeds of RL's randomness


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


def batch_generators(seed, rank, b, device):
    """The generators of rollout batch b on this rank: {"rollout": sampling noise, "mask": prompt-mask patterns},
    seeded from (seed, rank, batch), so they are reproducible, independent of any global RNG, and a resumed run
    draws exactly what the uninterrupted run drew. Only LoRA dropout uses the global RNG (F.dropout takes no
    generator, and gradient checkpointing restores the global RNG state when it recomputes a block); seeding it per
    batch makes resume exact, and it touches nothing else."""
    gens = {name: torch.Generator(device=device).manual_seed(seed_for(seed, rank, b, i))
            for i, name in enumerate(("rollout", "mask"))}
    torch.manual_seed(seed_for(seed, rank, b, 2))
    return gens


def seed_for(seed, rank, batch, stream):
    """A distinct, reproducible seed per (run seed, rank, rollout batch, stream). Plain arithmetic, not hash():
    Python salts string hashes per process."""
    return ((seed * 1_000_003 + rank) * 1_000_033 + batch) * 8 + stream


# -----------------------------------------------------------------------------
# 5. The entry point of every script


class Diverged(Exception):
    """A run whose loss, gradient or weights went non-finite (optimizer_step, check_finite); common.cli: one line and
    exit status 3, nothing exported."""


class Interrupted(Exception):
    """A run stopped by SIGINT or SIGTERM after writing its checkpoint; common.cli exits with 128 + signum."""

    def __init__(self, signum):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def cli(main):
    """Run a script's main() from the command line. A UsageError (a mistake in what was asked for) is one line on
    stderr and exit status 2, as argparse's own errors are; a diverged run is one line and exit status 3; an
    interrupted run exits with 128 + the signal's number and no traceback; any other exception is a program error
    and keeps its traceback. The exit hooks (on_exit: e.g. giving back the out-dir a run claimed) run on every
    way out."""
    global EXIT_AFTER_CLEANUP
    EXIT_AFTER_CLEANUP = True  # see compute_cleanup
    prog = os.path.basename(sys.argv[0])
    try:
        main()
    except (M.UsageError, Diverged) as e:
        for bar in list(getattr(tqdm, "_instances", ())):  # an open progress bar ends first: the error is a line
            bar.close()
        if os.environ.get("RANK", "0") == "0":
            print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        exit_now(2 if isinstance(e, M.UsageError) else 3)  # no teardown: another rank may wait in a collective
    except Interrupted as e:
        exit_now(128 + e.signum)
    except KeyboardInterrupt:  # before the training loop (loading) or after it: nothing to checkpoint
        print(f"\n{prog}: interrupted (outside the training loop, nothing to save)", file=sys.stderr, flush=True)
        exit_now(130)
    run_exit_hooks()


_EXIT_HOOKS = []


def on_exit(fn):
    """Call fn() however the process ends: from cli's exits and compute_cleanup's (os._exit skips atexit), and at
    interpreter exit (a traceback). fn must be safe to call twice."""
    if not _EXIT_HOOKS:
        atexit.register(run_exit_hooks)
    _EXIT_HOOKS.append(fn)


def run_exit_hooks():
    while _EXIT_HOOKS:
        _EXIT_HOOKS.pop()()


def exit_now(code):
    """End the process at once (os._exit), after the exit hooks and with the output flushed."""
    run_exit_hooks()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


_WARNED = set()


def warn_once(key, message):
    """Print a warning the first time `key` is seen in this process."""
    if key not in _WARNED:
        _WARNED.add(key)
        print(f"warning: {message}", flush=True)
