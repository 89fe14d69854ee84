"""The fidelity ledger (docs/fidelity.md) is the single statement of d1's recipe as run. These tests read it: the
defaults of every script must equal its d1 column, and every test it cites must exist."""
import os
import re

import pytest

import diffu_grpo as D
import eval as E
import sft as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEDGER = open(os.path.join(ROOT, "docs", "fidelity.md")).read()
SCRIPTS = {"diffu_grpo.py": D.get_args, "sft.py": S.get_args, "eval.py": E.get_args}


def recipe_rows():
    """(command, flag, d1 value) from section 1's table."""
    section = LEDGER.split("## 1.")[1].split("## 2.")[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[1].startswith("--") and not cells[1].startswith("---"):
            rows.append((cells[0], cells[1], cells[2]))
    return rows


def normalise(v):
    """Compare flag values as the command line writes them: numbers as floats, lists space-joined."""
    if isinstance(v, (list, tuple)):
        return " ".join(str(normalise(x)) for x in v)
    if isinstance(v, bool):
        return str(v)
    try:
        return float(v)
    except (TypeError, ValueError):
        return str(v)


def test_the_ledger_lists_the_recipe():
    rows = recipe_rows()
    assert len(rows) >= 40
    assert ("diffu_grpo.py --task sudoku", "--lora-targets", "q_proj,k_proj,v_proj,up_proj") in rows


@pytest.mark.parametrize("command,flag,d1", recipe_rows())
def test_defaults_equal_the_ledgers_d1_column(command, flag, d1):
    script, *argv = command.split()
    args = SCRIPTS[script](argv)
    value = getattr(args, flag.lstrip("-").replace("-", "_"))
    if flag == "--lora-targets" and script == "diffu_grpo.py":
        value = ",".join(D.lora_targets(value))
    assert normalise(value) == normalise(d1), f"{command} {flag}: default {value!r}, d1 ran {d1!r}"


def test_every_test_the_ledger_cites_exists():
    cited = set(re.findall(r"`tests/(test_\w+\.py)(?:::(\w+))?", LEDGER))
    assert cited
    for path, name in cited:
        src = open(os.path.join(ROOT, "tests", path)).read()
        if name:
            assert re.search(rf"^def {name}\(", src, re.M), f"docs/fidelity.md cites tests/{path}::{name}"
