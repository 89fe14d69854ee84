"""A run a user can trust: an out-dir that holds a run is never overwritten or mixed by accident, --resume is exact or
refuses, a kill -9 at any of the dangerous instants (mid-step, mid-checkpoint, between the checkpoint's two renames,
mid-export) followed by --resume ends bit-identical to an uninterrupted run, SIGINT/SIGTERM checkpoint and exit on
every rank, and every user mistake is one line with exit status 2."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import model as M
import weights as W
from conftest import ROOT, TINY, free_port

SFT = ["--model", TINY, "--task", "sudoku", "--max-steps", "6", "--eval-every", "3", "--train-n", "16",
       "--eval-n", "4", "--batch-size", "4", "--micro-batch-size", "4", "--save-every", "2"]
RL = ["--model", TINY, "--task", "sudoku", "--max-steps", "8", "--prompts-per-step", "1", "--num-generations", "4",
      "--micro-batch-size", "4", "--lora-r", "4", "--lora-alpha", "8", "--save-every", "2", "--sample-every", "0"]


def cli(script, args, nproc=1, env=None, wait=True):
    """A script as a user runs it; returns the finished process (or the running one with wait=False)."""
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}"] if nproc > 1 else [sys.executable])
    p = subprocess.Popen(cmd + [os.path.join(ROOT, script)] + args, cwd=ROOT, env=e, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if not wait:
        return p
    out, err = p.communicate(timeout=600)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def weights(path):
    return W.load_model(str(path)).state_dict()


def assert_same_bits(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def logged_steps(out):
    return [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]


def test_a_finished_run_survives_a_rerun_and_overwrite_starts_clean(tmp_path):
    out = tmp_path / "run"
    ok(cli("sft.py", SFT + ["--out-dir", str(out)]))
    before = (out / "final" / "model.safetensors").read_bytes()
    again = cli("sft.py", SFT + ["--out-dir", str(out)])
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert "holds a finished run" in again.stderr and "--resume" in again.stderr and "--overwrite" in again.stderr
    assert (out / "final" / "model.safetensors").read_bytes() == before
    ok(cli("sft.py", SFT + ["--out-dir", str(out), "--overwrite", "--seed", "1"]))
    assert logged_steps(out) == [0, 1, 2, 3, 4, 5, 6]  # one run, not two
    assert (out / "final" / "model.safetensors").read_bytes() != before
    done = ok(cli("sft.py", SFT + ["--out-dir", str(out), "--resume", "--seed", "1"]))
    assert "nothing to resume" in done.stdout


def test_resume_under_other_settings_refuses_and_lists_the_differences(tmp_path):
    out = tmp_path / "run"
    ok(cli("sft.py", SFT + ["--out-dir", str(out), "--halt-after", "2"]))
    p = cli("sft.py", SFT + ["--out-dir", str(out), "--resume", "--lr", "1e-4", "--objective", "sft"])
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert "--lr 0.003 (checkpoint) vs 0.0001 (now)" in p.stderr and "--objective mix (checkpoint)" in p.stderr
    # settings that do not change the computation may differ
    ok(cli("sft.py", SFT + ["--out-dir", str(out), "--resume", "--save-every", "3", "--save-minutes", "5"]))
    assert logged_steps(out) == [0, 1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("script,args,crashes", [
    # SFT, full fine-tuning: checkpoints at 2, 4, 6, then the export (the 4th directory written)
    ("sft.py", SFT, ["step:3", "write:2", "swap:2", "write:4"]),
    # diffu-GRPO with LoRA, mu = 2: checkpoints at steps 2, 4, 6, 8 (one per rollout batch), then the export
    ("diffu_grpo.py", RL, ["step:3", "write:3", "swap:2", "write:5"]),
])
def test_kill_9_at_any_dangerous_instant_then_resume_is_bit_identical(tmp_path, script, args, crashes):
    # The uninterrupted run and every killed run go at once (each in its own out-dir, one thread each), then every
    # resume: the same runs as one after the other, in less wall-clock.
    outs = {crash: tmp_path / crash.replace(":", "_") for crash in crashes}
    straight = cli(script, args + ["--out-dir", str(tmp_path / "straight")], wait=False)
    killed = {crash: cli(script, args + ["--out-dir", str(out)], env={"D1_CRASH_AT": crash}, wait=False)
              for crash, out in outs.items()}
    err = straight.communicate(timeout=600)[1]  # communicate, not wait: a full pipe would block the child
    assert straight.returncode == 0, err[-1500:]
    for crash, p in killed.items():
        err = p.communicate(timeout=600)[1]
        assert p.returncode == -signal.SIGKILL, (crash, err[-1500:])
        assert os.path.isdir(outs[crash] / "checkpoint") or os.path.isdir(outs[crash] / "checkpoint.old"), crash
    resumed = {crash: cli(script, args + ["--out-dir", str(out), "--resume"], wait=False) for crash, out in
               outs.items()}
    for crash, p in resumed.items():
        out = outs[crash]
        err = p.communicate(timeout=600)[1]
        assert p.returncode == 0, (crash, err[-1500:])
        assert_same_bits(tmp_path / "straight" / "final", out / "final")
        steps = logged_steps(out)
        assert steps == sorted(set(steps)) and steps[-1] == 8 - 2 * (script == "sft.py"), (crash, steps)
        assert not os.path.exists(out / "checkpoint.old") and not os.path.exists(out / "final.tmp")


def test_sigterm_under_two_gloo_ranks_checkpoints_on_both_and_resumes_exactly(tmp_path):
    args = RL + ["--max-steps", "12", "--save-every", "0", "--save-minutes", "0", "--lora-r", "0"]
    out = tmp_path / "run"
    p = cli("diffu_grpo.py", args + ["--out-dir", str(out)], nproc=2, wait=False)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)  # what a scheduler sends before preemption
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode != 0
    assert "interrupted (SIGTERM) after step" in stdout and "--resume" in stdout
    assert stderr.count("SIGTERM: finishing this step") == 2  # both ranks
    meta = json.load(open(out / "checkpoint" / "meta.json"))
    assert meta["step"] == logged_steps(out)[-1] < 12
    ok(cli("diffu_grpo.py", args + ["--out-dir", str(out), "--resume"], nproc=2))
    ok(cli("diffu_grpo.py", args + ["--out-dir", str(tmp_path / "straight")], nproc=2))
    assert_same_bits(tmp_path / "straight" / "final", out / "final")
    assert logged_steps(out) == [2, 4, 6, 8, 10, 12]


def test_sigint_checkpoints_and_exits_130_without_a_traceback(tmp_path):
    out = tmp_path / "run"
    p = cli("diffu_grpo.py", RL + ["--max-steps", "40", "--save-every", "0", "--out-dir", str(out)], wait=False)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 130 and "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert json.load(open(out / "checkpoint" / "meta.json"))["step"] == logged_steps(out)[-1]


@pytest.mark.parametrize("script,argv,message", [
    ("diffu_grpo.py", ["--max-steps", "0"], "--max-steps must be > 0"),
    ("diffu_grpo.py", ["--num-generations", "1"], "G >= 2"),
    ("diffu_grpo.py", ["--max-steps", "1", "--num-iterations", "12"], "whole number of rollout batches"),
    ("diffu_grpo.py", ["--micro-batch-size", "0"], "--micro-batch-size must be > 0"),
    ("diffu_grpo.py", ["--lr", "-1"], "--lr must be > 0"),
    ("diffu_grpo.py", ["--gen-length", "40", "--block-length", "16"], "not a multiple of --block-length"),
    ("diffu_grpo.py", ["--blanks", "13", "13"], "at least 4 givens"),
    ("sft.py", ["--max-steps", "0"], "--max-steps must be > 0"),
    ("sft.py", ["--max-steps", "-5"], "--max-steps must be > 0"),
    ("sft.py", ["--batch-size", "6", "--micro-batch-size", "4"], "multiple of --micro-batch-size"),
    ("sft.py", ["--eval-frac", "1.5"], "--eval-frac"),
    ("sft.py", ["--resume", "--overwrite"], "pass one of them"),
])
def test_nonsense_values_are_refused_in_one_line_before_any_work(script, argv, message):
    t0 = time.time()
    p = cli(script, ["--model", TINY] + argv + ["--out-dir", "/nonexistent/never-created"])
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert time.time() - t0 < 60  # no model, no data: it stops at the flags


def write(path, text):
    path.write_text(text)
    return str(path)


def test_bad_data_files_are_named_with_the_line_and_what_is_wrong(tmp_path):
    from data import load_task
    for rows, line, what in [("garbage,x", 3, "not a valid 4x4 Sudoku grid"), ("12,34", 3, "not a valid"),
                             ("1234abcd12341234,1234341221434321", 3, "not 16 characters of 0-4"),
                             ("4102200002100320,3142243142131324", 3, "disagree with the solution")]:
        f = write(tmp_path / "s.csv", f"Puzzle,Solution\n3102200002100320,3142243142131324\n{rows}\n")
        with pytest.raises(M.UsageError, match=f"s.csv:{line}: .*{what}"):
            load_task("sudoku", "train", f)
    good = '{"question": "1+1?", "answer": "#### 2"}\n'
    f = write(tmp_path / "g.jsonl", good + '{"question": "2+2?"}\n')
    with pytest.raises(M.UsageError, match="row 2 has no answer"):
        load_task("gsm8k", "train", f)
    f = write(tmp_path / "b.jsonl", good + '{"question": "2+2?", "answer": \n')
    with pytest.raises(M.UsageError, match=r"b.jsonl:2: not valid JSON"):
        load_task("gsm8k", "train", f)
    p = cli("diffu_grpo.py", ["--model", TINY, "--task", "gsm8k", "--data-path", f, "--out-dir",
                              str(tmp_path / "o")])
    assert p.returncode == 2 and "b.jsonl:2: not valid JSON" in p.stderr and "Traceback" not in p.stderr


def test_truncated_checkpoint_files_are_named(tmp_path):
    out = tmp_path / "run"
    ok(cli("sft.py", SFT + ["--out-dir", str(out), "--halt-after", "2"]))
    state = out / "checkpoint" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    p = cli("sft.py", SFT + ["--out-dir", str(out), "--resume"])
    assert p.returncode == 2 and "trainer_state.pt: cannot be read" in p.stderr and "Traceback" not in p.stderr
    weights_file = out / "checkpoint" / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:50])
    with pytest.raises(M.UsageError, match="model.safetensors: not a readable safetensors file"):
        W.load_model(str(out / "checkpoint"))


def test_the_hub_offline_fails_within_seconds(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    with pytest.raises(M.UsageError, match=r"(?s)'someone/not-cached'.*--model DIR"):
        W.resolve_model_dir("someone/not-cached")
    assert time.time() - t0 < 10
