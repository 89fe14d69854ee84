import os

import pytest

import model as M
import rewards as R
from conftest import D1_SUDOKU_SYSTEM, FIXTURES
from data import countdown, load_task, sudoku


def test_there_are_288_distinct_valid_grids():
    grids = sudoku.all_grids()
    assert len(set(grids)) == 288
    for g in grids[:: 17]:
        rows = [g[r * 4:r * 4 + 4] for r in range(4)]
        cols = ["".join(row[c] for row in rows) for c in range(4)]
        boxes = [rows[r][c:c + 2] + rows[r + 1][c:c + 2] for r in (0, 2) for c in (0, 2)]
        assert all(sorted(u) == list("1234") for u in rows + cols + boxes)


def test_generated_puzzles_have_one_solution_and_the_requested_blanks():
    for split in ("train", "test"):
        for r in sudoku.generate(100, split, seed=3, min_blanks=7, max_blanks=9):
            assert sudoku.count_solutions(r["puzzle"]) == 1
            assert 7 <= r["puzzle"].count("0") <= 9
            assert all(p in ("0", s) for p, s in zip(r["puzzle"], r["solution"]))


def test_no_solution_grid_appears_in_both_splits():
    train, test = sudoku.split_grids()
    assert not set(train) & set(test) and len(train) + len(test) == 288
    tr = {r["solution"] for r in sudoku.generate(2000, "train", seed=0)}
    te = {r["solution"] for r in sudoku.generate(256, "test", seed=0)}
    assert tr and te and not tr & te
    assert te <= set(test)


def test_sudoku_generator_is_deterministic_for_a_seed():
    assert sudoku.generate(50, "train", seed=5) == sudoku.generate(50, "train", seed=5)
    assert sudoku.generate(50, "train", seed=5) != sudoku.generate(50, "train", seed=6)


def test_sudoku_csv_round_trip_in_d1_format(tmp_path):
    rows = sudoku.generate(5, "test", seed=1)
    sudoku.write_csv(rows, tmp_path / "s.csv")
    assert open(tmp_path / "s.csv").readline().strip() == "Puzzle,Solution"
    assert sudoku.read_csv(tmp_path / "s.csv") == rows


def test_countdown_generator_is_solvable_and_in_range():
    rows = countdown.generate(300, seed=0)
    assert rows == countdown.generate(300, seed=0)
    for r in rows:
        assert len(r["nums"]) == 3 and all(1 <= n <= 100 for n in r["nums"]) and 1 <= r["target"] <= 100
        assert R.safe_eval(r["solution"]) == pytest.approx(r["target"])
        assert sorted(R.numbers_in(r["solution"])) == sorted(r["nums"])


def reward_cols(ds):
    return {c: ds[c] for c in ds.column_names if c != "prompt"}


@pytest.mark.parametrize("task,kw,needed", [
    ("gsm8k", dict(split="test", data_path="gsm8k.jsonl"), {"answer"}),
    ("math", dict(split="test", data_path="math500.jsonl"), {"answer"}),
    ("math", dict(split="train", data_path="math_train.jsonl"), {"answer"}),
    ("countdown", dict(split="train", data_path="countdown.jsonl"), {"nums", "target"}),
    ("sudoku", dict(split="train", data_path="sudoku_d1.csv"), {"puzzle", "solution"}),
    ("sudoku", dict(split="test", n=4), {"puzzle", "solution"}),
    ("countdown", dict(split="test", n=4), {"nums", "target"}),
    ("s1k", dict(data_path="s1k.jsonl"), {"completion"}),
])
def test_each_task_loads_from_its_fixture_with_the_columns_its_rewards_need(task, kw, needed):
    if "data_path" in kw:
        kw = {**kw, "data_path": os.path.join(FIXTURES, kw["data_path"])}
    ds = load_task(task, **kw)
    assert len(ds) >= 2 and needed <= set(ds.column_names)
    msg = ds[0]["prompt"]
    assert msg[0]["role"] == "user" and msg[0]["content"]
    if task in R.REWARDS:  # every reward function runs on the loaded columns
        for fn, _ in R.REWARDS[task]:
            assert len(fn(ds["prompt"], ["<answer>x</answer>"] * len(ds), **reward_cols(ds))) == len(ds)


