"""
Stage 1 of d1: masked supervised fine-tuning with LLaDA's objective.

    python sft.py --model tiny --task sudoku            # the tiny recipe on a laptop CPU: about a minute

A training pair is (prompt p0, answer r0). Noise is applied to the ANSWER only:

    t ~ U(0, 1) per sequence,  p = (1 - eps) t + eps,
    each answer token (its EOS padding included) becomes [MASK] with probability p; the prompt is never masked.

The model predicts every masked token from the partially masked sequence:

    loss = E_t [ 1/L_r * sum_{i masked} -log p_theta(r0_i | p0, r_t) / p ]

with L_r the answer length of that sample, EOS padding included. The 1/p weight makes this an upper bound on the
negative log-likelihood (the masked diffusion ELBO). The padding counts because writing EOS up to the end of a fixed
canvas is how the model learns to stop.

LLaDA's PRE-TRAINING objective is the same estimator with every token maskable, the prompt included:

    loss = E_t [ 1/L * sum_{i masked} -log p_theta(x0_i | x_t) / p ]      (L = the whole sequence length)

d1 fine-tunes a model that went through both. A model trained here from scratch has seen only what this script
showed it, so --objective mix draws one of the two per sequence: diffu-GRPO masks prompt tokens (p_mask), and a model
that has only seen clean prompts would read a partly masked one out of distribution.

Length: d1 pads every s1K example to 4096 tokens with EOS. We pad to --max-length (a fixed canvas, so the model still
learns to fill the rest with EOS) and truncate longer answers; the script reports how many were truncated.

Reading order: the objective (sft_loss), one optimizer step (train_step), the validation loss, then main. The
recipe (SFTConfig, d1's values) and its presets are at the bottom; the run around the loop is harness.Run.

    torchrun --nproc_per_node=2 sft.py --model tiny --task sudoku        # the same run on 2 processes (gloo)
    torchrun --nproc_per_node=8 sft.py --task s1k --grad-ckpt            # d1's recipe on LLaDA-8B-Instruct
"""

import math
import time
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F

import config
import model as M
from common import (batch_for, cli, compute_init, distribute, lora_targets, make_trainer, optimizer_step, peak_memory,
                    print0, training_setup)
from config import option, parse_config, require, shared
from data import BLANKS, sft_split
from harness import Run, next_commands
from rundir import prepare_run_dir
from memory import Setting, check_fits
from parallel import gathered

# -----------------------------------------------------------------------------
# The objective


def sft_loss(model, ids, maskable_from, mask_id, t, u, eps=1e-3, norm="sequence"):
    """ids (B, T) long; maskable_from (B,): the first position that may be masked (the prompt length for LLaDA's
    SFT objective, 0 for its pre-training one); t (B,) noise levels in [0, 1]; u (B, T) uniforms deciding the mask.

    Returns sum over masked maskable tokens of CE / p, divided by the maskable length L_r, and averaged:
      norm 'sequence': the mean over sequences of each one's sum / L_r (LLaDA's formula, per sample);
      norm 'batch':    all sums / all maskable tokens of the batch (d1's sft_train.py; equal at batch size 1).
    t and u are inputs, not drawn here, so callers own the randomness: training draws them from a seeded generator,
    the validation loss uses fixed t's, and tests compute the same number by hand."""
    B, T = ids.shape
    pos = torch.arange(T, device=ids.device)[None, :]
    maskable = pos >= maskable_from[:, None]  # (B, T): the answer and its EOS padding (SFT), or all (pre-training)
    p = ((1 - eps) * t + eps)[:, None]  # (B, 1) masking probability of each sequence
    masked = maskable & (u < p)  # (B, T)
    noisy = torch.where(masked, torch.full_like(ids, mask_id), ids)
    # Logits only from the first maskable position on (logits_slice): positions before it are never masked, so
    # their logits would be thrown away; with a 126k vocabulary they are most of the memory of a long prompt.
    s = int(maskable_from.min())
    logits = model(noisy, logits_slice=slice(s, T))  # (B, T - s, V); no attention mask: EOS padding is content
    ce = F.cross_entropy(logits.float().flatten(0, 1), ids[:, s:].flatten(), reduction="none").view(B, T - s)
    per_token = torch.where(masked[:, s:], ce / p, torch.zeros_like(ce))  # (B, T - s)
    L_r = maskable.sum(1).clamp(min=1)  # (B,)
    if norm == "batch":
        return per_token.sum() / L_r.sum()
    return (per_token.sum(1) / L_r).mean()


