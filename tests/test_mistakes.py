"""No mistake can hurt a run: one live run per out-dir (a second launch, plain, --resume or --overwrite, refuses and
touches nothing; a claim left by a dead process is reclaimed), a diverged run stops before any weight moves and
nothing non-finite is ever written, every script answers a usage error in one line with exit status 2 before any
model loads, bad data files are named with counts, and what a script says is true (unfinished runs named as such,
a tiny export evaluated with its own settings, a PEFT adapter naming the model it applies to)."""
import json
import os
import signal
import socket
import subprocess
import time

import pytest
import torch

import common
import diffu_grpo as D
from config import config_dict
import model as M
import rundir
import sft
import weights as W
from test_grpo import digits_reward
from test_runs import RL, SFT, cli, logged_steps, ok
from conftest import TINY

def finished(cases):
    """(script, argv, what, process) launched together -> the same with each process's CompletedProcess."""
    for script, argv, what, p in cases:
        out, err = p.communicate(timeout=300)
        yield script, argv, what, subprocess.CompletedProcess(p.args, p.returncode, out, err)


ONE_LINE = lambda p: p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


# --- one live run per out-dir --------------------------------------------------------------------------------------


def test_a_second_launch_into_a_live_out_dir_refuses_and_touches_nothing(tmp_path):
    out = tmp_path / "live"
    first = cli("sft.py", SFT + ["--max-steps", "40", "--eval-every", "0", "--save-every", "10", "--out-dir",
                                 str(out)], wait=False)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.1)
    first.send_signal(signal.SIGSTOP)  # paused, not gone: still the live run that holds the out-dir
    try:
        claim = json.load(open(out / rundir.LOCK))
        assert claim["pid"] == first.pid and claim["host"] == socket.gethostname()
        second = [cli("sft.py", SFT + ["--max-steps", "40", "--eval-every", "0", "--out-dir", str(out)] + extra,
                      wait=False) for extra in ([], ["--resume"], ["--overwrite"])]
        for p in second:
            err = p.communicate(timeout=300)[1]
            assert p.returncode == 2 and len(err.strip().splitlines()) == 1, err
            assert "in use by a live run" in err and f"PID {first.pid}" in err, err
    finally:
        first.send_signal(signal.SIGCONT)
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-2000:]
    assert logged_steps(out) == list(range(41)), "the live run's log was touched"  # step 0: the first validation
    assert (out / "final" / "meta.json").exists() and not (out / rundir.LOCK).exists()  # given back at the end


def test_a_claim_left_by_a_killed_run_is_reclaimed(tmp_path, capsys):
    out = tmp_path / "run"
    killed = cli("sft.py", SFT + ["--out-dir", str(out)], env={"D1_CRASH_AT": "step:3"})
    assert killed.returncode == -9 and (out / rundir.LOCK).exists()
    sft.main(SFT + ["--out-dir", str(out), "--resume"])
    assert "is gone; taking it over" in capsys.readouterr().out
    assert (out / "final").exists() and not (out / rundir.LOCK).exists()


def test_claims_by_this_host_are_checked_by_pid_and_start_and_other_hosts_are_not_guessed(tmp_path):
    out = str(tmp_path)
    lock = os.path.join(out, rundir.LOCK)
    parent = os.getppid()  # a live process that is not this one
    for claim, live in [({"pid": parent, "start": rundir._process_start(parent)}, True),
                        ({"pid": parent, "start": -1}, False),           # the PID was reused by another process
                        ({"pid": 2 ** 22 + 12345, "start": 1}, False),   # no such process
                        ({"pid": parent, "start": 1, "host": "elsewhere"}, True)]:
        with open(lock, "w") as f:
            json.dump({"host": socket.gethostname(), "started": "then", "command": "python sft.py", **claim}, f)
        if live:
            with pytest.raises(M.UsageError, match="in use by a live run" + (".*elsewhere.*delete" if
                                                                           "host" in claim else "")):
                rundir.claim_out_dir(out)
            assert json.load(open(lock))["pid"] == parent  # untouched
        else:
            rundir.claim_out_dir(out)
            assert json.load(open(lock))["pid"] == os.getpid()
            rundir.release_out_dir()
            assert not os.path.exists(lock)


# --- a diverged run stops clean -------------------------------------------------------------------------------------


