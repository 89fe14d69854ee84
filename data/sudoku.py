"""
4x4 Sudoku for d1: all 288 valid grids, puzzles with a unique solution, and a train/test split that holds out whole
solution grids.

Why our own split: d1's training file has ~1M puzzles drawn from all 288 valid grids, so every test puzzle's solution
grid also appears (with other blanks) in training; a model can score by recalling grids. Here the 288 grids are
shuffled with a seed and a fixed set of them is reserved for test, so no test solution is ever seen in training
(a puzzle has a unique solution, so a train puzzle can never "contain" a test grid either).

A grid or puzzle is a 16-character string read left to right, top to bottom, '0' for a blank (d1's format).
"""

import csv
import random
from functools import lru_cache

import numpy as np


def _ok(grid, i, d):
    r, c = divmod(i, 4)
    box = [(r // 2 * 2 + dr) * 4 + c // 2 * 2 + dc for dr in range(2) for dc in range(2)]
    peers = {r * 4 + k for k in range(4)} | {k * 4 + c for k in range(4)} | set(box)
    return all(grid[j] != d for j in peers if j < i)


@lru_cache(maxsize=1)
def all_grids():
    """The 288 valid 4x4 Sudoku grids, in lexicographic order (backtracking over cells 0..15)."""
    out, grid = [], [0] * 16

    def fill(i):
        if i == 16:
            out.append("".join(map(str, grid)))
            return
        for d in range(1, 5):
            if _ok(grid, i, d):
                grid[i] = d
                fill(i + 1)
        grid[i] = 0

    fill(0)
    assert len(out) == 288
    return tuple(out)


@lru_cache(maxsize=1)
def _grid_array():
    return np.array([[int(ch) for ch in g] for g in all_grids()], dtype=np.int8)  # (288, 16)


def count_solutions(puzzle):
    """How many of the 288 grids agree with the puzzle's clues."""
    p = np.array([int(ch) for ch in puzzle], dtype=np.int8)
    clue = p > 0
    return int((_grid_array()[:, clue] == p[clue]).all(1).sum())


def make_puzzle(solution, n_blanks, rng):
    """Blank `n_blanks` cells of `solution` in random order, skipping any blank that would make the solution
    ambiguous. Returns the puzzle, or None if this order cannot reach n_blanks while staying unique."""
    cells = list(range(16))
    rng.shuffle(cells)
    p = list(solution)
    blanks = 0
    for i in cells:
        if blanks == n_blanks:
            break
        keep, p[i] = p[i], "0"
        if count_solutions("".join(p)) == 1:
            blanks += 1
        else:
            p[i] = keep
    return "".join(p) if blanks == n_blanks else None


def split_grids(seed=0, n_test_grids=48):
    """(train_grids, test_grids): a seeded shuffle of the 288 grids, the first n_test_grids held out for test."""
    grids = list(all_grids())
    random.Random(seed).shuffle(grids)
    return grids[n_test_grids:], grids[:n_test_grids]


MAX_BLANKS = 12  # a 4x4 Sudoku with a unique solution has at least 4 givens


VAL_GRIDS = 24  # training-split grids that diffu_grpo.py --eval-every reserves for validation


def validation_grids(split_seed=0, n_test_grids=48):
    """The last VAL_GRIDS of the training split's grids: RL validation puzzles use them, RL training puzzles not."""
    return split_grids(split_seed, n_test_grids)[0][-VAL_GRIDS:]


def generate(n, split="train", seed=0, min_blanks=6, max_blanks=10, split_seed=0, n_test_grids=48, grids=None):
    """n puzzles as dicts {puzzle, solution}, deterministic in (seed, split, ...). Solutions come only from the
    split's grids (or from `grids`); the number of blanks is uniform in [min_blanks, max_blanks]."""
    if not 1 <= min_blanks <= max_blanks <= MAX_BLANKS:
        raise ValueError(f"need 1 <= min_blanks ({min_blanks}) <= max_blanks ({max_blanks}) <= {MAX_BLANKS}")
    train, test = split_grids(split_seed, n_test_grids)
    grids = grids or {"train": train, "test": test}[split]
    rng = random.Random(f"{seed}-{split}")
    out = []
    while len(out) < n:
        sol = rng.choice(grids)
        p = make_puzzle(sol, rng.randint(min_blanks, max_blanks), rng)
        if p is not None:
            out.append({"puzzle": p, "solution": sol})
    return out


def write_csv(rows, path):
    """d1's CSV format: header Puzzle,Solution."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Puzzle", "Solution"])
        for r in rows:
            w.writerow([r["puzzle"], r["solution"]])


def read_csv(path):
    """d1's CSV files (Puzzle,Solution) -> list of {puzzle, solution}. Every row is checked, and the first bad one
    stops the run with the file, the line and what is wrong: a malformed row would otherwise be scored as a
    puzzle. A puzzle may have lost its leading zeros (a spreadsheet reading it as a number): it is padded back."""
    from model import UsageError
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"Puzzle", "Solution"} <= set(reader.fieldnames):
            raise UsageError(f"{path}:1: the header must name the columns Puzzle and Solution (d1's format)")
        out = []
        for r in reader:
            where = f"{path}:{reader.line_num}"
            p, s = str(r["Puzzle"] or "").strip(), str(r["Solution"] or "").strip()
            p = p.zfill(16) if p.isdigit() else p
            problem = check_puzzle(p, s)
            if problem:
                raise UsageError(f"{where}: {problem} (puzzle {p!r}, solution {s!r})")
            out.append({"puzzle": p, "solution": s})
    if not out:
        raise UsageError(f"{path}: no puzzles (a header and no rows)")
    return out


def check_puzzle(puzzle, solution):
    """What is wrong with a (puzzle, solution) pair, or None: the solution must be one of the 288 valid grids, the
    puzzle 16 characters of 0-4 whose given cells agree with it."""
    if len(solution) != 16 or solution not in set(all_grids()):
        return "the solution is not a valid 4x4 Sudoku grid of 16 digits 1-4"
    if len(puzzle) != 16 or set(puzzle) - set("01234"):
        return "the puzzle is not 16 characters of 0-4"
    if any(c != "0" and c != g for c, g in zip(puzzle, solution)):
        return "the puzzle's given cells disagree with the solution"
    return None