def noise_for(step, seed, n, T):
    """The noise of global step `step` for its n examples: (t (n,), u (n, T), coin (n,)) from a generator seeded
    from (seed, step) alone, so every rank draws the same numbers for the whole global batch (each takes its slice)
    and a resumed run draws exactly what the uninterrupted run drew. `coin` picks the objective under --objective
    mix."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.rand(n, generator=g), torch.rand(n, T, generator=g), torch.rand(n, generator=g)


def maskable_start(plens, coin, objective):
    """Where each sequence's maskable part starts: the prompt length under LLaDA's SFT objective, 0 under its
    pre-training objective, and under 'mix' one of the two per sequence by its coin (half each)."""
    if objective == "sft":
        return plens
    if objective == "pretrain":
        return torch.zeros_like(plens)
    return torch.where(coin < 0.5, torch.zeros_like(plens), plens)


# -----------------------------------------------------------------------------
# One optimizer step


def train_step(tr, ids, starts, t, u, micro_batch, eps, norm):
    """One optimizer step (common.Trainer tr) on this rank's share of the global batch: ids (b, T), starts (b,),
    t (b,), u (b, T). Micro-batches of `micro_batch` rows accumulate; common.optimizer_step averages the gradients
    over ranks (= the mean over the global batch), clips and applies them. Returns the metrics."""
    accum = len(ids) // micro_batch
    loss_sum = 0.0
    for m in range(accum):
        sl = slice(m * micro_batch, (m + 1) * micro_batch)
        with tr.autocast:  # bf16 compute on a GPU; a no-op on the CPU
            loss = sft_loss(tr.model, ids[sl], starts[sl], tr.model.cfg.mask_token_id, t[sl], u[sl], eps, norm)
        (loss / accum).backward()
        loss_sum += loss.item() / accum
    grad_norm = optimizer_step(tr, loss_sum)
    return {"loss": loss_sum, "grad_norm": grad_norm, "lr": tr.sched.get_last_lr()[0]}


# -----------------------------------------------------------------------------
# Validation: the objective at fixed noise levels, on validation examples (never test ones: this number picks models)


def noise_levels(k):
    """k fixed noise levels spread over (0, 1): (i + 0.5) / k; k = 5 gives 0.1, 0.3, 0.5, 0.7, 0.9."""
    return tuple((i + 0.5) / k for i in range(k))


@torch.no_grad()
def heldout_loss(model, ids, plens, mask_id, batch_size, device, autocast, levels, rank=0, world=1):
    """The SFT objective at fixed noise levels with a fixed mask pattern per level: an estimate that changes only
    when the weights change. The examples are sharded over ranks (rank r takes r, r + world, ...) and the sums
    all-reduced, so every rank gets the number one process would get, at 1/world of the cost."""
    was_training = model.training
    model.eval()
    mine = torch.arange(rank, len(ids), world)
    with gathered(model):  # --fsdp: gathered once for every pass (ranks may run different numbers of them)
        total, count = _heldout_sums(model, ids, plens, mask_id, batch_size, device, autocast, levels, mine)
    model.train(was_training)
    if world > 1:
        t = torch.tensor([total, count], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        total, count = t.tolist()
    return total / count


def _heldout_sums(model, ids, plens, mask_id, batch_size, device, autocast, levels, mine):
    """(summed loss, examples) over this rank's validation examples `mine`."""
    total, count = 0.0, 0
    for k, t in enumerate(levels):
        g = torch.Generator().manual_seed(10_000 + k)
        u = torch.rand(ids.shape, generator=g)[mine]  # the same pattern per example whatever the world size
        for i in range(0, len(mine), batch_size):
            sl = mine[i:i + batch_size]
            with autocast:
                loss = sft_loss(model, ids[sl].to(device), plens[sl].to(device), mask_id,
                                torch.full((len(sl),), t, device=device), u[i:i + batch_size].to(device))
            total += loss.item() * len(sl)
            count += len(sl)
    return total, count


# -----------------------------------------------------------------------------
# The training loop


