"""Evaluation scoring: d1's parser bug for bug, ours with its quirks fixed, and d1's evaluation items and prompts."""
import os
import random
import re

import numpy as np
import pytest

import model as M
import scoring as S
from conftest import ARCH, D1_SUDOKU_SYSTEM, FIXTURES, llada_only
from data.d1_eval import D1_FILES, load_d1_eval
from sample import render_prompts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUDOKU_ROW = {"puzzle": "1030020040000301", "solution": "1432324141232314"}


def ours_gsm8k(text, answer):
    return S.score("gsm8k", text, {"answer": answer}, "ours")


def ours_math(text, answer):
    return S.score("math", text, {"answer": answer}, "ours")


def ours_countdown(text, nums, target):
    return S.score("countdown", text, {"nums": nums, "target": target}, "ours")


def ours_sudoku(text, puzzle, solution):
    return S.score("sudoku", text, {"puzzle": puzzle, "solution": solution}, "ours")


def test_gsm8k_scoring_boxed_first_then_answer_fallbacks():
    assert ours_gsm8k("so \\boxed{72} and \\boxed{5}", "#### 72")["correct"]
    assert ours_gsm8k("\\boxed{x} \\boxed{72}", "#### 72")["correct"]  # first box that parses
    assert ours_gsm8k("\\boxed{72 clips}", "#### 72")["correct"]  # first number inside the box
    assert ours_gsm8k("<answer>1,200</answer>", "#### 1,200")["correct"]
    assert ours_gsm8k("<answer>she sold 10 then 72</answer>", "#### 72")["correct"]  # last number
    assert not ours_gsm8k("72", "#### 72")["correct"]  # no box, no answer tag
    assert not ours_gsm8k("\\boxed{71}", "#### 72")["correct"]


def test_math_scoring_last_box_then_answer_tag():
    assert ours_math("\\boxed{1} then \\boxed{\\frac{1}{2}}", "0.5")["correct"]
    assert ours_math("<answer> 3 </answer>", "3")["correct"]
    assert ours_math("\\boxed{\\frac{a}{\\sqrt{b}}}", "\\frac{a}{\\sqrt{b}}")["extracted"] == "\\frac{a}{\\sqrt{b}}"


def test_countdown_scoring():
    assert ours_countdown("\\boxed{44 + 19 + 35}", [44, 19, 35], 98)["correct"]
    assert ours_countdown("<answer>44 + 19 + 35 = 98</answer>", [44, 19, 35], 98)["correct"]
    assert ours_countdown("(44 \\times 1) + 19 + 35", [44, 19, 35, 1], 98)["correct"]  # whole text
    assert not ours_countdown("<answer>44 + 19</answer>", [44, 19, 35], 98)["correct"]


def test_sudoku_scoring_fallback_chain():
    p, s = "1030020040000301", "1432324141232314"
    assert S.parse_sudoku(f"<answer>\n```\n{s}\n```\n</answer>") == s
    assert S.parse_sudoku(f"<answer>\n{s}<|eot_id|>") == s
    assert S.parse_sudoku(f"blah </answer> {s}") == s
    assert S.parse_sudoku(f"the grid is {s}. done") == s
    assert S.parse_sudoku("<answer>1432 3241</answer>") == "1432324100000000"
    r = ours_sudoku(f"<answer>{s}</answer>", p, s)
    assert r["correct_cells"] == r["blank_cells"] == p.count("0") and r["correct"]

# -----------------------------------------------------------------------------
# d1's parser against hand-worked cases (each traced by hand through d1's parse_and_get_acc.py logic)


@pytest.mark.parametrize("text,answer,expected", [
    ("\\boxed{72}", "#### 72", 72.0),
    ("\\boxed{...} then \\boxed{72}", "72", 72.0),  # "..." is skipped
    ("\\boxed{72 clips}", "72", 72.0),  # first number of the first box with one
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),  # no brace matching: the content is "\frac{1"
    ("\\boxed{7\n2}", "72", None),  # '.' does not cross a newline: no box match, no <answer>
    ("<answer> 3.5 </answer>", "3.5", 3.5),
    ("<answer>10 then 72</answer>", "72", 72.0),  # the last number of the block
    ("72", "72", None),
])
def test_d1_gsm8k_parser_by_hand(text, answer, expected):
    assert S.d1_parse_gsm8k(text) == expected


