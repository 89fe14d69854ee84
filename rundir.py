"""
The out-dir of a training run: one live run per out-dir (a launch claims it, and a second launch, or a resume or
overwrite of a live run, refuses and touches nothing), what a launch may do with a directory that holds a run
(--resume continues it exactly, --overwrite clears it), and writing into it so that a crash never leaves half a file
(a directory is written aside, flushed, then renamed into place).

    prepare_run_dir(cfg)       # sft.py and diffu_grpo.py, first thing, before any model or data loads
"""

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import sys
import time

import torch.distributed as dist

import model as M
from common import barrier, is_main, on_exit, print0
from config import config_dict

# -----------------------------------------------------------------------------
# 1. One live run per out-dir: OUT_DIR/run.lock

LOCK = "run.lock"  # OUT_DIR/run.lock: the live run that holds OUT_DIR (host, PID, start, command)
_CLAIMED = []       # the lock files this process holds


def check_out_dir(path, flag="--out-dir"):
    """OUT_DIR must be a directory this process can create and write: one line naming what is wrong, before any
    model or data loads."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise M.UsageError(f"{flag} {path!r} is a file, not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise M.UsageError(f"{flag} {path!r} cannot be created ({e.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise M.UsageError(f"{flag} {path!r} is not writable")


def _process_start(pid):
    """When process `pid` started (clock ticks since boot, /proc/PID/stat), or None (not Linux, or no such
    process): a PID that was reused by a later process then does not pass for the run that wrote a claim."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _is_live(claim):
    """Whether the run that wrote `claim` may still be running. On this host: its PID exists and started when the
    claim says. On another host (a shared filesystem) that cannot be checked, so the claim counts as live. This
    very process (an earlier run of it, e.g. in tests) is not another live run."""
    if claim.get("host") != socket.gethostname():
        return True
    pid, start = claim.get("pid"), claim.get("start")
    if pid == os.getpid() and start == _process_start(pid):
        return False
    now = _process_start(pid) if isinstance(pid, int) else None
    if now is None:
        try:
            os.kill(pid, 0)  # no /proc (not Linux): the PID alone
            return True
        except (ProcessLookupError, TypeError):
            return False
        except PermissionError:
            return True
    return start is None or now == start


def claim_out_dir(out):
    """Take OUT_DIR for this run (rank 0 takes it for every rank of a torchrun): OUT_DIR/run.lock is created with
    O_EXCL, so of two launches at the same instant exactly one wins, and it records host, PID, start time and
    command. A claim left by a process that died (kill -9, a lost node) on this host is recognised by its PID and
    reclaimed. Given back (release_out_dir) however the run ends, through common.on_exit."""
    path = os.path.join(out, LOCK)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid()),
          "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command_line()}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(path) as f:
                    claim = json.load(f)
            except (OSError, ValueError):  # being written this instant, or left empty by a kill mid-write
                if time.time() - os.path.getmtime(path) < 10:
                    time.sleep(0.5)
                    continue
                claim = {"host": me["host"], "pid": None}
            if _is_live(claim):
                where = "" if claim.get("host") == me["host"] else (
                    f" on host {claim.get('host')} (from here it cannot be checked; if that run is gone, delete "
                    f"{path})")
                raise M.UsageError(f"{out} is in use by a live run{where}: PID {claim.get('pid')}, started "
                                   f"{claim.get('started')}: {claim.get('command')}. Wait for it to end, or choose "
                                   f"another --out-dir (nothing was touched)")
            os.remove(path)
            if claim.get("pid") != os.getpid():
                print0(f"{out}: the run that held it (PID {claim.get('pid')}, started {claim.get('started')}) is "
                       f"gone; taking it over")
            continue
        except OSError as e:
            raise M.UsageError(f"--out-dir {out!r}: cannot write {LOCK} there ({e.strerror})") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        _CLAIMED.append(path)
        on_exit(release_out_dir)
        return path
    raise M.UsageError(f"{path}: another launch is taking {out} at this instant; try again")


def command_line():
    """This launch's command line, as the user would type it again (the script and its flags; torchrun's
    process count when there are several)."""
    n = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    launcher = ["torchrun", f"--nproc_per_node={n}"] if n > 1 else ["python"]
    return shlex.join(launcher + [os.path.basename(sys.argv[0])] + sys.argv[1:])