def test_sft_that_diverges_stops_before_the_weights_move_keeps_its_checkpoint_and_exports_nothing(tmp_path):
    out = tmp_path / "div"
    with pytest.raises(common.Diverged, match=r"diverged at optimizer step \d+: the (loss|gradient norm) is (nan|inf)"
                                              r".*last checkpoint \(step \d+\) is kept"):
        sft.main(SFT + ["--lr", "1e9", "--max-steps", "30", "--save-every", "1", "--out-dir", str(out)])
    assert not (out / "final").exists()
    kept = W.load_model(str(out / "checkpoint"))
    assert all(torch.isfinite(p).all() for p in kept.parameters())
    p = cli("sft.py", SFT + ["--lr", "1e9", "--max-steps", "30", "--out-dir", str(tmp_path / "cli")])
    assert p.returncode == 3 and "Traceback" not in p.stderr and not (tmp_path / "cli" / "final").exists()
    assert p.stderr.strip().splitlines()[-1].startswith("sft.py: error: diverged at optimizer step"), p.stderr


def test_rl_that_diverges_stops_and_skip_nonfinite_skips_and_counts(tmp_path, monkeypatch):
    monkeypatch.setitem(D.REWARDS, "sudoku", [(digits_reward, 1.0)])  # advantages that are not all zero
    args = RL + ["--lora-r", "0", "--lr", "1e9", "--max-steps", "12", "--save-every", "0"]
    with pytest.raises(common.Diverged, match="diverged at optimizer step"):
        D.main(args + ["--out-dir", str(tmp_path / "stop")])
    assert not (tmp_path / "stop" / "final").exists()
    D.main(args + ["--skip-nonfinite", "--out-dir", str(tmp_path / "skip")])
    logged = [json.loads(line) for line in open(tmp_path / "skip" / "metrics.jsonl")]
    assert logged[-1]["nonfinite_skipped"] >= 1
    final = W.load_model(str(tmp_path / "skip" / "final"))
    assert all(torch.isfinite(p).all() for p in final.parameters())


def test_no_checkpoint_or_export_ever_holds_a_non_finite_weight(tmp_path, tiny, tok):
    import harness
    with torch.no_grad():
        next(tiny.parameters())[0, 0] = float("nan")
    with pytest.raises(common.Diverged, match="non-finite"):
        harness.export_model(str(tmp_path / "final"), tiny, tok)
    opt = torch.optim.SGD(tiny.parameters(), lr=0.1)
    with pytest.raises(common.Diverged, match="non-finite"):
        tr = common.Trainer(tiny, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), list(tiny.parameters()))
        harness.save_checkpoint(str(tmp_path / "ckpt"), tr, tok, {"step": 1})
    assert not os.listdir(tmp_path)


# --- every script refuses in one line, before any model loads -------------------------------------------------------


