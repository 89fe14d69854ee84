"""
The rewards diffu-GRPO trains on, for the four d1 tasks, and the extraction helpers (answer blocks, boxed
contents, a bounded arithmetic evaluator, MATH answer normalisation) that evaluation scoring reuses.

Reward functions have TRL's signature
    f(prompts, completions, **dataset_columns) -> list[float]
where a completion is a string or a chat-message list ([{"role": "assistant", "content": ...}]). They are pure:
no printing, no global state, and they cannot hang: arithmetic goes through a small bounded parser (never eval), and
every input string, however hostile, returns a float.

Evaluation scoring (d1's parser and ours) lives in scoring.py and reuses the extraction helpers below.

    python rewards.py --task sudoku --puzzle 2403132442010140 --solution 2413132442313142 \
        --completion "<answer>2413132442313142</answer>"                # every reward of the task, and their sum
    python rewards.py --task gsm8k --answer 72 --completion "<reasoning>...</reasoning><answer>72</answer>"
"""

import math
import re

from config import Parser

MAX_CHARS = 20_000  # completions are at most a few thousand characters; longer inputs are cut (keeps regexes O(1))


def text_of(completion):
    """A completion as TRL passes it (a string, or a list of chat messages) -> its text."""
    if isinstance(completion, str):
        s = completion
    elif isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
        s = str(completion[-1].get("content", ""))
    else:
        s = str(completion)
    return s[:MAX_CHARS]


def extract_xml_answer(text):
    """The text between the last <answer> and the following </answer> (or the end), stripped."""
    return text.split("<answer>")[-1].split("</answer>")[0].strip()


def answer_blocks(text):
    """Contents of every <answer>...</answer>, as re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL) returns
    them, but by str.find: linear even for thousands of unclosed <answer> tags (the regex is quadratic there)."""
    out, pos = [], 0
    while True:
        i = text.find("<answer>", pos)
        j = -1 if i < 0 else text.find("</answer>", i + 8)
        if j < 0:
            return out
        out.append(text[i + 8:j])
        pos = j + 9


def last_answer_block(text):
    """Content of the last complete <answer>...</answer>, or None."""
    blocks = answer_blocks(text)
    return blocks[-1] if blocks else None


def first_answer_block(text):
    """Content of the first complete <answer>...</answer> (what re.search finds), or None."""
    i = text.find("<answer>")
    j = -1 if i < 0 else text.find("</answer>", i + 8)
    return None if j < 0 else text[i + 8:j]


def boxed_contents(text):
    """Contents of every \\boxed{...} (and \\fbox{...}) in order, with braces matched (so \\boxed{\\frac{1}{2}}
    gives \\frac{1}{2}); an unbalanced box is ignored. One pass with a stack finds every brace's partner, so the
    cost is linear even for thousands of nested, unclosed boxes."""
    close, stack = {}, []
    for i, ch in enumerate(text):
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            close[stack.pop()] = i
    out = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        j = close.get(m.end() - 1)
        if j is not None:
            out.append(text[m.end():j])
    return out


# -----------------------------------------------------------------------------
# A bounded arithmetic evaluator: numbers, + - * /, unary +/-, parentheses (and, for d1's evaluation scorer only,
# Python's '**'). Limits on length, nesting depth and magnitude; division by zero and anything else give None.
# Never eval().

MAX_EXPR_LEN, MAX_DEPTH, MAX_ABS = 200, 32, 1e15
_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d*)?|\.\d+)|(\*\*|.))")


def _tokens(expr, python_power):
    """'(30-5)*2' -> ['(', 30.0, '-', 5.0, ')', '*', 2.0]; None if a character or number is not accepted."""
    tokens = []
    for num, op in _TOKEN.findall(expr):
        if num:
            if len(num) > 20 or (python_power and re.fullmatch(r"0+[1-9]\d*", num)):
                return None  # absurdly long, or Python 3's syntax error for '07'
            tokens.append(float(num))
        elif op in ("+", "-", "*", "/", "(", ")") or (op == "**" and python_power):
            tokens.append(op)
        elif op.strip():
            return None
    return tokens


