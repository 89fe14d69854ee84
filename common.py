"""
Plumbing shared by every script, written once: model/device flags, torchrun initialisation, rank-0 printing,
atomic checkpoint directories and JSONL logs. Nothing here is specific to diffusion or to d1.
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import model as M

# -----------------------------------------------------------------------------
# Configs and the command line. Each trainer's recipe is a frozen dataclass whose defaults are d1's values; every
# field is also a flag (option() below), so the class IS the --help. Presets (the tiny laptop recipe, d1's per-task
# values) are tables of overrides, applied under what the user typed: a flag given on the command line always wins.

GROUPS = ("model", "data", "d1's algorithm", "beyond d1 (methods.py)", "sampling (rollouts)", "optimisation",
          "run and checkpoints", "debugging probes")


def option(default, help, group, **argparse_kw):
    """A config field that is also a flag: its d1 default, its --help text and its group in --help. argparse_kw:
    type (needed when the default is None), choices, nargs, metavar, aliases (other flag names)."""
    assert group in GROUPS, group
    return dataclasses.field(default=default, metadata=dict(help=help, group=group, kw=argparse_kw))


# The knobs both trainers have, described once: option(default, *SHARED[name]) in each config class.
SHARED = {
    "model": ("'tiny' (a random CPU-sized model, character tokenizer), a local checkpoint directory in the official "
              "layout (an export of sft.py or diffu_grpo.py included), or a hub id", "model"),
    "preset": ("which preset fills the flags you do not give: auto = tiny for --model tiny and for exports of tiny "
               "runs, d1 otherwise", "model", dict(choices=["auto", "d1", "tiny"])),
    "adapter": ("a LoRA adapter (directory or .safetensors) applied on top of --model", "model", dict(type=str)),
    "dtype": ("weight dtype; auto = bfloat16 on GPU, float32 on CPU", "model",
              dict(choices=["auto", "float32", "bfloat16"])),
    "device": ("auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda, ...", "model"),
    "lora_r": ("LoRA rank; 0 = full fine-tuning", "model"),
    "lora_alpha": ("LoRA alpha: the update is scaled by alpha / r", "model"),
    "lora_dropout": ("dropout on the LoRA input", "model"),
    "lora_targets": ("modules to adapt: a comma-separated list, 'd1' = " + ",".join(M.LORA_TARGETS) + " (what d1's "
                     "PEFT config matched in LLaDA) or 'wide' = " + ",".join(M.LORA_TARGETS_WIDE), "model"),
    "grad_ckpt": ("gradient checkpointing: recompute each block in the backward pass (less memory, more compute)",
                  "model"),
    "force": ("run even if the memory plan exceeds the GPU's memory", "model"),
    "prompt_style": ("d1's exact prompts, or compact ones (a character-level tiny model cannot afford d1's long "
                     "prompts)", "data", dict(choices=["d1", "compact"])),
    "data_path": ("a local dataset file or directory instead of the hub ('generate': this project's generator, "
                  "Sudoku and Countdown)", "data", dict(type=str)),
    "train_n": ("use only the first N training rows (generated tasks: generate N)", "data", dict(type=int)),
    "blanks": ("generated Sudoku: blank cells per puzzle, uniform in [MIN, MAX] (a puzzle is solved only if every "
               "blank is right)", "data", dict(metavar=("MIN", "MAX"))),
    "lr": ("peak learning rate", "optimisation"),
    "lr_schedule": ("decay after the warmup", "optimisation", dict(choices=["constant", "linear", "cosine"])),
    "warmup_steps": ("linear warmup, in optimizer steps", "optimisation"),
    "adam_betas": ("AdamW betas", "optimisation"),
    "weight_decay": ("AdamW weight decay", "optimisation"),
    "max_grad_norm": ("gradient clipping norm", "optimisation"),
    "seed": ("seed of everything random: init (tiny), data order, noise, rollouts", "optimisation"),
    "out_dir": ("metrics.jsonl, checkpoint/ and the final export go here", "run and checkpoints"),
    "save_every": ("write a resumable checkpoint every N optimizer steps (0 = never)", "run and checkpoints"),
    "save_minutes": ("also write one every N minutes of wall-clock (0 = never); SIGINT and SIGTERM always write one "
                     "before the run exits", "run and checkpoints"),
    "resume": ("continue the run in OUT_DIR from its checkpoint, with the same settings (a launch into a directory "
               "that holds a run must say --resume or --overwrite)", "run and checkpoints"),
    "overwrite": ("delete the run in OUT_DIR (metrics, checkpoint, export) and start over", "run and checkpoints"),
    "time_budget": ("a wall-clock budget in minutes (0 = none): the run ends after the first optimizer step "
                    "(diffu-GRPO: rollout batch) at which it has trained this long (rank 0's clock; a resumed run "
                    "counts its earlier time) and exports as at --max-steps; for comparisons at equal time",
                    "run and checkpoints"),
    "halt_after": ("stop after this optimizer step as if interrupted (checkpoint, no export); continue with "
                   "--resume", "run and checkpoints", dict(type=int)),
    "export": ("how OUT_DIR/final is written for a LoRA run. exact: base weights + adapter.safetensors, loaded back "
               "as the trained policy; merged: W + BA folded in fp32 under the official keys (2x the size of bf16)",
               "run and checkpoints", dict(choices=["exact", "merged"])),
    "no_export": ("skip the final export", "run and checkpoints"),
}


def shared(name, default):
    """option() for a knob described in SHARED."""
    help, group, *kw = SHARED[name]
    return option(default, help, group, **(kw[0] if kw else {}))


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    """The fields sft.py's and diffu_grpo.py's configs share, with the same default in both; each trainer's config
    (SFTConfig, GRPOConfig) adds its own."""
    model: str = shared("model", M.LLADA_HUB_ID)
    preset: str = shared("preset", "auto")
    adapter: str = shared("adapter", None)
    dtype: str = shared("dtype", "auto")
    device: str = shared("device", "auto")
    grad_ckpt: bool = shared("grad_ckpt", False)
    force: bool = shared("force", False)
    data_path: str = shared("data_path", None)
    prompt_style: str = shared("prompt_style", "d1")
    train_n: int = shared("train_n", None)
    save_every: int = shared("save_every", 0)
    save_minutes: float = shared("save_minutes", 30.0)
    resume: bool = shared("resume", False)
    overwrite: bool = shared("overwrite", False)
    halt_after: int = shared("halt_after", None)
    time_budget: float = shared("time_budget", 0.0)
    export: str = shared("export", "exact")
    no_export: bool = shared("no_export", False)


def require(ok, message):
    """A config check: a ValueError here becomes a usage error (parse_config)."""
    if not ok:
        raise ValueError(message)


def check_trainer(c):
    """The checks both trainers' configs share: every count positive, every rate in its range."""
    for name in ("lr", "max_grad_norm", "lora_alpha"):
        require(getattr(c, name) > 0, f"--{name.replace('_', '-')} must be > 0, not {getattr(c, name)}")
    for name in ("warmup_steps", "weight_decay", "lora_r", "save_every", "save_minutes", "time_budget"):
        require(getattr(c, name) >= 0, f"--{name.replace('_', '-')} must be >= 0, not {getattr(c, name)}")
    for name in ("train_n", "halt_after", "max_steps", "micro_batch_size"):
        v = getattr(c, name)
        require(v is None or v > 0, f"--{name.replace('_', '-')} must be > 0, not {v}")
    require(all(0 <= b < 1 for b in c.adam_betas), f"--adam-betas must be in [0, 1), not {c.adam_betas}")
    require(0 <= c.lora_dropout < 1, f"--lora-dropout must be in [0, 1), not {c.lora_dropout}")
    lo, hi = c.blanks
    require(1 <= lo <= hi <= 12, f"--blanks {lo} {hi}: need 1 <= MIN <= MAX <= 12 (a 4x4 puzzle with a unique "
                                 f"solution keeps at least 4 givens)")


