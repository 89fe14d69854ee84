"""
The task registry every script uses: `--task gsm8k|math|countdown|sudoku` (and `s1k` for SFT).

load_task(name, split) returns a datasets.Dataset whose rows have
    prompt   - a chat message list [{"role": "user", "content": ...}] with d1's exact prompt text
    + the columns the task's reward and scoring need: answer (gsm8k, math); nums, target (countdown);
      puzzle, solution (sudoku); and `completion` (target text for SFT) where the source has one.

Sources: the hub ids d1 uses, a local file or directory (`--data-path`), or, for Sudoku and Countdown, this
project's generators (no download at all). Two prompt styles: "d1" (the published text, the default) and
"compact" (no system prompt, a minimal instruction and a short answer format: a character-level tiny model cannot
afford d1's ~700-character Sudoku prompt on a CPU).
"""

import os

from . import countdown as countdown_gen
from . import sudoku as sudoku_gen

# ----------------------------------------------------------------------------- d1's prompts, verbatim
SYSTEM_PROMPT = "\nRespond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n"
SUDOKU_SYSTEM_PROMPT = (
    "\nPlease solve the following 4x4 Sudoku puzzle. The puzzle is provided as a 16-character string reading "
    "left-to-right, top-to-bottom, where '0' represents empty cells.\n\nRules:\n- Fill empty cells with digits 1-4\n"
    "- Each row must contain digits 1-4 exactly once\n- Each column must contain digits 1-4 exactly once\n"
    "- Each 2x2 box must contain digits 1-4 exactly once\n\nImportant: Your solution must be a COMPLETE "
    "16-character string with only the digits 1-4, representing your final solved grid.\n\nRespond in this exact "
    "format:\n<reasoning>\nYour step-by-step solving process\n</reasoning>\n<answer>\n[16-character solution string "
    "with no spaces or separators]\n</answer>\n")
COUNTDOWN_INSTRUCTION = (
    "\nUsing only the numbers {nums}, create an arithmetic expression that evaluates to exactly {target}. You must use "
    "all numbers from the list, and each number must be used exactly once. You may use the operations +, -, *, and / "
    "as needed. After reasoning, provide only your final expression inside <answer></answer> tags without including "
    "an equals sign or the target number. For example, if the numbers are [2, 3, 4] and the target is 5, a valid "
    "answer is: <answer>\n2*4-3\n</answer>")
MATH_INSTRUCTION = ("You are a math expert. You will be given a question to solve. Solve it step by step. Wrap the "
                    "final answer in a \\boxed{}. ")
EVAL_MATH_PROMPT = (MATH_INSTRUCTION + "\nRespond in the following format:\n<reasoning>\nYour reasoning here\n"
                    "</reasoning>\n<answer>\n\\boxed{...}\n</answer>")
EVAL_PREFILL = "<reasoning>"  # d1's evaluation appends this after the assistant header, for every task

HUB = {"gsm8k": ("openai/gsm8k", "main"), "math_train": ("ankner/math-500", None),
       "math_test": ("HuggingFaceH4/MATH-500", None), "countdown": ("Jiayi-Pan/Countdown-Tasks-3to4", None),
       "s1k": ("simplescaling/s1K", None)}
TASKS = ("gsm8k", "math", "countdown", "sudoku", "s1k")
EVAL_SIZE = {"countdown": 256, "sudoku": 256}  # d1 evaluates 256 items of each; GSM8K and MATH500 in full


BLANKS = (6, 10)  # generated Sudoku's default blank cells per puzzle, uniform in [6, 10]


def add_sudoku_args(ap):
    """The generator's difficulty knob for eval.py (the trainers declare the same flag in their configs)."""
    ap.add_argument("--blanks", type=int, nargs=2, default=list(BLANKS), metavar=("MIN", "MAX"),
                    help=f"generated Sudoku: blank cells per puzzle, uniform in [MIN, MAX] (fewer = easier; a puzzle "
                         f"is solved only if every blank is right; default: {BLANKS[0]} {BLANKS[1]})")


def sudoku_kwargs(task, blanks):
    """load_task keyword arguments from --blanks (none for other tasks)."""
    return dict(min_blanks=blanks[0], max_blanks=blanks[1]) if task == "sudoku" else {}


def user(content):
    return [{"role": "user", "content": content}]


# ----------------------------------------------------------------------------- prompt builders (row -> row)


