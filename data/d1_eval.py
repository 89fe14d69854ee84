"""
d1's evaluation items and prompts, exactly (eval.py --protocol d1).

Items: GSM8K's test split in full and MATH500 in full, in order (hub, or --data-path); Countdown and Sudoku from d1's
own test files, shipped in data/d1/ (Apache-2.0, see data/d1/NOTICE.md), subset and order as d1 draws them: after
numpy.random.seed(42), numpy.random.choice(len(file), 256, replace=False). For Countdown (256 lines) that is a
permutation of the file.

Prompt: user turn = SYSTEM[task] + "\\n\\n" + question, rendered with the tokenizer's chat template (generation
prompt on), then "<reasoning>" appended after the assistant header (the prefill). The SYSTEM texts are d1's
evaluation prompts verbatim, quirks included: MATH500's has no space before its first newline and ends in a stray
'" \\n'; Countdown's runs "\\boxed{a + b * c}Respond" together. They differ from the training prompts (data/__init__).
"""

import json
import os

import numpy as np

from . import sudoku as sudoku_gen

D1_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "d1")
D1_FILES = {"countdown": os.path.join(D1_DIR, "countdown_cd3_test.jsonl"),
            "sudoku": os.path.join(D1_DIR, "4x4_test_sudoku.csv")}
D1_SUBSET, D1_SEED = 256, 42

_FORMAT = ("Respond in the following format:\n<reasoning>\nYour reasoning here\n</reasoning>\n<answer>\n\\boxed{...}\n"
           "</answer>")
SYSTEM = {
    "gsm8k": ("You are a math expert. You will be given a question to solve. Solve it step by step. Wrap the final "
              "answer in a \\boxed{}. \n" + _FORMAT),
    "math": ("You are a math expert. You will be given a question to solve. Solve it step by step. Wrap the final "
             "answer in a \\boxed{}.\n" + _FORMAT + "\" \n"),
    "countdown": ("Using only the provided numbers, create an arithmetic expression that evaluates to exactly the "
                  "provided target number. You may use the operations +, -, *, and / as needed, but each number must "
                  "be used exactly once. Think step-by-step. After reasoning, provide only your final expression "
                  "inside \\boxed{} tags without including an equals sign or the target number. For example: "
                  "\\boxed{a + b * c}" + _FORMAT),
}
PREFILL = "<reasoning>"


def subset_indices(n, task):
    """d1's item indices for a file of n items: a seeded draw of 256 for Countdown and Sudoku, all for the rest."""
    if task in ("countdown", "sudoku"):
        np.random.seed(D1_SEED)
        return [int(i) for i in np.random.choice(n, D1_SUBSET, replace=False)]
    return list(range(n))


def read_countdown(path):
    """d1's JSONL ({"input": "30,100,93", "output": "23"}) -> rows with nums and target."""
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                rows.append({"nums": [int(x) for x in str(r["input"]).split(",")], "target": int(r["output"])})
    return rows


def d1_row(task, r):
    """A source row -> {question (d1's question text), messages (the user turn), + the scoring columns}."""
    from data import SUDOKU_SYSTEM_PROMPT
    if task == "gsm8k":
        q, cols = r["question"], {"answer": str(r["answer"])}
    elif task == "math":
        q, cols = r["problem"], {"answer": str(r["answer"])}
    elif task == "countdown":
        q, cols = f"Numbers: {r['nums']}\nTarget: {r['target']}", {"nums": r["nums"], "target": r["target"]}
    else:
        q, cols = "Solve the following Sudoku puzzle: " + r["puzzle"] + "\n", {"puzzle": r["puzzle"],
                                                                             "solution": r["solution"]}
    system = SUDOKU_SYSTEM_PROMPT if task == "sudoku" else SYSTEM[task]
    return {"question": q, "prompt": [{"role": "user", "content": system + "\n\n" + q}], **cols}


def load_d1_eval(task, data_path=None):
    """d1's test items for `task`, in d1's order, as a list of rows (see d1_row)."""
    if task in D1_FILES:
        path = data_path or D1_FILES[task]
        src = read_countdown(path) if task == "countdown" else sudoku_gen.read_csv(path)
    else:
        from data import _hub, _local
        key = {"gsm8k": "gsm8k", "math": "math_test"}[task]
        ds = _local(data_path, "test") if data_path else _hub(key, "test")
        src = list(ds)
    return [d1_row(task, src[i]) for i in subset_indices(len(src), task)]