def test_d1_math_parser_takes_the_last_box_the_spaced_form_first_and_else_the_whole_text():
    assert S.d1_parse_math("\\boxed{1} and \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert S.d1_parse_math("\\boxed 5$ then \\boxed{7}") == "5"  # "\boxed " anywhere wins
    assert S.d1_parse_math("so \\fbox{4}") == "\\fbox{4}"  # found, but remove_boxed strips only \boxed
    assert S.d1_parse_math("no box <answer>3</answer>") == "no box <answer>3</answer>"  # the whole text
    assert S.d1_parse_math("\\boxed{3 <answer>4</answer>") == "4"  # unclosed box -> None -> <answer>
    assert S.d1_is_equiv(None, None) and not S.d1_is_equiv("3", None)
    assert S.d1_is_equiv("\\sqrt", "\\sqrt")  # normalisation raises (trailing \sqrt): raw equality
    assert not S.d1_is_equiv("50%", "50") and S.d1_is_equiv("50\\%", "50")


def test_d1_countdown_parser_cuts_at_equals_and_scores_with_python_semantics():
    row = {"nums": [44, 19, 35], "target": 98}
    for text, correct in [("\\boxed{44 + 19 + 35 = 98}", True), ("\\boxed{(44 + 19) \\times 1 + 35}", False),
                          ("\\boxed{44 + 19 - 35}", False), ("\\boxed{35+19+44}", True), ("44+19+35", True)]:
        assert S.score("countdown", text, row, "d1")["correct"] is correct, text
    assert S.d1_parse_countdown("\\boxed{44+19+35 <answer>9</answer>") == "9"  # unclosed box -> <answer>
    assert S.score("countdown", "\\boxed{2**3**1*1}", {"nums": [2, 3, 1, 1], "target": 8}, "d1")["correct"]
    # -2**2 is -(2**2) in Python: 4, not 12
    assert not S.score("countdown", "\\boxed{-2**2+8}", {"nums": [2, 2, 8], "target": 12}, "d1")["correct"]


def test_sudoku_text_after_answer_stops_at_special_tokens():
    """`</answer>` followed directly by `<|eot_id|>`: the text after it is empty, so both parsers go on to the
    16-digit patterns (d1's lazy pattern stops at the special token)."""
    text = "<reasoning>the grid is 1432324141232314</reasoning>\n<answer>\n</answer><|eot_id|><|endoftext|>"
    for scoring in ("d1", "ours"):
        r = S.score("sudoku", text, SUDOKU_ROW, scoring)
        assert r["extracted"] == "1432324141232314" and r["correct"], scoring


# -----------------------------------------------------------------------------
# The difference table of docs/scoring.md: every row, both modes

DIFFERENCES = [
    ("gsm8k", "so \\boxed{6,277}", {"answer": "#### 6,277"}, False, True),
    ("gsm8k", "\\boxed{x = 5} so \\boxed{18}", {"answer": "18"}, False, True),
    ("gsm8k", "<answer>1,200</answer>", {"answer": "1200"}, False, True),
    ("math", "<answer>3</answer>", {"answer": "3"}, False, True),
    ("math", "\\boxed{50%}", {"answer": "50"}, False, True),
    ("countdown", "<answer>44+19+35</answer>", {"nums": [44, 19, 35], "target": 98}, False, True),
    ("countdown", "\\boxed{2**3*1}", {"nums": [2, 3, 1], "target": 8}, True, False),
    ("countdown", "\\boxed{07+1+2}", {"nums": [7, 1, 2], "target": 10}, False, True),
    ("sudoku", "answer_1432324141232314", SUDOKU_ROW, False, True),
]


@pytest.mark.parametrize("task,text,row,d1,ours", DIFFERENCES)
def test_documented_differences_between_d1s_parser_and_ours(task, text, row, d1, ours):
    assert S.score(task, text, row, "d1")["correct"] is d1
    assert S.score(task, text, row, "ours")["correct"] is ours
    assert f"`{text}`" in open(os.path.join(ROOT, "docs", "scoring.md")).read()


# -----------------------------------------------------------------------------
# The linear scans find what d1's regexes find


def _random_texts(n, seed=0):
    rng = random.Random(seed)
    alphabet = list("0123456789 =+-*/().\n{}x_") + ["\\boxed{", "<answer>", "</answer>", "```", "<|eot_id|>",
                                                      "<|endoftext|>", "1432324141232314", "\\boxed "]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(n)]


def _d1_sudoku_by_regex(text):
    pats = [r"<answer>.*?```\s*([\d\s]+)```", r"<answer>(.*?)(?:<\|eot_id\|>|<\|endoftext\|>|</answer>)",
            r"</answer>\s*(.*?)(?:<\|eot_id\|>|<\|endoftext\|>|$)", r".*?(\d{16})\s*</answer>", r"\b(\d{16})\b"]
    for p in pats:
        m = re.search(p, text, re.DOTALL)
        if m and m.group(1).strip():
            return m.group(1)
    return ""