def gsm8k_row(r, style, purpose):
    answer = str(r["answer"]).split("####")[-1].strip().replace(",", "")
    if style == "compact":
        prompt = user(r["question"] + "\nGive the number as <answer>N</answer>.")
    elif purpose == "eval":
        prompt = user(EVAL_MATH_PROMPT + "\n\n" + r["question"])
    else:
        prompt = user(SYSTEM_PROMPT + "\n\n" + r["question"])
    return {"prompt": prompt, "question": r["question"], "answer": answer}


def math_row(r, style, purpose):
    from rewards import last_boxed
    answer = r.get("answer") or last_boxed(r.get("solution", "")) or ""
    problem = r["problem"]
    if style == "compact":
        prompt = user(problem + "\nPut the answer in \\boxed{}.")
    elif purpose == "eval":
        prompt = user(EVAL_MATH_PROMPT + "\n\n" + problem)
    else:
        prompt = user(SYSTEM_PROMPT + "\n\n" + MATH_INSTRUCTION + "\n\n" + problem)
    return {"prompt": prompt, "question": problem, "answer": answer}


def countdown_row(r, style, purpose):
    nums, target = [int(n) for n in r["nums"]], int(r["target"])
    if style == "compact":
        prompt = user(f"{' '.join(map(str, nums))} -> {target}")
    elif purpose == "eval":  # the question d1's evaluation asks, under the same instruction as training
        prompt = user(SYSTEM_PROMPT + COUNTDOWN_INSTRUCTION.format(nums=nums, target=target)
                      + f"\n\nNumbers: {nums}\nTarget: {target}")
    else:
        prompt = user(SYSTEM_PROMPT + COUNTDOWN_INSTRUCTION.format(nums=nums, target=target))
    out = {"prompt": prompt, "question": f"Numbers: {nums}\nTarget: {target}", "nums": nums, "target": target}
    if r.get("solution"):
        out["completion"] = completion_text(r["solution"], style)
    return out


def sudoku_row(r, style, purpose):
    if style == "compact":
        prompt = user(f"sudoku {r['puzzle']}")
    else:
        prompt = user(SUDOKU_SYSTEM_PROMPT + f"\n\nSolve the following Sudoku puzzle: {r['puzzle']}\n")
    return {"prompt": prompt, "question": r["puzzle"], "puzzle": r["puzzle"], "solution": r["solution"],
            "completion": completion_text(r["solution"], style)}


def s1k_row(r, style, purpose):
    traj = r["thinking_trajectories"]
    traj = traj[0] if isinstance(traj, (list, tuple)) else traj
    return {"prompt": user(SYSTEM_PROMPT + "\n\n" + r["question"]), "question": r["question"],
            "completion": f"<reasoning>{traj}</reasoning>\n<answer>{r['attempt']}</answer>"}


def completion_text(answer, style):
    """SFT target text for generated tasks (no reasoning trace exists for them)."""
    if style == "compact":
        return f"<answer>{answer}</answer>"
    return f"<reasoning>\n</reasoning>\n<answer>\n{answer}\n</answer>"


ROW = {"gsm8k": gsm8k_row, "math": math_row, "countdown": countdown_row, "sudoku": sudoku_row, "s1k": s1k_row}


# ----------------------------------------------------------------------------- sources


def _hub(key, split):
    import datasets
    from model import UsageError
    from weights import hub_reachable
    hub_id, config = HUB[key]
    try:
        if not hub_reachable():  # a cached copy or nothing, now rather than after half a minute of retries
            datasets.config.HF_HUB_OFFLINE = True
        return datasets.load_dataset(hub_id, config, split=split)
    except Exception as e:
        raise UsageError(
            f"Could not load dataset {hub_id!r} (split {split!r}) from the Hugging Face hub "
            f"({type(e).__name__}: {str(e)[:160]}). Download it where you have network and pass the local copy: "
            f"--data-path FILE_OR_DIR (a .jsonl/.json/.csv/.parquet file or a dataset directory)") from None


def _local(path, split):
    import datasets
    from model import UsageError
    if os.path.isdir(path):
        try:
            if os.path.exists(os.path.join(path, "dataset_info.json")) or \
                    os.path.exists(os.path.join(path, "state.json")):
                return datasets.load_from_disk(path)
            return datasets.load_dataset(path, split=split)
        except Exception as e:  # an empty directory, another split, a folder of something else
            raise UsageError(f"--data-path {path}: cannot be read as a dataset directory ({type(e).__name__}: "
                             f"{str(e)[:160]})") from None
    if not os.path.exists(path):
        raise UsageError(f"--data-path {path!r} does not exist")
    ext = os.path.splitext(path)[1].lstrip(".")
    kind = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(ext)
    if kind is None:
        raise UsageError(f"--data-path {path!r}: use a .jsonl, .json, .csv or .parquet file")
    if ext == "jsonl":
        check_jsonl(path)
    try:
        return datasets.load_dataset(kind, data_files=path, split="train")
    except Exception as e:  # pyarrow's parse errors are long and name neither the file nor the line
        raise UsageError(f"{path}: cannot be read as {ext} ({type(e).__name__}: {str(e)[:160]})") from None


