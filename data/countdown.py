"""
Countdown with 3 numbers (d1's setting): reach the target with + - * / using each number exactly once.
A generator of solvable instances (numbers 1-100, targets 1-100, like d1's 256-item test set) for offline use,
demos and tests; the hub loader lives in data/__init__.py.
"""

import itertools
import random


def _wrap(e):
    return e if e.isdigit() else f"({e})"


def _combine(a, b):
    """All (value, expression) pairs from two sub-results with one operator (exact division only)."""
    (va, ea), (vb, eb) = a, b
    yield va + vb, f"{ea}+{eb}"
    yield va - vb, f"{ea}-{_wrap(eb)}"
    yield va * vb, f"{_wrap(ea)}*{_wrap(eb)}"
    if vb != 0 and va % vb == 0:
        yield va // vb, f"{_wrap(ea)}/{_wrap(eb)}"


def solutions(nums):
    """{integer value: one expression} over every order and bracketing of the three numbers."""
    out = {}
    for a, b, c in itertools.permutations(nums):
        A, B, C = (a, str(a)), (b, str(b)), (c, str(c))
        for ab in _combine(A, B):
            for v, e in _combine(ab, C):
                out.setdefault(v, e)
        for bc in _combine(B, C):
            for v, e in _combine(A, bc):
                out.setdefault(v, e)
    return out


def generate(n, seed=0, lo=1, hi=100, target_lo=1, target_hi=100):
    """n dicts {nums: [a, b, c], target, solution}, deterministic for a seed; every instance is solvable."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        nums = [rng.randint(lo, hi) for _ in range(3)]
        sols = {v: e for v, e in solutions(nums).items() if target_lo <= v <= target_hi}
        if not sols:
            continue
        target = rng.choice(sorted(sols))
        out.append({"nums": nums, "target": target, "solution": sols[target]})
    return out