def test_every_script_answers_a_usage_error_in_one_line(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = []
    for script, argv, what in [
            ("sample.py", ["--model", "/nonexistent/dir"], "no such directory"),
            ("sample.py", ["--gen-length", "30", "--block-length", "8"], "not a multiple"),
            ("eval.py", ["--model", TINY, "--out-dir", str(a_file)], "is a file"),
            ("eval.py", ["--rescore", str(tmp_path / "missing.jsonl")], "No such file"),
            ("eval.py", ["--model", TINY, "--gen-length", "40", "--block-length", "32"], "not a multiple"),
            ("bench.py", ["--config", "huge"], "invalid choice"),
            ("sft.py", ["--model", TINY, "--out-dir", str(a_file)], "is a file"),
            ("diffu_grpo.py", ["--model", TINY, "--out-dir", str(a_file / "sub")], "cannot be created"),
            ("sft.py", ["--model", TINY, "--resume", "--out-dir", str(tmp_path / "empty")], "no run to continue"),
            ("rewards.py", ["--task", "countdown", "--completion", "1+2"], "needs --nums")]:
        cases.append((script, argv, what, cli(script, argv, wait=False)))
    for script, argv, what, p in finished(cases):
        assert ONE_LINE(p) and what in p.stderr, (script, argv, p.stderr)


def test_a_data_file_without_usable_rows_is_named_with_counts_before_the_model_loads(tmp_path):
    header = tmp_path / "header_only.csv"
    header.write_text("Puzzle,Solution\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    four = tmp_path / "four.jsonl"
    four.write_text('{"nums": [1, 2, 3, 4], "target": 10}\n')
    sudoku = ["--model", "/nonexistent/model/never/loaded", "--task", "sudoku", "--data-path", str(header)]
    cases = []
    for script, argv, what in [
            ("eval.py", sudoku + ["--protocol", "clean", "--out-dir", str(tmp_path / "e")], "no puzzles"),
            ("diffu_grpo.py", sudoku + ["--out-dir", str(tmp_path / "r")], "no puzzles"),
            ("sft.py", sudoku + ["--out-dir", str(tmp_path / "s")], "no puzzles"),
            ("eval.py", ["--model", TINY, "--task", "gsm8k", "--protocol", "clean", "--data-path", str(empty),
                         "--out-dir", str(tmp_path / "g")], "no rows"),
            ("diffu_grpo.py", ["--model", TINY, "--task", "countdown", "--data-path", str(four), "--out-dir",
                               str(tmp_path / "c")], "none of its 1 rows has 3 numbers")]:
        cases.append((script, argv, what, cli(script, argv, wait=False)))
    for script, argv, what, p in finished(cases):
        assert ONE_LINE(p) and what in p.stderr and "/nonexistent/model" not in p.stderr, (script, p.stderr)


# --- say what is true ------------------------------------------------------------------------------------------------


def test_an_unfinished_run_given_as_model_or_adapter_is_named_with_the_command_that_finishes_it(tmp_path):
    out = tmp_path / "run"
    ok(cli("sft.py", SFT + ["--out-dir", str(out), "--halt-after", "2"]))
    launched = [cli("sample.py", [flag, str(out)] + (["--model", TINY] if flag == "--adapter" else []), wait=False)
                for flag in ("--model", "--adapter")]
    for _, _, _, p in finished([(None, None, None, q) for q in launched]):
        assert ONE_LINE(p) and "unfinished run" in p.stderr and "step 2" in p.stderr, p.stderr
        assert "python sft.py" in p.stderr and "--resume" in p.stderr and "--halt-after" not in p.stderr
    sft.main(SFT + ["--out-dir", str(out), "--resume"])
    p = cli("sample.py", ["--model", str(out)])
    assert ONE_LINE(p) and f"pass --model {out / 'final'}" in p.stderr


def test_eval_takes_a_tiny_exports_own_settings_unless_flags_say_otherwise(tmp_path, capsys):
    import eval as E
    export = tmp_path / "rl"
    os.makedirs(export)
    run = D.get_args(["--model", TINY, "--task", "sudoku"])
    with open(export / "meta.json", "w") as f:
        json.dump({"args": config_dict(run)}, f)
    args = E.get_args(["--model", str(export)])
    assert (args.protocol, args.prompt_style, args.task, list(args.blanks)) == ("clean", "compact", "sudoku", [3, 6])
    assert (args.gen_length, args.block_length, args.steps) == ([40], 40, 1)
    assert "an export of a tiny run" in capsys.readouterr().out
    typed = E.get_args(["--model", str(export), "--gen-length", "80", "--steps", "4", "--blanks", "4", "6"])
    assert (typed.gen_length, typed.steps, list(typed.blanks), typed.block_length) == ([80], 4, [4, 6], 40)


def test_merged_export_of_full_fine_tuning_says_so_and_a_peft_adapter_names_the_model_it_applies_to(tmp_path, capsys):
    sft.main(SFT + ["--max-steps", "2", "--export", "merged", "--out-dir", str(tmp_path / "sft")])
    assert "nothing to merge" in capsys.readouterr().out
    start = str(tmp_path / "sft" / "final")  # full fine-tuning: its own weights are the base of what follows
    D.main(RL + ["--model", start, "--max-steps", "2", "--out-dir", str(tmp_path / "rl")])  # LoRA r 4 on it
    cfg = json.load(open(tmp_path / "rl" / "final" / "peft" / "adapter_config.json"))
    assert cfg["base_model_name_or_path"] == start


def test_overwrite_never_deletes_the_model_a_run_starts_from_and_an_export_is_not_an_out_dir(tmp_path):
    out = tmp_path / "sft"
    sft.main(SFT + ["--max-steps", "2", "--out-dir", str(out)])
    final = out / "final"
    for argv, what in [(["--model", str(final), "--out-dir", str(out), "--overwrite"], "inside --out-dir"),
                       (["--model", TINY, "--out-dir", str(final), "--overwrite"], "holds a model")]:
        with pytest.raises(M.UsageError, match=what):
            sft.main(SFT[2:] + argv)
    assert W.load_model(str(final)) is not None and (out / "metrics.jsonl").exists()


def test_an_evaluation_killed_mid_write_continues_where_it_stopped(tmp_path):
    import eval as E
    from test_eval import TINY_EVAL
    out = tmp_path / "ev"
    E.main(TINY_EVAL + ["--task", "sudoku", "--out-dir", str(out)])
    whole = [json.loads(line) for line in open(out / "generations.jsonl")]
    text = (out / "generations.jsonl").read_text()
    (out / "generations.jsonl").unlink()
    (out / "generations.rank0.jsonl").write_text(text[:len(text) - len(text.splitlines()[-1]) // 2 - 1])  # cut
    E.main(TINY_EVAL + ["--task", "sudoku", "--out-dir", str(out)])
    again = [json.loads(line) for line in open(out / "generations.jsonl")]
    key = lambda r: (r["idx"], r["generation"])
    assert sorted(map(key, again)) == sorted(map(key, whole))