def check_jsonl(path):
    """Every non-empty line of a .jsonl file is one JSON object; the first that is not is named with its line."""
    import json
    from model import UsageError
    n = 0
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:{i}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise UsageError(f"{path}:{i}: a row must be a JSON object, not {type(row).__name__}")
            n += 1
    if not n:
        raise UsageError(f"--data-path {path}: no rows (an empty file)")


# The columns each task's rows must have, non-empty (math: an answer, or a solution with a \boxed{} answer).
REQUIRED = {"gsm8k": ("question", "answer"), "math": ("problem",), "countdown": ("nums", "target"),
            "s1k": ("question", "thinking_trajectories", "attempt")}


def check_rows(ds, name, source):
    """Stop at the first row a task cannot use, naming the source, the row (= the line of a .jsonl file) and what
    is missing; a file with rows a reward would silently score as 0 is a mistake, not data."""
    from model import UsageError
    need = REQUIRED.get(name, ())
    absent = [c for c in need if c not in ds.column_names]
    if absent:
        raise UsageError(f"{source}: no column {absent[0]!r}; {name} rows need {', '.join(need)}")
    for i, r in enumerate(ds):
        empty = [c for c in need if r[c] is None or (isinstance(r[c], (str, list)) and not r[c])]
        if name == "math" and not (r.get("answer") or "\\boxed" in str(r.get("solution") or "")):
            empty.append("answer (or a solution with \\boxed{})")
        if empty:
            raise UsageError(f"{source}: row {i + 1} has no {empty[0]}")


def load_task(name, split="train", data_path=None, style="d1", n=None, seed=0, purpose=None, **gen_kw):
    """Rows of task `name` for `split` ('train' or 'test'). purpose 'train' (RL/SFT prompt) or 'eval' (d1's
    zero-shot evaluation prompt); by default 'eval' for the test split. n limits the number of rows (generated
    tasks: how many to generate). Sudoku/Countdown accept data_path='generate' (the default for Sudoku, and for
    Countdown's test split)."""
    import datasets
    datasets.disable_progress_bars()
    if name not in TASKS:
        raise ValueError(f"--task {name!r}: choose one of {', '.join(TASKS)}")
    if style not in ("d1", "compact"):
        raise ValueError(f"--prompt-style {style!r}: choose 'd1' or 'compact'")
    purpose = purpose or ("eval" if split == "test" else "train")
    if name == "sudoku":
        if data_path and data_path != "generate":
            rows = sudoku_gen.read_csv(data_path)
        else:
            size = n or (EVAL_SIZE["sudoku"] if split == "test" else 10_000)
            rows = sudoku_gen.generate(size, split, seed=seed, **gen_kw)
        ds = datasets.Dataset.from_list(rows)
    elif name == "countdown" and (data_path == "generate" or (data_path is None and split == "test")):
        size = n or (EVAL_SIZE["countdown"] if split == "test" else 10_000)
        ds = datasets.Dataset.from_list(countdown_gen.generate(size, seed=seed + (0 if split == "train" else 10_000)))
    elif data_path:
        ds = _local(data_path, split)
        check_rows(ds, name, f"--data-path {data_path}")
    else:
        key = {"math": "math_train" if split == "train" else "math_test"}.get(name, name)
        ds = _hub(key, "train" if name in ("countdown", "s1k") else split)
    if data_path not in (None, "generate") and len(ds) == 0:
        from model import UsageError
        raise UsageError(f"--data-path {data_path}: no rows (an empty file, or a header and no rows)")
    if name == "countdown":
        before = len(ds)
        ds = ds.filter(lambda r: len(r["nums"]) == 3)  # d1 keeps the 3-number items
        if len(ds) == 0:
            from model import UsageError
            raise UsageError(f"{data_path or HUB['countdown'][0]}: none of its {before} rows has 3 numbers (d1 "
                             f"keeps the 3-number Countdown items)")
    if n is not None and len(ds) > n:
        ds = ds.select(range(n))
    fn = ROW[name]
    return ds.map(lambda r: fn(r, style, purpose), remove_columns=ds.column_names)


# ----------------------------------------------------------------------------- RL's training / validation split


