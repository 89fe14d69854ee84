"""
Evaluation scoring of the four d1 tasks, two ways (eval.py --scoring d1|ours; summary.md shows both side by side):

  d1    bug for bug what d1's parse_and_get_acc.py computes, so our numbers are comparable with the paper's table.
        Its quirks (docs/scoring.md lists each with an example): GSM8K reads \\boxed{6,277} as 6.0 (a non-greedy
        regex, no brace matching, no commas); MATH and Countdown fall back to the WHOLE generation when there is
        no \\boxed (an <answer> block alone scores 0); Countdown evaluates Python's '**'; Sudoku's last pattern
        needs word boundaries around the 16 digits.
  ours  the same chain of fallbacks with those quirks fixed: brace-matched boxes, thousands separators, an
        <answer> fallback before the whole text.

Both are pure, linear-time and cannot hang: every regex of d1's that backtracks quadratically on hostile text is
replaced by an equivalent scan (the tests compare each against d1's regex on ordinary inputs).

Every score_* returns a dict with `correct` (bool) and `extracted` (what was parsed); Sudoku also counts cells.
"""

import re

from rewards import (MAX_CHARS, countdown_score, boxed_contents, first_answer_block, last_boxed, math_equiv, pad16,
                     strip_math_answer, sudoku_cells)

# -----------------------------------------------------------------------------
# Shared by both scorers


def sudoku_given_copied(answer, puzzle):
    """Given cells the answer reproduces: a health check (a model that writes one grid for every puzzle fails it),
    not part of d1's score."""
    return sum(answer[i] == ch for i, ch in enumerate(puzzle) if ch != "0")


def sudoku_puzzle_of(question):
    """d1 reads the puzzle from the question: its first 16 characters if they are digits, else the 16 digits after
    'Sudoku puzzle: '. (Our generated compact prompts: the last standalone run of 16 digits 0-4.)"""
    if re.fullmatch(r"\d{16}", question[:16]):
        return question[:16]
    m = re.search(r"Sudoku puzzle: ([0-9]{16})", question) or re.search(r"(?<!\d)([0-4]{16})(?!\d)", question)
    return m.group(1) if m else "0" * 16


def gsm8k_reference(answer):
    """'... #### 1,234' (or a bare number) -> 1234.0, as d1 converts its ground truth."""
    try:
        return float(str(answer).split("####")[-1].replace(",", "").strip())
    except ValueError:
        return None


# -----------------------------------------------------------------------------
# d1's parser, bug for bug

_D1_NUM = re.compile(r"-?\d+\.?\d*")


def _float(s):
    try:
        return float(s) if len(s) < 400 else None
    except ValueError:
        return None


def d1_boxed_lazy(text):
    """re.findall(r"\\\\boxed{(.*?)}", text): each \\boxed{ up to the next '}' on the same line (no brace
    matching), matches not overlapping. A scan that finds the same matches in linear time."""
    out, pos, close, nl = [], 0, -1, -1
    while True:
        i = text.find("\\boxed{", pos)
        if i < 0:
            return out
        start = i + 7
        if close < start:
            close = text.find("}", start)
            if close < 0:
                return out
        if nl < start:
            nl = text.find("\n", start)
        if nl < 0 or close < nl:
            out.append(text[start:close])
            pos = close + 1
        else:
            pos = start


def d1_parse_gsm8k(text):
    for c in d1_boxed_lazy(text):
        c = c.strip()
        if not c or set(c) == {"."}:  # empty, "..." or dots only: skipped
            continue
        v = _float(c)
        if v is not None:
            return v
        nums = _D1_NUM.findall(c)
        if nums:
            return float(nums[0])  # QUIRK: "6,277" -> 6.0
    block = first_answer_block(text)
    if block is not None:
        block = block.strip()
        v = _float(block)
        if v is not None:
            return v
        nums = _D1_NUM.findall(block)
        if nums:
            return float(nums[-1])
    return None


