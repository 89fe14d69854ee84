"""The trainers' configs and command lines: d1's recipe by default, the tiny preset for the tiny model and its
exports, a typed flag always wins, --help shows every default once in groups."""
import json
import re

import pytest

import diffu_grpo as D
import sft as S
from conftest import TINY


def test_the_tiny_model_never_inherits_the_8b_canvas_and_d1s_model_gets_d1s_recipe():
    tiny = S.get_args(["--model", TINY, "--task", "sudoku"])
    assert tiny.preset == "tiny" and tiny.max_length == 86 and tiny.lora_r == 0 and tiny.prompt_style == "compact"
    assert S.get_args(["--model", TINY]).task == "sudoku"
    countdown = S.get_args(["--model", TINY, "--task", "countdown"])
    assert countdown.data_path == "generate" and countdown.max_length == 96
    d1 = S.get_args(["--task", "s1k"])
    assert d1.preset == "d1" and d1.max_length == 4096 and d1.lora_r == 128 and d1.lr == 1e-5
    rl = D.get_args(["--model", TINY, "--task", "countdown"])
    assert rl.gen_length == 40 and rl.steps == 1 and rl.data_path == "generate" and rl.num_iterations == 2
    assert D.get_args(["--task", "gsm8k"]).num_iterations == 12 and D.get_args([]).temperature == 0.3


def test_an_export_of_a_tiny_run_gets_the_tiny_preset_and_typed_flags_win(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"args": {"preset": "tiny"}}))
    cfg = D.get_args(["--model", str(tmp_path), "--lr", "1e-4", "--max-steps", "8"])
    assert cfg.preset == "tiny" and cfg.gen_length == 40 and cfg.lr == 1e-4 and cfg.max_steps == 8
    assert D.get_args(["--model", str(tmp_path), "--preset", "d1"]).gen_length == 256
    assert S.get_args(["--model", TINY, "--max-length", "120"]).max_length == 120


def test_a_typed_step_count_that_is_not_whole_rollout_batches_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        D.get_args(["--num-iterations", "3", "--max-steps", "10"])
    assert e.value.code == 2 and "whole number of rollout batches" in capsys.readouterr().err
    assert D.get_args(["--num-iterations", "12"]).max_steps == 3804  # d1's 3800, rounded up to whole batches


@pytest.mark.parametrize("module", [S, D])
def test_help_shows_groups_and_every_default_once(module, capsys):
    with pytest.raises(SystemExit):
        module.get_args(["--help"])
    text = capsys.readouterr().out
    for group in ("model:", "data:", "d1's algorithm:", "optimisation:", "run and checkpoints:", "debugging probes:"):
        assert "\n" + group in text
    flat = re.sub(r"\s+", " ", text)
    assert "default: None" not in flat and not re.search(r"default: [^)]*\) \(default:", flat)
    assert "(default: 1e-05; tiny: 0.003)" in flat or "(default: 3e-06; tiny: 0.0003)" in flat