def main(argv=None):
    cfg, presets = get_config(argv)
    rank, _, world, device = compute_init(cfg.device)
    prepare_run_dir(cfg)  # refuses to mix two runs in one --out-dir; checks a --resume
    batch_size, per_rank = batch_sizes(cfg, world)
    rows, held = training_rows(cfg)  # a bad data file stops here, before the model loads
    model, tok, params, dtype, autocast = training_setup(cfg, device, lora_targets(cfg.lora_targets))
    check_fits(Setting(model.cfg, micro_batch=cfg.micro_batch_size, prompt_len=0, completion_len=cfg.max_length,
                       dtype=dtype, lora_r=cfg.lora_r, lora_targets=lora_targets(cfg.lora_targets),
                       grad_ckpt=cfg.grad_ckpt, world=world, fsdp=cfg.fsdp), device, cfg.force)
    params = distribute(cfg, model, world, device)  # DDP, or FSDP2 with --fsdp (parallel.py)
    (ids, plens), (val_ids, val_plens) = tokenized(cfg, tok, rows, held, model.cfg.eos_token_id)
    N, T = ids.shape
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * N / batch_size)
    print0(f"masked SFT on {cfg.task} (preset {'+'.join(presets) or 'd1'}): {N} training examples, {len(val_ids)} "
           f"for validation | {model.num_params():,} params, {sum(p.numel() for p in params):,} trainable | "
           f"world {world}, {per_rank} examples per rank in micro-batches of {cfg.micro_batch_size} | "
           f"{total_steps} steps")
    tr = make_trainer(model, params, cfg, total_steps, world, autocast)
    run = Run(cfg, tr, tok, total_steps, "sft", keep_best=cfg.keep_best or cfg.patience > 0, patience=cfg.patience)
    validate = validation(cfg, model, val_ids, val_plens, device, autocast, rank, world)
    if run.start == 0:
        loss = validate()
        run.log.write(step=0, eval_loss=loss)
        run.evaluated(0, loss)
    model.train()
    metrics = {}
    for step in run.steps():
        t0 = time.perf_counter()
        # The global batch and its noise are functions of the step alone: every rank takes its slice, and a resumed
        # run draws exactly what the uninterrupted run drew.
        idx = batch_for(step - 1, batch_size, N, cfg.seed)[rank * per_rank:(rank + 1) * per_rank]
        t, u, coin = (x[rank * per_rank:(rank + 1) * per_rank] for x in noise_for(step - 1, cfg.seed, batch_size, T))
        torch.manual_seed(cfg.seed * 1_000_003 + step)  # LoRA dropout's RNG (F.dropout takes no generator): per step
        starts = maskable_start(plens[idx], coin, cfg.objective)
        metrics = train_step(tr, ids[idx].to(device), starts.to(device), t.to(device), u.to(device),
                             cfg.micro_batch_size, cfg.eps, cfg.loss_norm)
        metrics.update(step_time=time.perf_counter() - t0, **peak_memory(device))
        if cfg.skip_nonfinite:
            metrics["nonfinite_skipped"] = tr.skipped
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps:
            metrics["eval_loss"] = validate()
            run.evaluated(step, metrics["eval_loss"])
        if run.end_step(step, metrics):
            break
    return run.finish(metrics, hints=next_commands(cfg, "sft"))


# -----------------------------------------------------------------------------
# Data and validation plumbing


def tokenize_examples(tokenizer, rows, max_length, eos_id):
    """rows with `prompt` (chat messages) and `completion` (text) -> (ids (N, max_length), prompt_lens (N,)),
    plus the number of examples whose answer was truncated. An example whose prompt alone fills the canvas is
    dropped (counted as truncated). Each sequence: chat-templated prompt + answer + the end of the turn (LLaDA's
    <|eot_id|>, Dream's <|im_end|>), then EOS up to the end of the canvas."""
    seqs, plens, truncated, prompts = [], [], 0, []
    eot = "<|im_end|>" if "<|im_end|>" in tokenizer.get_vocab() else "<|eot_id|>"
    for r in rows:
        p = tokenizer(tokenizer.apply_chat_template(r["prompt"], tokenize=False),
                      add_special_tokens=False)["input_ids"]
        prompts.append(p)
        a = tokenizer(r["completion"] + eot, add_special_tokens=False)["input_ids"]
        if len(p) + len(a) > max_length:
            truncated += 1
            if len(p) >= max_length:
                continue
            a = a[:max_length - len(p)]
        seqs.append(p + a + [eos_id] * (max_length - len(p) - len(a)))
        plens.append(len(p))
    if not seqs:
        raise M.UsageError(f"the prompt of every one of the {len(rows)} examples fills --max-length {max_length} "
                           f"tokens (the shortest is {min(len(p) for p in prompts)}): nothing of an answer fits; "
                           f"raise --max-length")
    return torch.tensor(seqs), torch.tensor(plens), truncated


def batch_sizes(cfg, world):
    """(global batch, examples per rank): --batch-size, or world x --micro-batch-size x --grad-accum."""
    batch_size = cfg.batch_size or world * cfg.micro_batch_size * cfg.grad_accum
    if batch_size % (world * cfg.micro_batch_size):
        raise M.UsageError(f"--batch-size {batch_size} is not a multiple of the world size {world} x "
                           f"--micro-batch-size {cfg.micro_batch_size}")
    return batch_size, batch_size // world