def _show(v):
    return " ".join(map(str, v)) if isinstance(v, tuple) else str(v)


def build_parser(cls, description, presets):
    """An argparse parser generated from a config dataclass: one flag per field, in GROUPS, each help line ending
    with its default and, where a preset changes it, the preset's value. Flags the user does not give are absent
    from the parsed namespace (SUPPRESS), so parse_config can tell typed values from defaults."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 argument_default=argparse.SUPPRESS, usage="%(prog)s [FLAGS] (every flag: --help)")
    groups = {g: ap.add_argument_group(g) for g in GROUPS}
    for f in dataclasses.fields(cls):
        kw, d = dict(f.metadata["kw"]), f.default
        names = ["--" + f.name.replace("_", "-")] + list(kw.pop("aliases", ()))
        if isinstance(d, bool):
            kw["action"] = argparse.BooleanOptionalAction if d or any(f.name in p for p in presets.values()) \
                else "store_true"
        elif isinstance(d, tuple):
            kw.update(nargs=len(d), type=type(d[0]))
        elif d is not None:
            kw.setdefault("type", type(d))
        note = [f"default: {_show(d)}"] if d is not None and not isinstance(d, bool) or d is True else []
        note += [f"{name}: {_show(p[f.name])}" for name, p in presets.items() if f.name in p and p[f.name] != d]
        help = f.metadata["help"] + (f" ({'; '.join(note)})" if note else "")
        groups[f.metadata["group"]].add_argument(*names, dest=f.name, help=help.replace("%", "%%"), **kw)
    for g in groups.values():  # no empty headings
        if not g._group_actions:
            ap._action_groups.remove(g)
    return ap


def parse_config(cls, argv, description, presets, choose):
    """(config, names of the presets applied). choose(typed) -> preset names, given the flags the user typed;
    the presets' values go under the typed ones, the dataclass defaults under both. A config check that fails
    (the class's check(typed), which returns the config, completed where a default must adapt to a typed value)
    is a usage error: one line and exit status 2, like argparse's own."""
    ap = build_parser(cls, description, presets)
    typed = vars(ap.parse_args(argv))
    names = choose(typed)
    values = {}
    for name in names:
        values.update(presets[name])
    values.update(typed)
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    cfg = cls(**values)
    try:
        cfg = cfg.check(typed)
    except ValueError as e:
        ap.error(str(e))
    return cfg, names


def model_scale(name, preset="auto"):
    """'tiny' or 'd1': which recipe --model calls for. An export remembers the preset it was trained under
    (meta.json), so the SFT model of a tiny run gets the tiny RL recipe."""
    if preset != "auto":
        return preset
    if name == "tiny":
        return "tiny"
    meta = os.path.join(name, "meta.json")
    if os.path.isfile(meta):
        with open(meta) as f:
            return "tiny" if json.load(f).get("args", {}).get("preset") == "tiny" else "d1"
    return "d1"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help of the scripts with hand-written parsers (sample.py, eval.py, bench.py): the description as written,
    and each flag's default once, unless its help already says it or there is none (None, a switch)."""

    def _get_help_string(self, action):
        h, d = action.help or "", action.default
        if "default:" in h or d is None or d is False or d == argparse.SUPPRESS or not action.option_strings:
            return h
        return h + f" (default: {' '.join(map(str, d)) if isinstance(d, (list, tuple)) else d})"


def add_model_args(ap, default_model="tiny"):
    """The model flags of the scripts that do not train (sample.py, eval.py), with the same meaning as the
    trainers'."""
    g = ap.add_argument_group("model")
    for name, default in (("model", default_model), ("dtype", "auto"), ("device", "auto"), ("adapter", None)):
        help, _, *kw = SHARED[name]
        g.add_argument("--" + name, default=default, help=help + ("" if default is None else f" (default: {default})"),
                       **(kw[0] if kw else {}))


# -----------------------------------------------------------------------------
# Model, device and dtype


def lora_targets(spec):
    """--lora-targets: 'd1', 'wide' or a comma-separated list of module names -> a tuple of names."""
    return {"d1": M.LORA_TARGETS, "wide": M.LORA_TARGETS_WIDE}.get(spec) or tuple(spec.split(","))


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
    """With --resume and a checkpoint (prepare_run_dir has checked it), restore OUT_DIR/checkpoint into the model
    and optimizer; returns its meta, or None."""
    path = os.path.join(args.out_dir, "checkpoint")
    if not args.resume or not os.path.isdir(path):
        return None
    meta = load_checkpoint(path, model, opt, sched)
    print0(f"resumed from {path} at step {meta['step']}")
    return meta


# -----------------------------------------------------------------------------
# Run directories: what a launch may do with OUT_DIR

RUN_FILES = ("metrics.jsonl", "checkpoint", "checkpoint.old", "final", "final.old")
# Settings that do not change what a run computes: they may differ between a run and its --resume.
NOT_MATH = {"out_dir", "resume", "overwrite", "halt_after", "time_budget", "save_every", "save_minutes",
            "sample_every", "force", "export", "no_export"}


def prepare_run_dir(cfg):
    """Called before any model or data is loaded. A launch into an OUT_DIR that holds a run must say what to do:
    --resume continues it (exactly, or not at all: the checkpoint's settings must equal these), --overwrite
    clears it. Returns nothing; raises a UsageError that says what is there and which flag to pass."""
    out, ckpt, final = cfg.out_dir, os.path.join(cfg.out_dir, "checkpoint"), os.path.join(cfg.out_dir, "final")
    if cfg.resume and cfg.overwrite:
        raise M.UsageError("--resume continues the run in --out-dir and --overwrite deletes it: pass one of them")
    if is_main():
        recover(ckpt)
        recover(final)
    barrier()
    held = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
    if held and not (cfg.resume or cfg.overwrite):
        what = ("a finished run (final/)" if os.path.isdir(final) else
                f"an unfinished run (checkpoint at step {read_meta(ckpt)['step']})" if os.path.isdir(ckpt) else
                "a run that stopped before its first checkpoint (metrics.jsonl)")
        raise M.UsageError(f"{out} holds {what}: pass --resume to continue it, --overwrite to start over, or "
                           f"another --out-dir")
    if cfg.overwrite and held and is_main():
        for f in held:
            p = os.path.join(out, f)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
        print0(f"--overwrite: removed {', '.join(held)} from {out}")
    if cfg.resume:
        _check_resume(cfg, ckpt, final)
    barrier()


def _check_resume(cfg, ckpt, final):
    """--resume: the checkpoint's settings must equal this launch's (NOT_MATH aside), else stop with the list.
    metrics.jsonl is cut back to the checkpoint's step, so that every step is logged once."""
    if os.path.isdir(final):  # the export is the last thing a run writes
        print0(f"{cfg.out_dir}: the run is finished (final/ is written); nothing to resume")
        raise SystemExit(0)
    if not os.path.isdir(ckpt):
        print0(f"--resume: no checkpoint in {cfg.out_dir} yet; starting from step 0")
        step = 0
    else:
        meta = read_meta(ckpt)
        was, now = meta.get("args", {}), config_dict(cfg)
        diff = [f"--{k.replace('_', '-')} {was[k]} (checkpoint) vs {now[k]} (now)" for k in sorted(now)
                if k in was and k not in NOT_MATH and was[k] != now[k]]
        if diff:
            raise M.UsageError(f"--resume: {ckpt} was written with other settings, so resuming would not continue "
                               f"that run: {'; '.join(diff)}. Relaunch with its settings, or --overwrite")
        step = meta["step"]
    log = os.path.join(cfg.out_dir, "metrics.jsonl")
    if is_main() and os.path.exists(log):
        keep = []
        for line in open(log):
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError):  # a line cut by a crash mid-write
                pass
        with open(log + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(log + ".tmp", log)


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


def compute_cleanup(exit_code=0):
    """The end of a distributed run: every rank waits at a barrier, so all work (the export included) is done.
    A script run from the command line then ends its process at once with os._exit(exit_code): on CPU a gloo worker has,
    rarely and only at interpreter teardown after a finished run, aborted in C++ with "terminate called without an
    active exception", failing a run whose results were all written. Called from Python (tests), it destroys the
    process group instead and returns."""
    if dist.is_initialized():
        dist.barrier()
        if EXIT_AFTER_CLEANUP:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(exit_code)
        dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


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
    """Write a directory (a checkpoint, the export) into FINAL.tmp, flush it to disk, then rename it into place.
    A crash at any instant leaves a complete FINAL, or (between the two renames) a complete FINAL.old that
    recover() puts back; never a half-written FINAL. fsync before the rename makes it survive a power cut too."""
    final = final.rstrip("/")
    tmp, old = final + ".tmp", final + ".old"
    recover(final)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    yield tmp
    crash_point("write")  # (tests: a kill with FINAL.tmp written but not yet flushed or renamed)
    _fsync_tree(tmp)
    if os.path.exists(final):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        crash_point("swap")  # (tests: a kill with only FINAL.old and FINAL.tmp on disk)
    os.replace(tmp, final)
    _fsync(os.path.dirname(os.path.abspath(final)))
    shutil.rmtree(old, ignore_errors=True)


def recover(path):
    """Undo the one instant of atomic_dir with no PATH on disk: a complete PATH.old is put back."""
    if not os.path.exists(path) and os.path.isdir(path + ".old"):
        os.replace(path + ".old", path)


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path):
    for root, _, files in os.walk(path):
        for name in files:
            _fsync(os.path.join(root, name))
        _fsync(root)


