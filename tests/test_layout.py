"""The shape of the lesson: modules depend one way (d1's file knows nothing of the methods built on it), no module
holds two ideas' worth of lines, the README stays a newcomer's page, every script's --help is in groups, and a run
prints about 20 metric lines and ends by naming its export and what to run next."""
import ast
import glob
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, TINY

MODULES = sorted(os.path.basename(f)[:-3] for f in glob.glob(os.path.join(ROOT, "*.py")))


def imports_of(name):
    """The project modules a top-level module imports (anywhere in the file)."""
    tree = ast.parse(open(os.path.join(ROOT, name + ".py")).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(MODULES)


def test_modules_depend_one_way_and_d1_knows_nothing_of_the_methods():
    graph = {m: imports_of(m) for m in MODULES}
    assert "methods" not in graph["diffu_grpo"] and "diffu_grpo" in graph["methods"]
    state = {}

    def visit(m, path):
        assert state.get(m) != "open", f"import cycle: {' -> '.join(path + [m])}"
        if state.get(m) == "done":
            return
        state[m] = "open"
        for n in sorted(graph[m]):
            visit(n, path + [m])
        state[m] = "done"
    for m in MODULES:
        visit(m, [])


def test_no_module_is_over_600_lines_and_the_readme_is_a_page():
    lines = {m: sum(1 for _ in open(os.path.join(ROOT, m + ".py"))) for m in MODULES}
    assert max(lines.values()) <= 600, lines
    readme = open(os.path.join(ROOT, "README.md")).read().splitlines()
    assert len(readme) <= 200 and max(len(line) for line in readme) <= 120


def test_every_script_help_is_in_groups():
    scripts = ["sft.py", "diffu_grpo.py", "methods.py", "eval.py", "sample.py", "bench.py", "rewards.py"]
    procs = [subprocess.Popen([sys.executable, s, "--help"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
             for s in scripts]
    for script, p in zip(scripts, procs):
        out = p.communicate(timeout=300)[0]
        assert p.returncode == 0, script
        headings = [h for h in re.findall(r"^(\S[^\n]*):$", out, re.M) if h not in ("options", "usage")]
        assert len(headings) >= 2, (script, out)
        flags = re.findall(r"^  (--[a-z-]+)", out, re.M)
        assert flags and "--help" not in flags, script


def test_rewards_py_scores_a_completion_from_the_command_line():
    puzzle = ["--task", "sudoku", "--puzzle", "2403132442010140", "--solution", "2413132442313142", "--completion"]
    runs = [puzzle + ["<answer>2413132442313142</answer>"],
            puzzle + ["<answer>2413132442113142</answer>"],  # 3 of the puzzle's 4 blanks right
            ["--task", "countdown", "--completion", "1+2"]]
    procs = [subprocess.Popen([sys.executable, "rewards.py", *a], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for a in runs]
    (right, _), (part, _), (_, missing) = [p.communicate(timeout=300) for p in procs]
    assert procs[0].returncode == 0 and right.splitlines()[-1].split()[-1] == "1.0000", right
    assert float(part.splitlines()[-1].split()[-1]) == pytest.approx(0.75)
    assert procs[2].returncode == 2 and "--nums" in missing and "Traceback" not in missing


def test_a_run_prints_every_log_every_steps_and_the_last_then_names_its_export_and_next_commands(tmp_path, capsys):
    import sft
    sft.main(["--model", TINY, "--max-steps", "7", "--log-every", "3", "--eval-every", "0", "--eval-n", "8",
              "--out-dir", str(tmp_path / "s")])
    out = capsys.readouterr().out
    assert re.findall(r"^step (\d+) \|", out, re.M) == ["3", "6", "7"]
    final = str(tmp_path / "s" / "final")
    assert f"exported the trained model to {final}" in out
    for what in ("RL from it:", "evaluate it:", "watch it solve:"):
        line = next(line for line in out.splitlines() if what in line)
        assert final in line and ("python diffu_grpo.py" in line or "python eval.py" in line or "sample.py" in line)