def rl_split(task, data_path, style, train_n, eval_n, seed, blanks=BLANKS):
    """(training prompts, validation prompts) for diffu_grpo.py --eval-every: disjoint from each other and from
    every test item. Generated Sudoku: validation puzzles on VAL_GRIDS training-split grids that training puzzles
    never use (so validation measures solving, not recall); other tasks: the last eval_n rows of the training split,
    removed from training."""
    kw = sudoku_kwargs(task, blanks)
    if task == "sudoku" and data_path in (None, "generate"):
        held = set(sudoku_gen.validation_grids())
        rows = load_task(task, "train", data_path, style, n=train_n, seed=seed, **kw)
        rows = rows.filter(lambda r: r["solution"] not in held)
        import datasets
        val = sudoku_gen.generate(eval_n, "train", seed=seed + 2_000_003, grids=sorted(held), min_blanks=blanks[0],
                                  max_blanks=blanks[1])
        return rows, datasets.Dataset.from_list(val).map(lambda r: ROW["sudoku"](r, style, "train"))
    rows = load_task(task, "train", data_path, style, n=None if train_n is None else train_n + eval_n, seed=seed, **kw)
    if len(rows) <= eval_n:
        from model import UsageError
        raise UsageError(f"--eval-n {eval_n} leaves no training prompts of the {len(rows)} available")
    return rows.select(range(len(rows) - eval_n)), rows.select(range(len(rows) - eval_n, len(rows)))


# ----------------------------------------------------------------------------- SFT's training / validation split


def sft_split(task, data_path, style, train_n, eval_n, eval_frac, seed, blanks=BLANKS, sudoku_answers="solutions"):
    """(training rows, validation rows) for sft.py. Validation rows never come from the test split: the validation
    loss picks the model (--keep-best, --patience) and evaluation must not. They are the tail of the training rows
    (eval_n of them, or eval_frac of the set when eval_n is None; d1: 1% of s1K), except for generated Sudoku, where
    they are fresh puzzles on training-split grids that no labelled puzzle uses (a puzzle on a memorised grid would
    flatter the loss)."""
    sudoku = task == "sudoku" and data_path in (None, "generate")
    if eval_n is None and train_n is not None:
        eval_n = max(1, round(eval_frac * train_n))
    n_total = None if train_n is None else train_n + (0 if sudoku else eval_n)
    kw = sudoku_kwargs(task, blanks)
    rows = load_task(task, "train", data_path, style, n=n_total, seed=seed, **kw)
    if sudoku_answers == "random":
        rows = random_fill_answers(rows, seed, style)
    if eval_n is None:
        eval_n = max(1, round(eval_frac * len(rows)))
    if not sudoku:
        if len(rows) <= eval_n:
            from model import UsageError
            raise UsageError(f"{data_path or task}: {len(rows)} rows, and {eval_n} are held out for validation: none "
                             f"is left to train on (pass --eval-n or --eval-frac smaller, or more rows)")
        return rows.select(range(len(rows) - eval_n)), rows.select(range(len(rows) - eval_n, len(rows)))
    held = sudoku_validation(rows, eval_n, style, seed, kw)
    return rows, random_fill_answers(held, seed + 1, style) if sudoku_answers == "random" else held


def sudoku_validation(rows, n, style, seed, kw):
    """n generated Sudoku puzzles on training-split grids that none of `rows` uses; when the labelled set uses every
    training grid, new puzzles of seen grids instead (said so)."""
    seen, labelled = set(rows["solution"]), set(rows["puzzle"])
    pool = load_task("sudoku", "train", None, style, n=max(1000, 20 * n), seed=seed + 1_000_003, **kw)
    held = pool.filter(lambda r: r["solution"] not in seen)
    if len(held) < n:
        if os.environ.get("RANK", "0") == "0":  # once per torchrun launch
            print(f"note: the {len(rows)} labelled puzzles use {len(seen)} grids, leaving too few for validation; "
                  f"validating on new puzzles of seen grids", flush=True)
        held = pool.filter(lambda r: r["puzzle"] not in labelled)
    return held.select(range(min(n, len(held))))


def random_fill_answers(rows, seed, style):
    """Sudoku rows whose SFT answer is the puzzle with each blank ('0') replaced by a random digit 1-4 (seeded):
    the answer's format and its given cells are right, its blank cells carry no information about the solution
    (sft.py --sudoku-answers random: SFT that teaches the format and no Sudoku, like d1's s1K)."""
    import random
    rng = random.Random(seed)
    fill = lambda p: "".join(str(rng.randint(1, 4)) if ch == "0" else ch for ch in p)
    texts = [completion_text(fill(p), style) for p in rows["puzzle"]]
    return rows.remove_columns("completion").add_column("completion", texts)