def training_rows(cfg):
    """(training rows, validation rows) of the config's task: read (and checked) before any model loads."""
    return sft_split(cfg.task, cfg.data_path, cfg.prompt_style, cfg.train_n, cfg.eval_n, cfg.eval_frac, cfg.seed,
                     cfg.blanks, cfg.sudoku_answers)


def tokenized(cfg, tok, rows, held, eos_id):
    """((ids, prompt lens), (validation ids, prompt lens)), truncation reported."""
    ids, plens, n_trunc = tokenize_examples(tok, rows, cfg.max_length, eos_id)
    val_ids, val_plens, _ = tokenize_examples(tok, held, cfg.max_length, eos_id)
    if n_trunc:
        print0(f"{n_trunc} of {len(rows)} training examples are longer than --max-length {cfg.max_length} and lose "
               f"the end of their answer")
    return (ids, plens), (val_ids, val_plens)


def validation(cfg, model, ids, plens, device, autocast, rank, world):
    """validate() -> the validation loss; its cost is printed once."""
    levels = noise_levels(cfg.eval_noise_levels)
    print0(f"validation: {len(ids)} examples x {len(levels)} noise levels x {ids.shape[1]} tokens = "
           f"{len(ids) * len(levels) * ids.shape[1]:,} forward tokens per evaluation, sharded over {world} rank(s)")
    return lambda: heldout_loss(model, ids, plens, model.cfg.mask_token_id, cfg.micro_batch_size * 4, device,
                                autocast, levels, rank, world)


# -----------------------------------------------------------------------------
# The recipe: d1's sft_train.py as it ran (LoRA r 128, alpha 256, dropout 0.05 on q/k/v; lr 1e-5, linear decay, no
# warmup; weight decay 0.1; grad-norm 1.0; 1 example per device x 4 accumulation steps; 20 epochs; 4096 tokens; 1%
# held out, evaluated every 100 steps, best checkpoint kept; seed 42). Every field is a flag (config.option).


@dataclass(frozen=True)
class SFTConfig(config.TrainerConfig):
    # Inherited from config.TrainerConfig, the same in both trainers: model, preset, adapter, dtype, device,
    # grad_ckpt, force, data_path, prompt_style, train_n, save_every, resume, halt_after, export, no_export.
    lora_r: int = shared("lora_r", 128)
    lora_alpha: float = shared("lora_alpha", 256.0)
    lora_dropout: float = shared("lora_dropout", 0.05)
    lora_targets: str = shared("lora_targets", "q_proj,k_proj,v_proj")

    task: str = option("s1k", "s1k (d1's SFT data, from the hub or --data-path), or sudoku / countdown (this "
                       "project's generators)", "data", choices=["s1k", "sudoku", "countdown"])
    eval_n: int = option(None, "validation examples (default: --eval-frac of the set)", "data", type=int)
    eval_frac: float = option(0.01, "validation fraction of the training set, when --eval-n is unset", "data")
    blanks: tuple = shared("blanks", BLANKS)
    max_length: int = option(4096, "the canvas in tokens: prompt + answer, EOS-padded", "data")

    objective: str = option("sft", "LLaDA's SFT objective (only the answer is masked), its pre-training objective "
                            "(every token maskable), or a 50/50 mix per sequence; validation always uses SFT's",
                            "d1's algorithm", choices=["sft", "pretrain", "mix"])
    eps: float = option(1e-3, "minimum masking probability: p = (1 - eps) t + eps", "d1's algorithm")
    loss_norm: str = option("sequence", "sequence: each sequence's loss over its own answer length, averaged (LLaDA); "
                            "batch: summed over the batch, over all its answer tokens (d1's sft_train.py; the same "
                            "at d1's batch of 1 per device)", "d1's algorithm", choices=["sequence", "batch"])

    epochs: float = option(20.0, "passes over the training set (unless --max-steps)", "optimisation")
    max_steps: int = option(None, "optimizer steps in all (default: from --epochs)", "optimisation", type=int)
    batch_size: int = option(None, "global batch: examples per optimizer step over all ranks (default: world size "
                             "x --micro-batch-size x --grad-accum)", "optimisation", type=int)
    micro_batch_size: int = option(1, "examples per forward pass per rank", "optimisation")
    grad_accum: int = option(4, "micro-batches per rank per optimizer step, when --batch-size is unset",
                             "optimisation")
    lr: float = shared("lr", 1e-5)
    lr_schedule: str = shared("lr_schedule", "linear")
    warmup_steps: int = shared("warmup_steps", 0)
    adam_betas: tuple = shared("adam_betas", (0.9, 0.999))
    weight_decay: float = shared("weight_decay", 0.1)
    max_grad_norm: float = shared("max_grad_norm", 1.0)
    seed: int = shared("seed", 42)

    out_dir: str = shared("out_dir", "out/sft")
    eval_every: int = option(100, "validation loss every N steps (0 = only at the start and the end)",
                             "run and checkpoints")
    eval_noise_levels: int = option(5, "noise levels of the validation loss, (i + 0.5) / K for i < K: fewer is "
                                    "cheaper and noisier", "run and checkpoints")
    keep_best: bool = option(True, "export the weights of the best validation loss, not the last step's (keeps a "
                             "CPU copy of the trainable weights)", "run and checkpoints")
    patience: int = option(0, "early stopping: stop once the validation loss has not improved for this many "
                           "evaluations; implies --keep-best (0 = off)", "run and checkpoints")

    sudoku_answers: str = option("solutions", "generated Sudoku: the SFT answer is the solution, or the puzzle with "
                                 "every blank filled by a random digit (the format and the given cells, no Sudoku)",
                                 "debugging probes", choices=["solutions", "random"])

    def check(self, typed):
        """Every value checked before any work: a nonsense value is refused, never replaced."""
        config.check_trainer(self)
        require(self.sudoku_answers != "random" or self.task == "sudoku", "--sudoku-answers random is for --task "
                "sudoku")
        require(self.epochs > 0 and self.max_length > 0 and self.grad_accum > 0 and self.eval_noise_levels > 0,
                "--epochs, --max-length, --grad-accum and --eval-noise-levels must be > 0")
        require(self.batch_size is None or (self.batch_size > 0 and self.batch_size % self.micro_batch_size == 0),
                f"--batch-size {self.batch_size} must be a positive multiple of --micro-batch-size "
                f"{self.micro_batch_size}")
        require(self.eval_n is None or self.eval_n > 0, f"--eval-n must be > 0, not {self.eval_n}")
        require(0 < self.eval_frac < 1, f"--eval-frac must be in (0, 1), not {self.eval_frac}")
        require(0 < self.eps <= 1, f"--eps must be in (0, 1], not {self.eps}")
        require(self.eval_every >= 0 and self.patience >= 0, "--eval-every and --patience must be >= 0")
        return self


