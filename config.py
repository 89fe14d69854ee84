"""
The recipe as a command line: each trainer's config is a frozen dataclass whose defaults are d1's values, every field
is also a flag (option), and presets (the tiny laptop recipe, d1's per-task values) fill the flags a user does not
type. So the class IS the --help, and a flag typed on the command line always wins over a preset.

    cfg, presets = parse_config(SFTConfig, argv, description, PRESETS, choose_presets)    # (sft.py, diffu_grpo.py)
"""

import argparse
import dataclasses
import json
import os
import sys

import model as M


# -----------------------------------------------------------------------------
# Fields that are flags


GROUPS = ("model", "data", "d1's algorithm", "beyond d1 (methods.py)", "sampling (rollouts)", "optimisation",
          "run and checkpoints", "debugging probes")


def option(default, help, group, **argparse_kw):
    """A config field that is also a flag: its d1 default, its --help text and its group in --help. argparse_kw:
    type (needed when the default is None), choices, nargs, metavar, aliases (other flag names)."""
    assert group in GROUPS, group
    return dataclasses.field(default=default, metadata=dict(help=help, group=group, kw=argparse_kw))


# The knobs both trainers have, described once: option(default, *SHARED[name]) in each config class.
SHARED = {
    "model": ("'tiny' (a random CPU-sized LLaDA, character tokenizer), 'tiny-dream' (the same, Dream's variant), a "
              "local checkpoint directory in the official layout of LLaDA or Dream (an export of sft.py or "
              "diffu_grpo.py included), or a hub id", "model"),
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
    "fsdp": ("shard the weights, gradients and optimizer state over the torchrun ranks with FSDP2 (parallel.py): "
             "full fine-tuning of LLaDA-8B fits a node; checkpoints are sharded (torch.distributed.checkpoint) and "
             "resume on any number of ranks. Without it, several ranks each hold the whole model (DDP)", "model"),
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
    "log_every": ("print the metrics line every N optimizer steps, and the last (default: about 20 lines a run); "
                  "every step goes to OUT_DIR/metrics.jsonl whatever N is", "run and checkpoints", dict(type=int)),
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
    "skip_nonfinite": ("skip an optimizer step whose loss or gradient is not finite, and count it "
                       "(nonfinite_skipped in the log); by default such a step stops the run (exit status 3) before "
                       "any weight moves, keeping the last checkpoint and exporting nothing", "optimisation"),
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
    fsdp: bool = shared("fsdp", False)
    force: bool = shared("force", False)
    data_path: str = shared("data_path", None)
    prompt_style: str = shared("prompt_style", "d1")
    train_n: int = shared("train_n", None)
    log_every: int = shared("log_every", None)
    save_every: int = shared("save_every", 0)
    save_minutes: float = shared("save_minutes", 30.0)
    resume: bool = shared("resume", False)
    overwrite: bool = shared("overwrite", False)
    halt_after: int = shared("halt_after", None)
    skip_nonfinite: bool = shared("skip_nonfinite", False)
    time_budget: float = shared("time_budget", 0.0)
    export: str = shared("export", "exact")
    no_export: bool = shared("no_export", False)


# -----------------------------------------------------------------------------
# Checks: a value typed is used or refused, never replaced


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
    for name in ("train_n", "halt_after", "max_steps", "micro_batch_size", "log_every"):
        v = getattr(c, name)
        require(v is None or v > 0, f"--{name.replace('_', '-')} must be > 0, not {v}")
    require(all(0 <= b < 1 for b in c.adam_betas), f"--adam-betas must be in [0, 1), not {c.adam_betas}")
    require(0 <= c.lora_dropout < 1, f"--lora-dropout must be in [0, 1), not {c.lora_dropout}")
    lo, hi = c.blanks
    require(1 <= lo <= hi <= 12, f"--blanks {lo} {hi}: need 1 <= MIN <= MAX <= 12 (a 4x4 puzzle with a unique "
                                 f"solution keeps at least 4 givens)")


# -----------------------------------------------------------------------------
# Parsing: a parser generated from the class, presets under the typed flags


def _show(v):
    return " ".join(map(str, v)) if isinstance(v, tuple) else str(v)


def build_parser(cls, description, presets):
    """An argparse parser generated from a config dataclass: one flag per field, in GROUPS, each help line ending
    with its default and, where a preset changes it, the preset's value. Flags the user does not give are absent
    from the parsed namespace (SUPPRESS), so parse_config can tell typed values from defaults."""
    ap = Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
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


def config_dict(cfg):
    """The config as JSON-ready values, for meta.json."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def model_scale(name, preset="auto"):
    """'tiny' or 'd1': which recipe --model calls for. An export remembers the preset it was trained under
    (meta.json), so the SFT model of a tiny run gets the tiny RL recipe."""
    if preset != "auto":
        return preset
    if name in ("tiny", "tiny-dream"):
        return "tiny"
    meta = os.path.join(name, "meta.json")
    if os.path.isfile(meta):
        with open(meta) as f:
            return "tiny" if json.load(f).get("args", {}).get("preset") == "tiny" else "d1"
    return "d1"


# -----------------------------------------------------------------------------
# The scripts that do not train (sample.py, eval.py, bench.py): hand-written parsers, the same model flags


class Parser(argparse.ArgumentParser):
    """argparse for every script, with a usage error in one line (`prog: error: what (every flag: --help)`) and
    exit status 2, printed by rank 0 alone under torchrun."""

    def error(self, message):
        if os.environ.get("RANK", "0") == "0":
            print(f"{self.prog}: error: {message} (every flag: --help)", file=sys.stderr, flush=True)
        sys.exit(2)


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