_CRASHES = {}


def crash_point(name):
    """For the crash-safety tests only: with D1_CRASH_AT=NAME:K in the environment, the K-th time the program
    passes point NAME ('write' or 'swap' inside atomic_dir, 'step' after a step is logged) it kills itself with
    SIGKILL, as a power cut or the OOM killer would. Without the variable it does nothing."""
    want = os.environ.get("D1_CRASH_AT")
    if want and want.split(":")[0] == name:
        _CRASHES[name] = _CRASHES.get(name, 0) + 1
        if _CRASHES[name] == int(want.split(":")[1]) and is_main():
            os.kill(os.getpid(), signal.SIGKILL)


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
    """Restore what save_checkpoint wrote into an already built model/optimizer/scheduler; returns meta. A file
    that cannot be read is named in the error."""
    if M.has_lora(model):
        M.load_lora(model, path)
    else:
        sd = {}
        for shard in M._checkpoint_shards(path):
            sd.update(M.read_safetensors(os.path.join(path, shard)))
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in sd.items()})
    state = read_torch(os.path.join(path, "trainer_state.pt"))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return read_meta(path)


def read_torch(path):
    """torch.load of a file this project wrote; a truncated or foreign file is a UsageError that names it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise M.UsageError(f"{path}: cannot be read ({type(e).__name__}: {str(e)[:120]}); the file is truncated or "
                           f"not a checkpoint of this project") from None


def read_meta(path):
    """DIR/meta.json as a dict, or a UsageError naming it."""
    f = os.path.join(path, "meta.json")
    try:
        with open(f) as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise M.UsageError(f"{f}: cannot be read ({e})") from None


def export_model(path, model, tokenizer, meta=None, mode="exact", base=None):
    """The final model in the official layout. The contract: `--model PATH` loads the policy that was trained.
    mode 'exact' keeps any LoRA adapter beside the base weights (model.load_model applies it); 'merged' folds it in
    fp32 (model.save_model; refused if the cast would lose more than 1% of the update). A LoRA run also writes
    PATH/peft/, the whole update as one PEFT LoRA adapter over `base` (model.save_peft). Prints how much of the
    update a merge into the base dtype would keep, so the cost of a bf16 merge is never a surprise."""
    if not is_main():
        return
    if M.has_lora(model):
        base_dtype = next(m.weight.dtype for m in model.modules() if isinstance(m, M.LoRALinear))
        kept = 100 * M.merge_survival(model, base_dtype)
        print0(f"export ({mode}): a merge into {base_dtype} would keep {kept:.1f}% "
               f"of the LoRA update (the exported model keeps 100%)")
    with atomic_dir(path) as tmp:
        M.save_model(model, tmp, tokenizer, merge=mode == "merged")
        if M.has_lora(model):
            M.save_peft(model, os.path.join(tmp, "peft"), base or M.LLADA_HUB_ID)
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


# -----------------------------------------------------------------------------
# The run: everything around a training loop that is not the algorithm


class BestWeights:
    """--keep-best and --patience: the best validation score so far (lower is better), its step, evaluations since
    it improved, and (with keep) a CPU copy of the trainable weights of that evaluation. Saved in checkpoints, so it
    survives --resume."""

    def __init__(self, params, keep, patience, record=None, state=None):
        self.params, self.keep, self.patience = params, keep, patience
        self.record = record or {"loss": float("inf"), "step": 0, "bad": 0}
        self.state = state

    def update(self, step, loss):
        """Record an evaluation; True when training should stop (--patience evaluations without improvement)."""
        if loss < self.record["loss"]:
            self.record = {"loss": loss, "step": step, "bad": 0}
            self.state = [p.detach().to("cpu", copy=True) for p in self.params] if self.keep else None
        else:
            self.record["bad"] += 1
        return bool(self.patience) and self.record["bad"] >= self.patience

    @torch.no_grad()
    def restore(self):
        for p, b in zip(self.params, self.state):
            p.copy_(b)


class Run:
    """The harness of sft.py and diffu_grpo.py: resume, the metrics log, the progress bar, resumable checkpoints,
    --halt-after, keep-best with early stopping, and the final export. Its unit is the optimizer step in both
    trainers; diffu-GRPO advances `stride` = mu steps per rollout batch.

        run = Run(cfg, model, tok, opt, sched, params, total_steps, "sft")
        for step in run.steps():          # the optimizer step count after this iteration
            metrics = ...                 # the algorithm
            if run.end_step(step, metrics):
                break
        run.finish()

    Checkpoints (OUT_DIR/checkpoint, atomic) are written every --save-every steps, every --save-minutes of
    wall-clock (rank 0's clock decides, so all ranks agree), at --halt-after, and when SIGINT or SIGTERM (what a
    cluster scheduler sends before preemption) arrives: the current step finishes, a checkpoint is written, and the
    run exits with 128 + the signal's number (common.Interrupted), on every rank together.
    """

    def __init__(self, cfg, model, tok, opt, sched, params, total_steps, desc, stride=1, keep_best=False,
                 patience=0, score="validation loss", maximize=False):
        self.cfg, self.model, self.tok, self.opt, self.sched = cfg, model, tok, opt, sched
        self.total, self.desc, self.stride = total_steps, desc, stride
        self.ckpt_dir = os.path.join(cfg.out_dir, "checkpoint")
        meta = maybe_resume(cfg, model, opt, sched)
        self.start = meta["step"] if meta else 0
        extra = os.path.join(self.ckpt_dir, "extra.pt")
        state = read_torch(extra)["best_state"] if meta and os.path.exists(extra) else None
        self.best = BestWeights(params, keep_best, patience, meta and meta.get("early_stop"), state)
        self.log = JsonlLog(os.path.join(cfg.out_dir, "metrics.jsonl"))
        self.params, self.halted, self.stop_early, self.bar = params, False, False, None
        self.signal, self.last_save = 0, time.monotonic()
        self.clock0 = time.monotonic() - (meta.get("train_seconds", 0.0) if meta else 0.0)  # --time-budget's clock
        self.score, self.sign, self.evaluations = score, -1 if maximize else 1, 0

    def steps(self):
        """The optimizer step count after each iteration, from the resumed step on; SIGINT and SIGTERM are caught
        meanwhile (a second one acts at once)."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        self.bar = tqdm(total=self.total, initial=self.start, disable=not is_main(), desc=self.desc,
                        dynamic_ncols=True)
        try:
            for step in range(self.start + self.stride, self.total + 1, self.stride):
                yield step
                self.bar.update(self.stride)
        finally:
            self.bar.close()
            for s, h in previous.items():
                signal.signal(s, h)

    def _on_signal(self, signum, frame):
        self.signal = signum
        signal.signal(signum, signal.SIG_DFL)  # a second one is not caught
        print(f"\n{signal.Signals(signum).name}: finishing this step, then a checkpoint", file=sys.stderr, flush=True)

    def _agree(self, *flags):
        """The flags of all ranks combined (max), so that every rank saves and stops at the same step."""
        if not dist.is_initialized():
            return flags
        t = torch.tensor(flags, dtype=torch.float64, device=self.params[0].device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return tuple(int(v) for v in t.tolist())

    def save(self, step, metrics):
        best = {"best_state": self.best.state} if self.best.state is not None else None
        save_checkpoint(self.ckpt_dir, self.model, self.tok, self.opt, self.sched,
                        {"step": step, "args": config_dict(self.cfg), "early_stop": self.best.record,
                         "train_seconds": time.monotonic() - self.clock0, **metrics},
                        extra=best)
        self.last_save = time.monotonic()

    def every(self, step, n):
        """True at the first step at or after each multiple of n (n = 0: never): with stride mu, a rollout batch
        that crosses a multiple of n counts as reaching it."""
        return bool(n) and step // n > (step - self.stride) // n

    def evaluated(self, step, value):
        """A validation score for keep-best and early stopping (a tie keeps the earlier step)."""
        self.evaluations += 1
        self.stop_early = self.best.update(step, self.sign * value)

    def end_step(self, step, metrics, shown=None, lines=()):
        """Log, print, checkpoint; True when the loop must stop (early stopping or --halt-after)."""
        self.log.write(step=step, **metrics)
        self.last_step = step
        if is_main():
            self.bar.write(fmt_metrics(step, metrics if shown is None else
                                       {k: v for k, v in metrics.items() if k in shown}))
            for line in lines:
                self.bar.write(line)
        crash_point("step")
        halt = self.cfg.halt_after is not None and step >= self.cfg.halt_after and step < self.total
        late = is_main() and self.cfg.save_minutes and time.monotonic() - self.last_save >= 60 * self.cfg.save_minutes
        spent = is_main() and self.cfg.time_budget and time.monotonic() - self.clock0 >= 60 * self.cfg.time_budget
        signum, late, spent = self._agree(self.signal, late, spent)
        if signum or halt or late or self.every(step, self.cfg.save_every):
            self.save(step, metrics)
        if signum:
            print0(f"interrupted ({signal.Signals(signum).name}) after step {step}: checkpoint written to "
                   f"{self.ckpt_dir}. Continue with the same command and --resume")
            compute_cleanup(exit_code=128 + signum)
            raise Interrupted(signum)
        if self.stop_early:
            print0(f"early stop at step {step}: the {self.score} has not improved for {self.best.patience} "
                   f"evaluations; best {self.sign * self.best.record['loss']:.4f} at step {self.best.record['step']}")
            return True
        if halt:
            print0(f"halting after step {step} (--halt-after): checkpoint written; continue with --resume")
            self.halted = True
            return True
        if spent and step < self.total:
            print0(f"time budget of {self.cfg.time_budget:g} minutes spent after step {step} (--time-budget)")
            return True
        return False

    def finish(self, metrics=None, meta=None):
        """Restore the kept weights, export OUT_DIR/final (not after a halt), end the distributed run. Returns the
        metrics, with best_step and best_eval_loss when weights were kept."""
        metrics = dict(metrics or {})
        world = dist.get_world_size() if dist.is_initialized() else 1
        print0(f"ranks in sync: {assert_ranks_in_sync(self.params, world)}")
        if self.best.state is not None and not self.halted:
            self.best.restore()
            best = self.sign * self.best.record["loss"]
            print0(f"kept the weights of step {self.best.record['step']}: the best {self.score}, {best:.4f}, of "
                   f"{self.evaluations} evaluations (a tie keeps the earlier step); the last step's weights are not "
                   f"exported")
            key = "best_eval_loss" if self.sign > 0 else "best_eval_accuracy"
            metrics.update(best_step=self.best.record["step"], **{key: best})
        if not self.cfg.no_export and not self.halted:
            path = os.path.join(self.cfg.out_dir, "final")
            metrics.update(train_seconds=time.monotonic() - self.clock0, last_step=getattr(self, "last_step", None))
            export_model(path, self.model, self.tok, {"args": config_dict(self.cfg), **(meta or {}), **metrics},
                         self.cfg.export, base=base_model_of(self.cfg.model))
            print0(f"exported ({self.cfg.export}) to {path}")
        compute_cleanup()
        return metrics


def base_model_of(name):
    """The official base model under `name`: an export of this project names the model its run started from (its
    meta.json), a PEFT folder its base_model_name_or_path; followed back to a hub id, a plain directory or 'tiny'."""
    for _ in range(16):
        meta = os.path.join(name, "meta.json")
        nxt = M.peft_base(name) or (json.load(open(meta)).get("args", {}).get("model")
                                    if os.path.isfile(meta) else None)
        if not nxt or nxt == name:
            return name
        name = nxt
    return name


def config_dict(cfg):
    """The config as JSON-ready values, for meta.json."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


class Interrupted(Exception):
    """A run stopped by SIGINT or SIGTERM after writing its checkpoint; common.cli exits with 128 + signum."""

    def __init__(self, signum):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def cli(main):
    """Run a script's main() from the command line. A UsageError (a mistake in what was asked for) is one line on
    stderr and exit status 2, as argparse's own errors are; an interrupted run exits with 128 + the signal's number
    and no traceback; any other exception is a program error and keeps its traceback."""
    global EXIT_AFTER_CLEANUP
    EXIT_AFTER_CLEANUP = True  # see compute_cleanup
    try:
        main()
    except M.UsageError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr, flush=True)
        os._exit(2)  # no teardown: under torchrun another rank may be waiting in a collective
    except Interrupted as e:
        sys.stdout.flush()
        os._exit(128 + e.signum)
    except KeyboardInterrupt:  # before the training loop (loading) or after it: nothing to checkpoint
        print(f"\n{os.path.basename(sys.argv[0])}: interrupted (outside the training loop, nothing to save)",
              file=sys.stderr, flush=True)
        os._exit(130)


_WARNED = set()


def warn_once(key, message):
    """Print a warning the first time `key` is seen in this process."""
    if key not in _WARNED:
        _WARNED.add(key)
        print(f"warning: {message}", flush=True)