# The presets, applied under the flags you type. "tiny": the tiny model on a laptop CPU, full fine-tuning (it is
# small), a canvas that fits the compact prompts, a learning rate and eps the tiny model learns with (eps 0.2 bounds
# the 1/p weight at 5; with 1e-3 its gradients are too noisy to learn), and LLaDA's mixed objective so that the
# model can go on to diffu-GRPO's masked prompts. "tiny sudoku" is the SFT stage of the demo with SHAPE=same
# (runs/tiny_sudoku.sh, the default; SHAPE=d1 changes it with flags: runs/shape.sh): 64 labelled puzzles with
# 3-6 blanks, a 46-token prompt + a 40-token answer region.
PRESETS = {
    "tiny": dict(task="sudoku", prompt_style="compact", lora_r=0, lora_dropout=0.0, max_length=256, eval_n=64,
                 objective="mix", eps=0.2, max_steps=400, batch_size=32, micro_batch_size=32, lr=3e-3,
                 lr_schedule="cosine", warmup_steps=50, weight_decay=0.0, seed=0, eval_every=50),
    "tiny sudoku": dict(blanks=(3, 6), train_n=64, max_length=86),
    "tiny countdown": dict(data_path="generate", train_n=2000, max_length=96),
}


def choose_presets(typed):
    """The presets a command line calls for: none for d1's model, 'tiny' (+ its task's) for the tiny one."""
    if config.model_scale(typed.get("model", SFTConfig.model), typed.get("preset", "auto")) != "tiny":
        return []
    task = typed.get("task", PRESETS["tiny"]["task"])
    return ["tiny"] + ([f"tiny {task}"] if f"tiny {task}" in PRESETS else [])


def get_config(argv=None):
    """(SFTConfig, the presets applied) from the command line."""
    cfg, names = parse_config(SFTConfig, argv, __doc__.split("\n\n")[0].strip() + "\n\n" + __doc__.split("\n\n")[1],
                              PRESETS, choose_presets)
    return replace(cfg, preset="tiny" if names else "d1"), names


def get_args(argv=None):
    """The resolved config (for tests and the fidelity ledger)."""
    return get_config(argv)[0]


if __name__ == "__main__":
    cli(main)
