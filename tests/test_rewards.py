import random
import time

import pytest

import rewards as R

GOOD = "<reasoning>\nthink\n</reasoning>\n<answer>\n72\n</answer>\n"


def one(fn, text, **cols):
    return fn(["p"], [text], **{k: [v] for k, v in cols.items()})[0]


def test_gsm8k_rewards_on_a_perfect_completion():
    assert one(R.xmlcount_reward_func, GOOD) == pytest.approx(0.5)
    assert one(R.soft_format_reward_func, GOOD) == 0.5
    assert one(R.strict_format_reward_func, GOOD) == 0.5
    assert one(R.int_reward_func, GOOD) == 0.5
    assert one(R.correctness_reward_func, GOOD, answer="72") == 2.0
    assert one(R.correctness_reward_func, GOOD, answer="71") == 0.0


def test_xmlcount_penalises_trailing_text_and_strict_vs_soft_format():
    trailing = GOOD + "extra words"  # 11 characters after the closing tag line
    assert one(R.xmlcount_reward_func, trailing) == pytest.approx(0.5 - 0.011 - 0.011)
    soft_only = "<reasoning>x</reasoning> <answer>7</answer>"
    assert one(R.soft_format_reward_func, soft_only) == 0.5
    assert one(R.strict_format_reward_func, soft_only) == 0.0
    assert one(R.soft_format_reward_func, "no tags") == 0.0
    assert one(R.int_reward_func, "<answer>\n7.5\n</answer>") == 0.0


def test_completions_as_chat_messages_are_accepted():
    msgs = [{"role": "assistant", "content": GOOD}]
    assert R.correctness_reward_func(["p"], [msgs], answer=["72"]) == [2.0]


def test_math_rewards():
    c = "<reasoning>\nx\n</reasoning>\n<answer>\n\\boxed{\\frac{1}{2}}\n</answer>"
    assert one(R.math_correctness_reward_func, c, answer="0.5") == 2.0
    assert one(R.math_correctness_reward_func, c, answer="\\frac12") == 2.0
    assert one(R.math_correctness_reward_func, c, answer="1/3") == 0.0
    assert one(R.boxed_in_answer_reward_func, c) == 0.5
    assert one(R.boxed_in_answer_reward_func, "\\boxed{2} <answer>2</answer>") == 0.0


@pytest.mark.parametrize("a,b", [("\\frac12", "\\frac{1}{2}"), ("0.5", "\\frac{1}{2}"), ("x = 3", "3"),
                                 ("5 \\text{ cm}", "5"), ("90^\\circ", "90"), ("\\dfrac{3}{4}", "3/4"),
                                 ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"), ("50\\%", "50"),
                                 ("\\sqrt3", "\\sqrt{3}"), (".5", "\\frac{1}{2}"), ("\\$10", "10")])
def test_math_normalisation_equivalences(a, b):
    assert R.math_equiv(a, b)


def test_math_normalisation_keeps_different_answers_apart():
    assert not R.math_equiv("\\frac{1}{3}", "\\frac{1}{2}")
    assert not R.math_equiv("x = 3", "4")


@pytest.mark.parametrize("text,reward", [
    ("no answer tag", 0.0),
    ("<answer>44 + 19 + 35</answer>", 1.0),
    ("<answer>\n(44 + 19) + 35\n</answer>", 1.0),
    ("<answer>44 + 19 - 35</answer>", 0.1),  # right numbers, wrong value
    ("<answer>44 + 54</answer>", 0.1),  # wrong numbers
    ("<answer>44 + 19 + 35 = 98</answer>", 0.1),  # extra number (98)
    ("<answer>44 ** 19 ** 35</answer>", 0.1),  # power is invalid (and cannot hang)
    ("<answer>44 + 19 + x35</answer>", 0.1),  # forbidden character
    ("<answer>1</answer> then <answer>44+19+35</answer>", 1.0),  # the last answer counts
])
def test_countdown_reward(text, reward):
    assert one(R.countdown_reward_func, text, nums=[44, 19, 35], target=98) == pytest.approx(reward)


def test_sudoku_reward_pads_cuts_and_scores_blank_cells_only():
    puzzle, sol = "1030020040000301", "1432324141232314"
    blanks = puzzle.count("0")
    assert one(R.sudoku_reward_func, f"<answer>\n{sol}\n</answer>", puzzle=puzzle, solution=sol) == 1.0
    assert one(R.sudoku_reward_func, "no tag", puzzle=puzzle, solution=sol) == 0.0
    assert one(R.sudoku_reward_func, "<answer>1432</answer>", puzzle=puzzle, solution=sol) == pytest.approx(2 / blanks)
    assert one(R.sudoku_reward_func, f"<answer>{sol}9999</answer>", puzzle=puzzle, solution=sol) == 1.0
    assert one(R.sudoku_reward_func, "<answer>1 4 3 2 3 2 4 1</answer>", puzzle=puzzle,
               solution=sol) == pytest.approx(5 / blanks)