def claim(out):
    """check_out_dir and claim_out_dir on rank 0, for every rank of a torchrun: all stop, with rank 0's reason, or
    none does."""
    error = None
    if is_main():
        try:
            check_out_dir(out)
            claim_out_dir(out)
        except M.UsageError as e:
            error = str(e)
    if dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise M.UsageError(error)


def _inside(path, directory):
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return path == directory or path.startswith(directory + os.sep)


def release_out_dir():
    """Give back every out-dir this process claimed (only a lock it wrote itself is removed)."""
    while _CLAIMED:
        path = _CLAIMED.pop()
        try:
            with open(path) as f:
                mine = json.load(f).get("pid") == os.getpid()
            if mine:
                os.remove(path)
        except (OSError, ValueError):
            pass


# -----------------------------------------------------------------------------
# 2. What a launch may do with an out-dir that holds a run

RUN_FILES = ("metrics.jsonl", "checkpoint", "checkpoint.old", "final", "final.old")


# Settings that do not change what a run computes: they may differ between a run and its --resume.
NOT_MATH = {"out_dir", "resume", "overwrite", "halt_after", "time_budget", "save_every", "save_minutes", "log_every",
            "sample_every", "force", "export", "no_export", "skip_nonfinite"}


def prepare_run_dir(cfg):
    """Called before any model or data is loaded. First OUT_DIR is checked and claimed for this run (one live run
    per out-dir: a second launch refuses and touches nothing). Then a launch into an OUT_DIR that holds a run must
    say what to do: --resume continues it (exactly, or not at all: the checkpoint's settings must equal these),
    --overwrite clears it. Returns nothing; raises a UsageError that says what is there and which flag to pass."""
    out, ckpt, final = cfg.out_dir, os.path.join(cfg.out_dir, "checkpoint"), os.path.join(cfg.out_dir, "final")
    if cfg.resume and cfg.overwrite:
        raise M.UsageError("--resume continues the run in --out-dir and --overwrite deletes it: pass one of them")
    for flag in ("model", "adapter"):  # --overwrite would delete the model this run starts from
        start = getattr(cfg, flag, None)
        if cfg.overwrite and start and os.path.exists(start) and _inside(start, out):
            raise M.UsageError(f"--{flag} {start} lies inside --out-dir {out}, which --overwrite would delete before "
                               f"it loads: choose another --out-dir")
    if os.path.isfile(os.path.join(out, "config.json")) or os.path.isfile(os.path.join(out, "meta.json")):
        raise M.UsageError(f"--out-dir {out} holds a model (an export or a checkpoint), not a run: choose another "
                           f"--out-dir (a run writes OUT_DIR/metrics.jsonl, checkpoint/ and final/)")
    claim(out)
    if is_main():
        recover(ckpt)
        recover(final)
    barrier()
    held = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
    if cfg.resume and not held:
        raise M.UsageError(f"--resume: {out} holds no run to continue (no metrics.jsonl, checkpoint/ or final/); "
                           f"drop --resume to start one there")
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


def read_meta(path):
    """DIR/meta.json as a dict, or a UsageError naming it."""
    f = os.path.join(path, "meta.json")
    try:
        with open(f) as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise M.UsageError(f"{f}: cannot be read ({e})") from None


# -----------------------------------------------------------------------------
# 3. Writing safely: a directory is written aside, flushed, then renamed into place


@contextlib.contextmanager
def atomic_dir(final, collective=False):
    """Write a directory (a checkpoint, the export) into FINAL.tmp, flush it to disk, then rename it into place.
    A crash at any instant leaves a complete FINAL, or (between the two renames) a complete FINAL.old that
    recover() puts back; never a half-written FINAL. fsync before the rename makes it survive a power cut too.
    collective: every rank enters (each writes its shards of a sharded checkpoint into FINAL.tmp); rank 0 prepares
    FINAL.tmp before any rank writes and renames it after all have written. Otherwise only the caller writes."""
    final = final.rstrip("/")
    tmp, old = final + ".tmp", final + ".old"
    main = not collective or is_main()
    if main:
        recover(final)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if collective:
        barrier()
    yield tmp
    if collective:
        barrier()
    if main:
        crash_point("write")  # (tests: a kill with FINAL.tmp written but not yet flushed or renamed)
        _fsync_tree(tmp)
        if os.path.exists(final):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            crash_point("swap")  # (tests: a kill with only FINAL.old and FINAL.tmp on disk)
        os.replace(tmp, final)
        _fsync(os.path.dirname(os.path.abspath(final)))
        shutil.rmtree(old, ignore_errors=True)
    if collective:
        barrier()


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