class _Parser:
    """Recursive descent over the tokens, Python's precedence:
        expr := term (('+'|'-') term)*      term := unary (('*'|'/') unary)*
        unary := ('+'|'-') unary | power   power := atom ['**' unary]   atom := number | '(' expr ')'
    Every intermediate result is checked against MAX_ABS; nesting is bounded by MAX_DEPTH."""

    def __init__(self, tokens):
        self.tokens, self.pos = tokens, 0

    def peek(self):
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self):
        self.pos += 1
        return self.tokens[self.pos - 1]

    def expr(self, depth):
        v = self.term(depth)
        while self.peek() in ("+", "-"):
            op, w = self.take(), self.term(depth)
            v = _check(v + w if op == "+" else v - w)
        return v

    def term(self, depth):
        v = self.unary(depth)
        while self.peek() in ("*", "/"):
            op, w = self.take(), self.unary(depth)
            if op == "/" and w == 0:
                raise ValueError("division by zero")
            v = _check(v * w if op == "*" else v / w)
        return v

    def unary(self, depth):
        if depth > MAX_DEPTH:
            raise ValueError("too deep")
        if self.peek() in ("+", "-"):
            v = -1.0 if self.take() == "-" else 1.0
            return v * self.unary(depth + 1)
        return self.power(depth)

    def power(self, depth):  # right-associative; binds tighter than a unary minus on its left, as in Python
        v = self.atom(depth)
        if self.peek() != "**":
            return v
        self.take()
        w = self.unary(depth + 1)
        if (v == 0 and w < 0) or (v < 0 and w != int(w)):
            raise ValueError("division by zero or complex result")
        if abs(v) > 1 and w * math.log10(abs(v)) > 15:
            raise ValueError("too large")
        return _check(v ** w)

    def atom(self, depth):
        t = self.peek()
        if isinstance(t, float):
            return self.take()
        if t != "(":
            raise ValueError("unexpected token")
        self.take()
        v = self.expr(depth + 1)
        if self.peek() != ")":
            raise ValueError("unbalanced")
        self.take()
        return v


def _check(v):
    if abs(v) > MAX_ABS:
        raise ValueError("too large")
    return v


def safe_eval(expr, python_power=False):
    """Value of an arithmetic expression as a float, or None if it is not one we accept. By default '**' is
    invalid (the prompt offers + - * / only, and d1's eval of it can hang its trainer). python_power=True scores as
    Python's eval would where eval terminates: '**' binds tighter than unary minus and is right-associative, a
    result beyond MAX_ABS is None (far from any target), and an integer literal with a leading zero ('07') is a
    syntax error, as in Python 3."""
    if not isinstance(expr, str) or len(expr) > MAX_EXPR_LEN:
        return None
    tokens = _tokens(expr, python_power)
    if not tokens:
        return None
    parser = _Parser(tokens)
    try:
        v = parser.expr(0)
        return v if parser.pos == len(tokens) else None
    except (ValueError, RecursionError, OverflowError, ZeroDivisionError):
        return None


def numbers_in(expr):
    """Integers written in an expression, e.g. '(30-5)*2' -> [30, 5, 2]; None if one is absurdly long."""
    found = re.findall(r"\d+", expr)
    if any(len(n) > 15 for n in found):
        return None
    return [int(n) for n in found]


# -----------------------------------------------------------------------------
# GSM8K rewards (d1 sums all five): format shaping + integer + correctness.


def xmlcount_reward_func(prompts, completions, **kw):
    """0.125 for each tag line present exactly once; minus 0.001 per character of trailing text after the answer."""
    out = []
    for c in completions:
        t = text_of(c)
        r = 0.0
        if t.count("<reasoning>\n") == 1:
            r += 0.125
        if t.count("\n</reasoning>\n") == 1:
            r += 0.125
        if t.count("\n<answer>\n") == 1:
            r += 0.125
            r -= len(t.split("\n</answer>\n")[-1]) * 0.001
        if t.count("\n</answer>") == 1:
            r += 0.125
            r -= (len(t.split("\n</answer>")[-1]) - 1) * 0.001
        out.append(r)
    return out