def d1_last_boxed_only_string(text):
    """MATH's last_boxed_only_string as d1 runs it: "\\boxed " (with a space) anywhere wins; else the last \\boxed
    (or \\fbox) with its braces matched (None if never closed); QUIRK: neither found -> the whole text."""
    if "\\boxed " in text:
        return "\\boxed " + text.split("\\boxed ")[-1].split("$")[0]
    idx = text.rfind("\\boxed")
    if idx < 0:
        idx = text.rfind("\\fbox")
        if idx < 0:
            return text
    depth = 0
    for i in range(idx, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[idx:i + 1]
    return None


def d1_remove_boxed(s):
    """Strips "\\boxed " or "\\boxed{...}"; any other string is returned as it is; None raises (as d1's does)."""
    if s.startswith("\\boxed "):
        return s[len("\\boxed "):]
    if s.startswith("\\boxed{") and s.endswith("}"):
        return s[len("\\boxed{"):-1]
    return s


def d1_parse_math(text):
    try:
        parsed = d1_remove_boxed(d1_last_boxed_only_string(text))
    except AttributeError:  # None: a \boxed whose braces never close
        parsed = None
    if not parsed:
        block = first_answer_block(text)
        parsed = block.strip() if block is not None else None
    return parsed


def d1_is_equiv(a, b):
    """MATH's is_equiv: both None -> True; one None -> False; normalised equality, or raw equality when the
    normalisation raises."""
    if a is None and b is None:
        return True
    if a is None or b is None:
        return False
    try:
        return strip_math_answer(a, d1=True) == strip_math_answer(b, d1=True)
    except Exception:
        return a == b


def _d1_equation_before_equals(equation):
    """re.search(r"([0-9+\\-*/() ]+)=[0-9. ]+", equation).group(1) in linear time: the first maximal run of those
    characters that is followed by '=' and then a digit, '.' or space (a shorter run is followed by a run
    character, never '=', so backtracking cannot find another match). None if there is none."""
    for m in re.finditer(r"[0-9+\-*/() ]+", equation):
        e = m.end()
        if equation[e:e + 1] == "=" and equation[e + 1:e + 2] and equation[e + 1] in "0123456789. ":
            return m.group(0)
    return None


def d1_parse_countdown(text):
    try:
        equation = d1_remove_boxed(d1_last_boxed_only_string(text))
    except AttributeError:
        block = first_answer_block(text)
        equation = block.strip() if block is not None else text
    equation = equation.replace("\\div", "/").replace("\\times", "*").replace("\\cdot", "*")
    before = _d1_equation_before_equals(equation)
    return before.strip() if before is not None else equation


def _d1_sudoku_answer(text):
    """The first of d1's five patterns whose group is non-empty after strip, each as re.search(..., re.DOTALL) would
    find it; patterns anchored on <answer> are tried from the first <answer> only (the lazy prefix .*? makes the
    first tag the leftmost possible start)."""
    first = text.find("<answer>")
    if first >= 0:  # 1. <answer>.*?```\s*([\d\s]+)```
        m = re.compile(r"```\s*([\d\s]+)```").search(text, first + 8)
        if m and m.group(1).strip():
            return m.group(1)
        # 2. <answer>(.*?)(?:<|eot_id|>|<|endoftext|>|</answer>)
        ends = [j for j in (text.find(t, first + 8) for t in ("<|eot_id|>", "<|endoftext|>", "</answer>")) if j >= 0]
        if ends and text[first + 8:min(ends)].strip():
            return text[first + 8:min(ends)]
    close = text.find("</answer>")
    if close >= 0:  # 3. </answer>\s*(.*?)(?:<|eot_id|>|<|endoftext|>|$)
        start = close + 9
        while start < len(text) and text[start].isspace():
            start += 1
        ends = [j for j in (text.find(t, start) for t in ("<|eot_id|>", "<|endoftext|>")) if j >= 0]
        ends.append(len(text) - 1 if text.endswith("\n") and len(text) - 1 >= start else len(text))
        if text[start:min(ends)].strip():
            return text[start:min(ends)]
    for p in (r"(\d{16})\s*</answer>", r"\b(\d{16})\b"):  # 4. .*?(\d{16})\s*</answer>   5. \b(\d{16})\b
        m = re.search(p, text)
        if m and m.group(1).strip():
            return m.group(1)
    return ""


def d1_parse_sudoku(text):
    return pad16(re.sub(r"\s", "", _d1_sudoku_answer(text)))


# -----------------------------------------------------------------------------
# Ours: the same fallbacks with d1's quirks fixed

_NUM = re.compile(r"-?\d[\d,]*\.?\d*|-?\.\d+")


def _to_float(s):
    try:
        s = s.replace(",", "").strip()
        return float(s) if len(s) < 40 else None
    except (ValueError, AttributeError):
        return None


def parse_gsm8k(text):
    """First brace-matched \\boxed{} whose content is a number; else the first number inside the first box; else
    the first <answer> block as a number, else its last number (thousands separators read as such)."""
    boxes = boxed_contents(text)
    for b in boxes:
        v = _to_float(b)
        if v is not None:
            return v
    if boxes:
        nums = _NUM.findall(boxes[0])
        if nums:
            return _to_float(nums[0])
    block = first_answer_block(text)
    if block is not None:
        v = _to_float(block)
        if v is not None:
            return v
        nums = _NUM.findall(block)
        if nums:
            return _to_float(nums[-1])
    return None


def parse_math(text):
    """The last brace-matched \\boxed{}, else the first <answer> block (never the whole text)."""
    b = last_boxed(text)
    if b is not None:
        return b
    block = first_answer_block(text)
    return block.strip() if block is not None else None


def parse_countdown(text):
    """The last \\boxed{}, else the first <answer> block, else the whole text; LaTeX operators to ASCII; a trailing
    '= number' dropped."""
    b = last_boxed(text)
    if b is None:
        b = first_answer_block(text)
        b = text if b is None else b
    b = b.replace("\\div", "/").replace("\\times", "*").replace("\\cdot", "*").strip()
    m = re.fullmatch(r"(.*?)=\s*-?[\d.]+\s*", b, re.DOTALL)
    return (m.group(1) if m else b).strip()


def parse_sudoku(text):
    """d1's five patterns, except that the 16 digits of the last pattern need not stand between word boundaries
    ('grid:1234...' counts), and text after </answer> stops at a special token (as d1's does)."""
    found = _d1_sudoku_answer(text)
    if not found:
        m = re.search(r"(?<!\d)(\d{16})(?!\d)", text)
        found = m.group(1) if m else ""
    return pad16(re.sub(r"\s", "", found))


# -----------------------------------------------------------------------------
# One entry point


def score(task, text, row, scoring="ours"):
    """Score one generation against a dataset row (answer; nums + target; puzzle + solution)."""
    text = text[:MAX_CHARS]
    d1 = scoring == "d1"
    if task == "gsm8k":
        pred, ref = (d1_parse_gsm8k if d1 else parse_gsm8k)(text), gsm8k_reference(row["answer"])
        return dict(extracted=pred, correct=pred is not None and ref is not None and pred == ref)
    if task == "math":
        pred = (d1_parse_math if d1 else parse_math)(text)
        return dict(extracted=pred, correct=bool((d1_is_equiv if d1 else math_equiv)(pred, str(row["answer"]))))
    if task == "countdown":
        expr = (d1_parse_countdown if d1 else parse_countdown)(text)
        # d1 evaluates with Python's eval (where it terminates: '**' included), ours with the reward's parser
        return dict(extracted=expr, correct=countdown_score(expr, row["nums"], row["target"], 0.0, d1) == 1.0)
    if task == "sudoku":
        ans = (d1_parse_sudoku if d1 else parse_sudoku)(text)
        correct, blanks = sudoku_cells(ans, row["puzzle"], row["solution"])
        return dict(extracted=ans, correct_cells=correct, blank_cells=blanks, correct=correct == blanks,
                    given_copied=sudoku_given_copied(ans, row["puzzle"]), given_cells=16 - blanks)
    raise ValueError(f"unknown task {task!r}")
