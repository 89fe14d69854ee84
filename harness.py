"""
The run around a training loop, everything that is not the algorithm: resume, resumable checkpoints, the metrics
log, the progress bar and the console, when a run saves and when it stops, and the final export. sft.py and
diffu_grpo.py use it the same way (Run's docstring shows how), so neither trainer holds any of this. The out-dir it
writes into (claimed for one live run, written atomically) is rundir.py.
"""

import json
import os
import shlex
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import model as M
import parallel as P
import weights as W
from common import Interrupted, barrier, check_finite, compute_cleanup, is_main, print0
from config import config_dict
from rundir import atomic_dir, command_line, crash_point, read_meta, release_out_dir


# -----------------------------------------------------------------------------
# 1. Resume, checkpoints and the export


def maybe_resume(args, tr, with_best):
    """With --resume and a checkpoint (prepare_run_dir has checked it), restore OUT_DIR/checkpoint into the Trainer's
    model, optimizer and schedule; returns (its meta, the kept best weights or None), or (None, None)."""
    path = os.path.join(args.out_dir, "checkpoint")
    if not args.resume or not os.path.isdir(path):
        return None, None
    meta, best = load_checkpoint(path, tr, with_best)
    print0(f"resumed from {path} at step {meta['step']}")
    return meta, best


def save_checkpoint(path, tr, tokenizer, meta, best=None, sharded=False):
    """A resumable checkpoint of the Trainer tr, written atomically: the trainable weights, optimizer and schedule
    state, meta.json (args, step, metrics) and, if given, `best` (--keep-best's kept weights, a list like
    tr.params). Plain: rank 0 writes the weights in the official layout (a LoRA run: the adapter alone),
    trainer_state.pt and extra.pt. sharded (--fsdp): every rank writes its shards with torch.distributed.checkpoint
    (parallel.save_sharded), which any number of ranks can resume from. Weights that are not finite are never
    written (common.Diverged), on every rank alike."""
    check_finite(tr.model, f"the checkpoint {path}")
    if not sharded and not is_main():
        return
    with atomic_dir(path, collective=sharded) as tmp:
        if sharded:
            P.save_sharded(tmp, tr.model, tr.opt, tr.params, best)
        elif M.has_lora(tr.model):
            W.save_lora(tr.model, tmp)
        else:
            W.save_model(tr.model, tmp, tokenizer)
        if is_main():
            torch.save({"scheduler": tr.sched.state_dict(), **({} if sharded else {"optimizer": tr.opt.state_dict()})},
                       os.path.join(tmp, "trainer_state.pt"))
            if best is not None and not sharded:
                torch.save({"best_state": best}, os.path.join(tmp, "extra.pt"))
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump({**meta, "kept_best": best is not None}, f, indent=2, default=str)


def load_checkpoint(path, tr, with_best=True):
    """Restore what save_checkpoint wrote into the Trainer's already built (and distributed) model, optimizer and
    schedule; returns (meta, kept best weights or None). A file that cannot be read is named in the error."""
    meta = read_meta(path)
    best = None
    if P.is_dcp(path):
        best = P.load_sharded(path, tr.model, tr.opt, tr.params, with_best and meta.get("kept_best", False))
    else:
        if M.has_lora(tr.model):
            W.load_lora(tr.model, path)
        else:
            ours = tr.model.state_dict()
            sd = {k: v.to(ours[k].dtype) for part in W.read_shards(path, tr.model.cfg.arch) for k, v in part.items()}
            tr.model.load_state_dict(sd)
        extra = os.path.join(path, "extra.pt")
        best = read_torch(extra)["best_state"] if with_best and os.path.exists(extra) else None
    state = read_torch(os.path.join(path, "trainer_state.pt"))
    if "optimizer" in state:
        tr.opt.load_state_dict(state["optimizer"])
    tr.sched.load_state_dict(state["scheduler"])
    return meta, best


