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


# Sudoku X: the two main diagonals must also hold 1-4 once. 48 of the 288 grids are Sudoku X grids. With
# rules="x" the generator makes puzzles whose solution is unique under the X rules but NOT under the plain ones: the
# diagonal rule is needed to solve them, so a label for a plain puzzle never teaches it.
DIAGONALS = ((0, 5, 10, 15), (3, 6, 9, 12))
RULES = ("sudoku", "x")


@lru_cache(maxsize=2)
def _rule_mask(rules):
    """(288,) bool: the grids valid under `rules`."""
    if rules == "sudoku":
        return np.ones(len(all_grids()), dtype=bool)
    return np.array([all(len({g[i] for i in d}) == 4 for d in DIAGONALS) for g in all_grids()])


def count_solutions(puzzle, rules="sudoku"):
    """How many of the 288 grids (valid under `rules`) agree with the puzzle's clues."""
    p = np.array([int(ch) for ch in puzzle], dtype=np.int8)
    clue = p > 0
    return int(((_grid_array()[:, clue] == p[clue]).all(1) & _rule_mask(rules)).sum())


def make_puzzle(solution, n_blanks, rng, rules="sudoku"):
    """Blank `n_blanks` cells of `solution` in random order, skipping any blank that would make the solution
    ambiguous under `rules`. Returns the puzzle, or None if this order cannot reach n_blanks while staying unique
    (rules="x": or if the puzzle is unique under the plain rules too, so that the diagonals would not matter)."""
    cells = list(range(16))
    rng.shuffle(cells)
    p = list(solution)
    blanks = 0
    for i in cells:
        if blanks == n_blanks:
            break
        keep, p[i] = p[i], "0"
        if count_solutions("".join(p), rules) == 1:
            blanks += 1
        else:
            p[i] = keep
    if blanks < n_blanks or (rules == "x" and count_solutions("".join(p)) < 2):
        return None
    return "".join(p)


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


def generate(n, split="train", seed=0, min_blanks=6, max_blanks=10, split_seed=0, n_test_grids=48, grids=None,
             rules="sudoku"):
    """n puzzles as dicts {puzzle, solution}, deterministic in (seed, split, ...). Solutions come only from the
    split's grids (or from `grids`) that are valid under `rules`; the number of blanks is uniform in
    [min_blanks, max_blanks] (rules="x" needs at least 4: fewer never leave the plain rules two solutions)."""
    if rules not in RULES:
        raise ValueError(f"rules={rules!r}: choose one of {RULES}")
    if not 1 <= min_blanks <= max_blanks <= MAX_BLANKS or (rules == "x" and min_blanks < 4):
        raise ValueError(f"need {4 if rules == 'x' else 1} <= min_blanks ({min_blanks}) <= max_blanks ({max_blanks}) "
                         f"<= {MAX_BLANKS}")
    train, test = split_grids(split_seed, n_test_grids)
    index = {g: i for i, g in enumerate(all_grids())}
    grids = [g for g in grids or {"train": train, "test": test}[split] if _rule_mask(rules)[index[g]]]
    rng = random.Random(f"{seed}-{split}" if rules == "sudoku" else f"{rules}{seed}-{split}")  # plain: as before
    out = []
    while len(out) < n:
        sol = rng.choice(grids)
        p = make_puzzle(sol, rng.randint(min_blanks, max_blanks), rng, rules)
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


if __name__ == "__main__":  # write a generated set in d1's CSV format (eval.py and diffu_grpo.py take --data-path)
    import argparse
    ap = argparse.ArgumentParser(description="Write generated 4x4 puzzles to a CSV in d1's format (Puzzle,Solution).")
    ap.add_argument("out", help="the CSV file to write")
    ap.add_argument("--rules", choices=RULES, default="sudoku", help="x: Sudoku X puzzles that need the diagonals")
    ap.add_argument("--split", choices=["train", "test"], default="train", help="whose solution grids to use")
    ap.add_argument("-n", type=int, default=1000, help="how many puzzles")
    ap.add_argument("--blanks", type=int, nargs=2, default=[6, 10], metavar=("MIN", "MAX"), help="blank cells")
    ap.add_argument("--seed", type=int, default=0, help="the generator's seed")
    a = ap.parse_args()
    try:
        rows = generate(a.n, a.split, a.seed, a.blanks[0], a.blanks[1], rules=a.rules)
    except ValueError as e:
        ap.error(str(e))  # one line, exit 2
    write_csv(rows, a.out)
    print(f"wrote {a.n} {a.rules} puzzles ({a.split} grids, {a.blanks[0]}-{a.blanks[1]} blanks) to {a.out}")
