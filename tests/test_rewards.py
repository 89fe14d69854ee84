import random
import time

import pytest

import rewards as R
import scoring as S

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
    rows = {"gsm8k": {"answer": "#### 72"}, "math": {"answer": "\\frac{1}{2}"},
            "countdown": {"nums": [44, 19, 35], "target": 98},
            "sudoku": {"puzzle": "1030020040000301", "solution": "1432324141232314"}}
    fns += [(f"score {task} {s}", lambda t, task=task, row=row, s=s: S.score(task, t, row, s)["correct"])
            for task, row in rows.items() for s in ("d1", "ours")]
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