def test_linear_scans_equal_d1s_regexes_on_random_text():
    for t in _random_texts(3000):
        assert S.d1_boxed_lazy(t) == re.findall(r"\\boxed{(.*?)}", t), t
        m = re.search(r"([0-9+\-*/() ]+)=[0-9. ]+", t)
        assert S._d1_equation_before_equals(t) == (m.group(1) if m else None), t
        assert re.sub(r"\s", "", S._d1_sudoku_answer(t)) == re.sub(r"\s", "", _d1_sudoku_by_regex(t)), t


# -----------------------------------------------------------------------------
# d1's evaluation items and prompts


def test_d1s_two_test_files_load_with_d1s_subset_and_order():
    sudoku = load_d1_eval("sudoku")
    with open(D1_FILES["sudoku"]) as f:
        file_rows = [line.strip().split(",") for line in f][1:]
    assert len(file_rows) == 500 and len(sudoku) == 256
    np.random.seed(42)
    chosen = np.random.choice(500, 256, replace=False)
    assert [r["puzzle"] for r in sudoku] == [file_rows[i][0] for i in chosen]
    assert all(r["puzzle"].count("0") == 8 for r in sudoku)
    countdown = load_d1_eval("countdown")
    assert len(countdown) == 256 and all(len(r["nums"]) == 3 for r in countdown)
    np.random.seed(42)
    perm = np.random.choice(256, 256, replace=False)
    first_line = open(D1_FILES["countdown"]).readline()  # {"input": "30,100,93", "output": "23"}
    assert countdown[int(np.where(perm == 0)[0][0])]["question"] == "Numbers: [30, 100, 93]\nTarget: 23"
    assert '"30,100,93"' in first_line


def test_d1_subset_of_a_fixture_file_follows_numpys_seeded_choice(tmp_path):
    from data import sudoku
    pairs = list({r["puzzle"]: r["solution"] for r in sudoku.generate(800, seed=3)}.items())[:500]
    rows = [p for p, _ in pairs]  # 500 distinct valid puzzles (rows are checked when read)
    path = tmp_path / "s.csv"
    path.write_text("Puzzle,Solution\n" + "\n".join(f"{p},{s}" for p, s in pairs) + "\n")
    got = [r["puzzle"] for r in load_d1_eval("sudoku", str(path))]
    np.random.seed(42)
    assert got == [rows[i] for i in np.random.choice(500, 256, replace=False)]


HEAD = "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n"
TAIL = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n<reasoning>"
FORMAT = ("Respond in the following format:\n<reasoning>\nYour reasoning here\n</reasoning>\n<answer>\n\\boxed{...}\n"
          "</answer>")


@llada_only
def test_input_text_of_each_task_is_d1s_prompt_exactly():
    """Hand-written from d1's evaluation prompts (the tiny tokenizer's chat template renders as LLaDA's: BOS, the
    user turn trimmed, <|eot_id|>, the assistant header, then the prefill)."""
    tok = M.tiny_tokenizer(ARCH)
    gsm = load_d1_eval("gsm8k", os.path.join(FIXTURES, "gsm8k.jsonl"))[0]
    math = load_d1_eval("math", os.path.join(FIXTURES, "math500.jsonl"))[0]
    cd = load_d1_eval("countdown")[0]
    sd = load_d1_eval("sudoku")[0]
    expected = {
        "gsm8k": HEAD + "You are a math expert. You will be given a question to solve. Solve it step by step. Wrap "
                        "the final answer in a \\boxed{}. \n" + FORMAT + "\n\n" + gsm["question"] + TAIL,
        "math": HEAD + "You are a math expert. You will be given a question to solve. Solve it step by step. Wrap "
                       "the final answer in a \\boxed{}.\n" + FORMAT + "\" \n\n\n" + math["question"] + TAIL,
        "countdown": HEAD + "Using only the provided numbers, create an arithmetic expression that evaluates to "
                            "exactly the provided target number. You may use the operations +, -, *, and / as needed, "
                            "but each number must be used exactly once. Think step-by-step. After reasoning, provide "
                            "only your final expression inside \\boxed{} tags without including an equals sign or the "
                            "target number. For example: \\boxed{a + b * c}" + FORMAT + "\n\n" + cd["question"] + TAIL,
        "sudoku": HEAD + D1_SUDOKU_SYSTEM.lstrip() + "\n\nSolve the following Sudoku puzzle: " + sd["puzzle"] + TAIL,
    }
    for task, row in [("gsm8k", gsm), ("math", math), ("countdown", cd), ("sudoku", sd)]:
        assert render_prompts(tok, [row["prompt"]], "<reasoning>")[0] == expected[task], task
    assert gsm["question"].startswith("Natalia sold clips")