def test_safe_eval():
    assert R.safe_eval("(1 + 2) * 3 - 4 / 2") == 7.0
    assert R.safe_eval("-3 + +2") == -1.0
    assert R.safe_eval("1/0") is None
    assert R.safe_eval("2**3") is None
    assert R.safe_eval("(1+2") is None
    assert R.safe_eval("1 2") is None
    assert R.safe_eval("") is None
    assert R.safe_eval("9" * 30) is None
    assert R.safe_eval("(" * 100 + "1" + ")" * 100) is None


def test_gsm8k_scoring_boxed_first_then_answer_fallbacks():
    assert R.score_gsm8k("so \\boxed{72} and \\boxed{5}", "#### 72")["correct"]
    assert R.score_gsm8k("\\boxed{x} \\boxed{72}", "#### 72")["correct"]  # first box that parses
    assert R.score_gsm8k("\\boxed{72 clips}", "#### 72")["correct"]  # first number inside the box
    assert R.score_gsm8k("<answer>1,200</answer>", "#### 1,200")["correct"]
    assert R.score_gsm8k("<answer>she sold 10 then 72</answer>", "#### 72")["correct"]  # last number
    assert not R.score_gsm8k("72", "#### 72")["correct"]  # no box, no answer tag
    assert not R.score_gsm8k("\\boxed{71}", "#### 72")["correct"]


def test_math_scoring_last_box_then_answer_tag():
    assert R.score_math("\\boxed{1} then \\boxed{\\frac{1}{2}}", "0.5")["correct"]
    assert R.score_math("<answer> 3 </answer>", "3")["correct"]
    assert R.score_math("\\boxed{\\frac{a}{\\sqrt{b}}}", "\\frac{a}{\\sqrt{b}}")["extracted"] == "\\frac{a}{\\sqrt{b}}"


def test_countdown_scoring():
    assert R.score_countdown("\\boxed{44 + 19 + 35}", [44, 19, 35], 98)["correct"]
    assert R.score_countdown("<answer>44 + 19 + 35 = 98</answer>", [44, 19, 35], 98)["correct"]
    assert R.score_countdown("(44 \\times 1) + 19 + 35", [44, 19, 35, 1], 98)["correct"]  # whole text
    assert not R.score_countdown("<answer>44 + 19</answer>", [44, 19, 35], 98)["correct"]


def test_sudoku_scoring_fallback_chain():
    p, s = "1030020040000301", "1432324141232314"
    assert R.parse_sudoku(f"<answer>\n```\n{s}\n```\n</answer>") == s
    assert R.parse_sudoku(f"<answer>\n{s}<|eot_id|>") == s
    assert R.parse_sudoku(f"blah </answer> {s}") == s
    assert R.parse_sudoku(f"the grid is {s}. done") == s
    assert R.parse_sudoku("<answer>1432 3241</answer>") == "1432324100000000"
    r = R.score_sudoku(f"<answer>{s}</answer>", p, s)
    assert r["correct_cells"] == r["blank_cells"] == p.count("0") and r["correct"]


ADVERSARIAL = ["", "9**9**9**9", "<answer>9**9**9**9</answer>", "(" * 10_000 + ")" * 10_000,
               "<answer>" + "(" * 5000 + "1" + ")" * 5000 + "</answer>", "1" * 1_000_000,
               "<answer>" + "1" * 1_000_000 + "</answer>", "\\boxed{" * 3000, "\\boxed{" + "{" * 5000,
               "<answer>" * 20_000, "\u202e\u0000\ud7ff漢字🙂" * 1000, "<reasoning>" * 10_000 + "</answer>",
               "\\frac" * 10_000, "<answer>1/0</answer>", "<answer>" + "1+" * 10_000 + "1</answer>",
               "\\boxed{" + "9" * 500_000 + "}", "#### " + "9" * 100_000]


def _all_scorers():
    cols = dict(answer=["72"], nums=[[44, 19, 35]], target=[98], puzzle=["1030020040000301"],
                solution=["1432324141232314"])
    fns = [(fn.__name__, lambda t, fn=fn: fn(["p"], [t], **cols)[0]) for fs in R.REWARDS.values() for fn, _ in fs]
    fns += [("score_gsm8k", lambda t: R.score_gsm8k(t, "#### 72")["correct"]),
            ("score_math", lambda t: R.score_math(t, "\\frac{1}{2}")["correct"]),
            ("score_countdown", lambda t: R.score_countdown(t, [44, 19, 35], 98)["correct"]),
            ("score_sudoku", lambda t: R.score_sudoku(t, "1030020040000301", "1432324141232314")["correct_cells"])]
    return fns


def test_fuzz_every_reward_and_scorer_returns_fast_and_never_raises():
    rng = random.Random(0)
    alphabet = list("0123456789+-*/(). =\n\\{}<>abx#,") + ["<answer>", "</answer>", "\\boxed{", "**", "<reasoning>\n"]
    texts = list(ADVERSARIAL) + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300)))
                                 for _ in range(2000)]
    for name, f in _all_scorers():
        worst = 0.0
        for t in texts:
            t0 = time.perf_counter()
            v = f(t)
            worst = max(worst, time.perf_counter() - t0)
            assert isinstance(v, (float, int, bool)), (name, t[:50])
        assert worst < 0.05, f"{name}: slowest input took {worst * 1000:.1f} ms"