def test_math_train_answer_is_the_last_boxed_of_the_solution_and_gsm8k_strips_the_hashes():
    ds = load_task("math", "train", data_path=os.path.join(FIXTURES, "math_train.jsonl"))
    assert ds["answer"] == ["2", "\\frac{1}{2}"]
    ds = load_task("gsm8k", "test", data_path=os.path.join(FIXTURES, "gsm8k.jsonl"))
    assert ds["answer"] == ["72", "10", "2400"]


def test_d1_prompts_are_exact_and_compact_style_is_short():
    row = load_task("sudoku", "test", n=1)[0]  # against a hand transcription of d1's text, not the module constant
    assert row["prompt"][0]["content"] == D1_SUDOKU_SYSTEM + f"\n\nSolve the following Sudoku puzzle: {row['puzzle']}\n"
    compact = load_task("sudoku", "test", n=1, style="compact")[0]
    assert compact["prompt"][0]["content"] == f"sudoku {row['puzzle']}" and len(compact["prompt"][0]["content"]) < 30
    ev = load_task("gsm8k", "test", data_path=os.path.join(FIXTURES, "gsm8k.jsonl"))[0]["prompt"][0]["content"]
    assert ev.startswith("You are a math expert.") and ev.endswith("April and May?")
    tr = load_task("gsm8k", "train", data_path=os.path.join(FIXTURES, "gsm8k.jsonl"))[0]["prompt"][0]["content"]
    assert tr == ("\nRespond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n"
                  "\n\nNatalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                  "How many clips did Natalia sell altogether in April and May?")


def test_s1k_completion_format():
    row = load_task("s1k", data_path=os.path.join(FIXTURES, "s1k.jsonl"))[0]
    assert row["completion"] == "<reasoning>Two plus three is five.</reasoning>\n<answer>The answer is $\\boxed{5}$.</answer>"


def test_missing_hub_dataset_fails_at_once_naming_the_hub_id_and_the_flag(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(M.UsageError, match=r"(?s)'openai/gsm8k'.*--data-path"):
        load_task("gsm8k", "train")


def test_bad_task_name_is_rejected():
    with pytest.raises(ValueError, match="choose one of"):
        load_task("chess")


def test_blanks_flag_reaches_the_generator_for_sudoku_only():
    """--blanks MIN MAX (shared by sft.py, diffu_grpo.py and eval.py) sets the generated puzzles' difficulty."""
    import argparse
    from data import add_sudoku_args, sudoku_kwargs
    ap = argparse.ArgumentParser()
    add_sudoku_args(ap)
    args = ap.parse_args(["--blanks", "3", "4"])
    assert sudoku_kwargs("countdown", args.blanks) == {}
    rows = load_task("sudoku", "test", style="compact", n=40, **sudoku_kwargs("sudoku", args.blanks))
    assert {r["puzzle"].count("0") for r in rows} == {3, 4}
    default = ap.parse_args([])
    rows = load_task("sudoku", "test", style="compact", n=40, **sudoku_kwargs("sudoku", default.blanks))
    assert min(r["puzzle"].count("0") for r in rows) >= 6 and max(r["puzzle"].count("0") for r in rows) <= 10


def test_sudoku_x_puzzles_need_the_diagonals_and_keep_the_test_grids_held_out():
    """rules="x": the solution is a Sudoku X grid (both diagonals hold 1-4), the only one under the X rules, and the
    plain rules leave at least two solutions, so that a plain Sudoku label cannot teach what solves it."""
    from data import sudoku as S
    train, test = S.split_grids()
    for split, grids in (("train", set(train)), ("test", set(test))):
        rows = S.generate(40, split, seed=1, min_blanks=4, max_blanks=7, rules="x")
        for r in rows:
            p, s = r["puzzle"], r["solution"]
            assert s in grids and all(sorted(s[i] for i in d) == list("1234") for d in S.DIAGONALS)
            assert S.check_puzzle(p, s) is None and 4 <= p.count("0") <= 7
            assert S.count_solutions(p, "x") == 1 and S.count_solutions(p) >= 2
    assert sum(all(len({g[i] for i in d}) == 4 for d in S.DIAGONALS) for g in S.all_grids()) == 48
    with pytest.raises(ValueError):
        S.generate(1, rules="x", min_blanks=3, max_blanks=6)