def read_torch(path):
    """torch.load of a file this project wrote; a truncated or foreign file is a UsageError that names it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise M.UsageError(f"{path}: cannot be read ({type(e).__name__}: {str(e)[:120]}); the file is truncated or "
                           f"not a checkpoint of this project") from None


def export_model(path, model, tokenizer, meta=None, mode="exact", base=None):
    """The final model in the official layout. The contract: `--model PATH` loads the policy that was trained.
    mode 'exact' keeps any LoRA adapter beside the base weights (weights.load_model applies it); 'merged' folds it in
    fp32 (weights.save_model; refused if the cast would lose more than 1% of the update). A LoRA run also writes
    PATH/peft/, the whole update as one PEFT LoRA adapter over `base` (weights.save_peft). Prints how much of the
    update a merge into the base dtype would keep, so the cost of a bf16 merge is never a surprise. Weights that
    are not finite are never exported (common.Diverged). A sharded model (--fsdp) is gathered onto rank 0's CPU
    first (parallel.full_model): every rank calls this."""
    check_finite(model, f"the export {path}")
    model = P.full_model(model)
    if not is_main():
        return
    if mode == "merged" and not M.has_lora(model):
        print0("--export merged: this run trained every weight (no LoRA adapter), so there is nothing to merge; the "
               "weights are written as they are")
    if M.has_lora(model):
        base_dtype = next(m.weight.dtype for m in model.modules() if isinstance(m, M.LoRALinear))
        kept = 100 * M.merge_survival(model, base_dtype)
        print0(f"export ({mode}): a merge into {base_dtype} would keep {kept:.1f}% "
               f"of the LoRA update (the exported model keeps 100%)")
    with atomic_dir(path) as tmp:
        W.save_model(model, tmp, tokenizer, merge=mode == "merged")
        if M.has_lora(model):
            W.save_peft(model, os.path.join(tmp, "peft"), base or M.LLADA_HUB_ID)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({**(meta or {}), "export": mode}, f, indent=2, default=str)


def base_model_of(name):
    """The model a LoRA run's PEFT adapter applies to, from the run's --model. A hub id, a plain directory or 'tiny'
    is itself; so is an export that holds its own full weights (full fine-tuning, or merged). A PEFT folder names its
    base, and an exact LoRA export (base weights + adapter.safetensors) stacks its adapter into the new one, so the
    base is the model its run started from (its meta.json): both are followed back."""
    for _ in range(16):
        nxt = W.peft_base(name)
        if nxt is None:
            meta = os.path.join(name, "meta.json")
            if not (os.path.isfile(meta) and os.path.exists(os.path.join(name, W.ADAPTER_FILE))):
                return name
            with open(meta) as f:
                nxt = json.load(f).get("args", {}).get("model")
        if not nxt or nxt == name:
            return name
        name = nxt
    return name


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
# 2. The metrics log


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


# -----------------------------------------------------------------------------
# 3. The run


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
            # A sharded weight (--fsdp) keeps its shard where it is: 1/world of it, and a DTensor DCP can save.
            self.state = [p.detach().clone() if isinstance(p, DTensor) else p.detach().to("cpu", copy=True)
                          for p in self.params] if self.keep else None
        else:
            self.record["bad"] += 1
        return bool(self.patience) and self.record["bad"] >= self.patience

    @torch.no_grad()
    def restore(self):
        for p, b in zip(self.params, self.state):
            p.copy_(b)


class Run:
    """The run around sft.py's and diffu_grpo.py's loops. Its unit is the optimizer step in both trainers;
    diffu-GRPO advances `stride` = mu steps per rollout batch.

        run = Run(cfg, trainer, tok, total_steps, "sft")
        for step in run.steps():          # the optimizer step count after this iteration
            metrics = ...                 # the algorithm
            if run.end_step(step, metrics):
                break
        run.finish()

    After each step, end_step logs it to metrics.jsonl, prints it every --log-every steps (and the last), writes a
    checkpoint (OUT_DIR/checkpoint, atomic) when one is due (every --save-every steps, every --save-minutes of
    rank 0's clock, at --halt-after, on a signal), and decides whether the loop ends. A run ends one of five ways:
      finished      the last step: finish() exports OUT_DIR/final
      time budget   --time-budget minutes spent (rank 0's clock): exported as if finished
      early stop    --patience validations without improvement: the kept best weights are exported
      halted        --halt-after N: a checkpoint and no export; the same command with --resume continues
      interrupted   SIGINT or SIGTERM (what a cluster scheduler sends before preemption): the step finishes, a
                    checkpoint is written, and every rank exits with 128 + the signal's number (common.Interrupted)
    Every rank takes the same decision at the same step (_agree).
    """

    def __init__(self, cfg, tr, tok, total_steps, desc, stride=1, keep_best=False, patience=0,
                 score="validation loss", maximize=False):
        self.cfg, self.tr, self.tok = cfg, tr, tok
        self.total, self.desc, self.stride = total_steps, desc, stride
        self.log_every = cfg.log_every or max(1, -(-total_steps // 20))  # about 20 lines a run by default
        self.ckpt_dir = os.path.join(cfg.out_dir, "checkpoint")
        meta, state = maybe_resume(cfg, tr, keep_best)
        self.start = meta["step"] if meta else 0
        self.best = BestWeights(tr.params, keep_best, patience, meta and meta.get("early_stop"), state)
        if meta:
            tr.checkpoint = f"the last checkpoint (step {meta['step']}) is kept in {self.ckpt_dir}"
        self.log = JsonlLog(os.path.join(cfg.out_dir, "metrics.jsonl"))
        self.halted, self.stop_early, self.bar, self.last_step = False, False, None, None
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
        t = torch.tensor(flags, dtype=torch.float64, device=self.tr.params[0].device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return tuple(int(v) for v in t.tolist())

    def save(self, step, metrics):
        save_checkpoint(self.ckpt_dir, self.tr, self.tok,
                        {"step": step, "args": config_dict(self.cfg), "early_stop": self.best.record,
                         "train_seconds": time.monotonic() - self.clock0, "command": command_line(), **metrics},
                        self.best.state, sharded=self.cfg.fsdp)
        self.last_save = time.monotonic()
        self.tr.checkpoint = f"the last checkpoint (step {step}) is kept in {self.ckpt_dir}"

    def every(self, step, n):
        """True at the first step at or after each multiple of n (n = 0: never): with stride mu, a rollout batch
        that crosses a multiple of n counts as reaching it."""
        return bool(n) and step // n > (step - self.stride) // n

    def evaluated(self, step, value):
        """A validation score for keep-best and early stopping (a tie keeps the earlier step)."""
        self.evaluations += 1
        self.stop_early = self.best.update(step, self.sign * value)

    def _decide(self, step):
        """(signal caught or 0, whether to write a checkpoint now, why the loop ends here or None)."""
        c = self.cfg
        halt = c.halt_after is not None and c.halt_after <= step < self.total
        late = is_main() and c.save_minutes and time.monotonic() - self.last_save >= 60 * c.save_minutes
        spent = is_main() and c.time_budget and time.monotonic() - self.clock0 >= 60 * c.time_budget
        signum, late, spent = self._agree(self.signal, late, spent)
        save = bool(signum or halt or late or self.every(step, c.save_every))
        why = None
        if self.stop_early:
            why = (f"early stop at step {step}: the {self.score} has not improved for {self.best.patience} "
                   f"evaluations; best {self.sign * self.best.record['loss']:.4f} at step {self.best.record['step']}")
        elif halt:
            self.halted = True
            why = f"halting after step {step} (--halt-after): checkpoint written; continue with --resume"
        elif spent and step < self.total:
            why = f"time budget of {c.time_budget:g} minutes spent after step {step} (--time-budget)"
        return signum, save, why

    def end_step(self, step, metrics, shown=None, lines=()):
        """Log, print, checkpoint (see the class docstring); True when the loop must stop here. `shown`: the
        metrics printed (all are logged); `lines`: extra lines to print (decoded samples)."""
        self.log.write(step=step, **metrics)
        self.last_step = step
        crash_point("step")
        signum, save, why = self._decide(step)
        if is_main():
            if self.every(step, self.log_every) or step == self.total or why or signum:
                self.bar.write(fmt_metrics(step, metrics if shown is None else
                                           {k: v for k, v in metrics.items() if k in shown}))
            for line in lines:
                self.bar.write(line)
        if save:
            self.save(step, metrics)
        if signum:
            print0(f"interrupted ({signal.Signals(signum).name}) after step {step}: checkpoint written to "
                   f"{self.ckpt_dir}. Continue with the same command and --resume")
            release_out_dir()
            compute_cleanup(exit_code=128 + signum)
            raise Interrupted(signum)
        if why:
            print0(why)
        return why is not None

    def finish(self, metrics=None, meta=None, hints=()):
        """Restore the kept weights, export OUT_DIR/final (not after a halt), print what to run next (`hints`:
        (what, command) pairs, {final} standing for the export's path), end the distributed run. Returns the
        metrics, with best_step and best_eval_loss (or best_eval_accuracy) when weights were kept."""
        metrics = dict(metrics or {})
        if self.tr.world > 1 and not P.is_sharded(self.tr.model):  # (sharded: each rank holds other weights)
            print0(f"ranks in sync: {assert_ranks_in_sync(self.tr.params, self.tr.world)} (weights compared over "
                   f"{self.tr.world} ranks)")
        if self.best.state is not None and not self.halted:
            self.best.restore()
            best = self.sign * self.best.record["loss"]
            last = "" if self.best.record["step"] == self.last_step else "; the last step's weights are not exported"
            print0(f"kept the weights of step {self.best.record['step']}: the best {self.score}, {best:.4f}, of "
                   f"{self.evaluations} evaluations (a tie keeps the earlier step){last}")
            key = "best_eval_loss" if self.sign > 0 else "best_eval_accuracy"
            metrics.update(best_step=self.best.record["step"], **{key: best})
        if not self.cfg.no_export and not self.halted:
            path = os.path.join(self.cfg.out_dir, "final")
            metrics.update(train_seconds=time.monotonic() - self.clock0, last_step=self.last_step)
            export_model(path, self.tr.model, self.tok, {"args": config_dict(self.cfg), **(meta or {}), **metrics},
                         self.cfg.export, base=base_model_of(self.cfg.model))
            how = "base weights + adapter" if M.has_lora(self.tr.model) else "full weights"
            print0(f"exported the trained model to {path} (official layout, {how}; load it with --model {path})")
            width = max((len(what) for what, _ in hints), default=0)
            for what, command in hints:
                print0(f"  {what:<{width}}  {command.format(final=shlex.quote(path))}")
        barrier()  # every rank is done with OUT_DIR before it is given back
        release_out_dir()
        compute_cleanup()
        return metrics


def next_commands(cfg, stage):
    """What to run after a run of `stage` ('sft' or 'rl'): (what, command) pairs with {final} for the export, for
    Run.finish to print. eval.py evaluates a tiny export with its own settings, so it needs no more flags."""
    task = "gsm8k" if cfg.task == "s1k" else cfg.task
    out = [("RL from it:", f"python diffu_grpo.py --model {{final}} --task {task}")] if stage == "sft" else []
    if cfg.preset != "tiny":
        return out + [("evaluate it:", f"python eval.py --model {{final}} --task {task}")]
    out.append(("evaluate it:", "python eval.py --model {final} --limit 128"))
    if task == "sudoku":
        out.append(("watch it solve:", "python sample.py --model {final} --prompt 'sudoku 2403132442010140' "
                                       "--gen-length 40 --block-length 40 --steps 40 --show"))
    return out