def soft_format_reward_func(prompts, completions, **kw):
    pat = re.compile(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>", re.DOTALL)
    return [0.5 if pat.match(text_of(c)) else 0.0 for c in completions]


def strict_format_reward_func(prompts, completions, **kw):
    """The whole completion is exactly <reasoning>\\n...\\n</reasoning>\\n<answer>\\n...\\n</answer>\\n."""
    pat = re.compile(r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$", re.DOTALL)
    return [0.5 if pat.match(text_of(c)) else 0.0 for c in completions]


def int_reward_func(prompts, completions, **kw):
    return [0.5 if extract_xml_answer(text_of(c)).isdigit() else 0.0 for c in completions]


def correctness_reward_func(prompts, completions, answer, **kw):
    """2.0 if the <answer> text equals the reference answer string."""
    return [2.0 if extract_xml_answer(text_of(c)) == str(a).strip() else 0.0 for c, a in zip(completions, answer)]


# -----------------------------------------------------------------------------
# MATH rewards and the standard MATH answer normalisation (Hendrycks et al. 2021).


def _fix_fracs(s, d1=False):
    """\\frac12 -> \\frac{1}{2}, \\frac1{2} -> \\frac{1}{2}. d1 (MATH's original): an empty piece after
    \\frac raises (IndexError), a one-character piece returns the input unchanged."""
    parts = s.split("\\frac")
    out = parts[0]
    for p in parts[1:]:
        out += "\\frac"
        if d1 and (p[0] != "{" and len(p) < 2):  # p[0] raises on an empty piece, as in the original
            return s
        if p.startswith("{") or len(p) < 2:
            out += p
            continue
        a, b, rest = p[0], p[1], p[2:]
        out += "{" + a + "}" + (b + rest if b == "{" else "{" + b + "}" + rest)
    return out


def _fix_a_slash_b(s, d1=False):
    """'3/4' -> \\frac{3}{4} for integers; d1 (MATH's original): int() of a non-integer side raises."""
    if s.count("/") != 1:
        return s
    a, b = s.split("/")
    if d1:
        a, b = int(a), int(b)  # ValueError propagates: is_equiv then compares the raw strings
        return "\\frac{" + str(a) + "}{" + str(b) + "}" if s == f"{a}/{b}" else s
    if re.fullmatch(r"-?\d{1,15}", a) and re.fullmatch(r"\d{1,15}", b):
        return "\\frac{" + str(int(a)) + "}{" + str(int(b)) + "}"
    return s


def _fix_sqrt(s, d1=False):
    """\\sqrt3 -> \\sqrt{3}. d1 (MATH's original): any one character is wrapped, and a trailing \\sqrt raises."""
    if not d1:
        return re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    parts = s.split("\\sqrt")
    return parts[0] + "".join("\\sqrt" + p if p[0] == "{" else "\\sqrt{" + p[0] + "}" + p[1:] for p in parts[1:])


def strip_math_answer(s, d1=False):
    """The standard MATH answer normalisation (Hendrycks et al. 2021), step by step. d1=True is the original
    exactly as d1's evaluation runs it, raising where it raises (is_equiv then falls back to raw equality); ours
    also drops a plain '%' (the original's second replace is of "\\%" again) and never raises."""
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac").replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "")
    if "\\text{ " in s:  # units on the right: "5 \text{ cm}" -> "5 "
        if d1 and s.count("\\text{ ") != 1:
            raise ValueError("the original asserts a single \\text{ ")
        s = s.split("\\text{ ")[0]
    s = s.replace("\\%", "") if d1 else s.replace("\\%", "").replace("%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    if len(s.split("=")) == 2 and len(s.split("=")[0]) <= 2:  # "x = 3" -> "3"
        s = s.split("=")[1]
    s = _fix_sqrt(s, d1).replace(" ", "")
    s = _fix_fracs(s, d1)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s, d1)


def math_equiv(a, b):
    """Ours: equal after normalisation; None is never equivalent."""
    if a is None or b is None:
        return False
    return strip_math_answer(str(a)) == strip_math_answer(str(b))


def last_boxed(text):
    b = boxed_contents(text)
    return b[-1] if b else None


def math_correctness_reward_func(prompts, completions, answer, **kw):
    """2.0 if the last \\boxed{} of the completion is equivalent to the reference answer."""
    return [2.0 if math_equiv(last_boxed(text_of(c)), a) else 0.0 for c, a in zip(completions, answer)]


def boxed_in_answer_reward_func(prompts, completions, **kw):
    """0.5 when a \\boxed{} sits inside the <answer> tags (d1's MATH format reward)."""
    out = []
    for c in completions:
        block = last_answer_block(text_of(c))
        out.append(0.5 if block is not None and boxed_contents(block) else 0.0)
    return out


# -----------------------------------------------------------------------------
# Countdown and Sudoku rewards


def countdown_reward_func(prompts, completions, nums, target, **kw):
    """Last <answer>: none -> 0; numbers used differ from the given multiset -> 0.1; not an expression of digits,
    + - * / ( ) . and spaces -> 0.1; value within 1e-5 of the target -> 1.0, else 0.1. '**' is treated as invalid
    (0.1): the prompt only offers + - * /, and d1's eval of it is what can hang its trainer."""
    out = []
    for c, ns, t in zip(completions, nums, target):
        out.append(countdown_score(last_answer_block(text_of(c)), ns, t, partial=0.1))
    return out


def countdown_score(expr, nums, target, partial, python_power=False):
    """None -> 0; numbers other than the given multiset, or characters other than digits, + - * / ( ) . and spaces
    -> partial; value within 1e-5 of the target -> 1.0, else partial. python_power: safe_eval's d1 semantics."""
    if expr is None:
        return 0.0
    expr = expr.strip()
    used = numbers_in(expr)
    if used is None or sorted(used) != sorted(int(n) for n in nums):
        return partial
    if not re.fullmatch(r"[\d+\-*/().\s]+", expr):
        return partial
    v = safe_eval(expr, python_power)
    return 1.0 if v is not None and abs(v - float(target)) < 1e-5 else partial


def sudoku_cells(answer, puzzle, solution):
    """(correct blank cells, blank cells) for a 16-character answer string."""
    blanks = [i for i, ch in enumerate(puzzle) if ch == "0"]
    return sum(answer[i] == solution[i] for i in blanks), len(blanks)


def pad16(s):
    return (s + "0" * 16)[:16]


def sudoku_reward_func(prompts, completions, puzzle, solution, **kw):
    """Fraction of the puzzle's blank cells that the digits of the last <answer> block fill correctly."""
    out = []
    for c, p, s in zip(completions, puzzle, solution):
        block = last_answer_block(text_of(c))
        if block is None:
            out.append(0.0)
            continue
        correct, blanks = sudoku_cells(pad16("".join(re.findall(r"\d", block))), p, s)
        out.append(correct / blanks if blanks else 0.0)
    return out


# Reward sets per task: (function, weight). d1 sums GSM8K's five and MATH's two with weight 1.
REWARDS = {
    "gsm8k": [(xmlcount_reward_func, 1.0), (soft_format_reward_func, 1.0), (strict_format_reward_func, 1.0),
              (int_reward_func, 1.0), (correctness_reward_func, 1.0)],
    "math": [(math_correctness_reward_func, 1.0), (boxed_in_answer_reward_func, 1.0)],
    "countdown": [(countdown_reward_func, 1.0)],
    "sudoku": [(sudoku_reward_func, 1.0)],
}


def weighted_rewards(task, weights=None):
    """[(reward function, weight)] of a task: d1's functions, with d1's weights (all 1) unless `weights` (one per
    function, diffu_grpo.py --reward-weights) replaces them."""
    return [(f, w if weights is None else weights[i]) for i, (f, w) in enumerate(REWARDS[task])]


# The dataset columns each task's rewards read, as flags of the command line below.
COLUMNS = {"gsm8k": ["answer"], "math": ["answer"], "countdown": ["nums", "target"], "sudoku": ["puzzle", "solution"]}


def main(argv=None):
    ap = Parser(description="Score one completion with the rewards diffu-GRPO trains on: each "
                                 "reward function of the task, and the weighted sum (the training reward).")
    g = ap.add_argument_group("what to score")
    g.add_argument("--task", required=True, choices=sorted(REWARDS), help="the task, whose d1 rewards are used")
    g.add_argument("--completion", required=True, help="the model's completion text")
    c = ap.add_argument_group("the item's columns (the task says which it needs)")
    c.add_argument("--answer", help="gsm8k, math: the reference answer")
    c.add_argument("--nums", type=int, nargs="+", help="countdown: the numbers")
    c.add_argument("--target", type=int, help="countdown: the target")
    c.add_argument("--puzzle", help="sudoku: the puzzle, 16 digits with 0 for a blank")
    c.add_argument("--solution", help="sudoku: the solution, 16 digits")
    args = ap.parse_args(argv)
    missing = [f"--{k}" for k in COLUMNS[args.task] if getattr(args, k) is None]
    if missing:
        ap.error(f"--task {args.task} needs {' and '.join(missing)}")
    columns = {k: [getattr(args, k)] for k in COLUMNS[args.task]}
    total = 0.0
    for fn, w in weighted_rewards(args.task):
        v = fn([[{"role": "user", "content": ""}]], [args.completion], **columns)[0] or 0.0
        total += w * v
        print(f"{fn.__name__:<30} {v:.4f}" + (f"  (weight {w:g})" if w != 1 else ""))
    print(f"{'reward (the sum)':<30} {total:.4f}")
    return total


if __name__ == "__main__":
    main()
