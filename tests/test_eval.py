import json
import os

import pytest
import torch

import eval as E
import model as M
from conftest import ARCH, TINY, launch, llada_only

TINY_EVAL = ["--model", TINY, "--protocol", "clean", "--prompt-style", "compact", "--gen-length", "32", "--block-length", "16",
             "--limit", "5", "--batch-size", "2"]


@pytest.mark.parametrize("task,text,truth,question,correct", [
    ("gsm8k", "<reasoning>..</reasoning><answer>\\boxed{72}</answer>", "72", "", True),
    ("gsm8k", "<answer>it is 7 then 72</answer>", "72", "", True),  # last number of the answer block
    ("gsm8k", "\\boxed{73}", "72", "", False),
    ("math", "so \\boxed{\\dfrac{1}{2}}", "0.5", "", True),
    ("math", "<answer>x = 3</answer>", "3", "", True),  # no box: the answer block, normalised
    ("countdown", "<answer>44+19+35</answer>", [[44, 19, 35], 98], "", True),
    ("countdown", "\\boxed{44 \\times 2}", [[44, 2], 88], "", True),
    ("countdown", "<answer>44+19</answer>", [[44, 19, 35], 98], "", False),
    ("sudoku", "<answer>\n1432324141232314\n</answer>", "1432324141232314", "puzzle 1030020040000301", True),
])
def test_scoring_of_hand_written_generations(task, text, truth, question, correct):
    assert E.score_generation(task, text, truth, question)["ours"]["correct"] is correct


def test_rescore_of_reference_format_files_aggregates_ranks_by_hand(tmp_path):
    gsm = [{"question": "q1", "prompt_input": "p", "generations": "\\boxed{3}", "ground_truth": "3"},
           {"question": "q2", "prompt_input": "p", "generations": "<answer>5</answer>", "ground_truth": "4"}]
    gsm_r1 = [{"question": "q3", "prompt_input": "p", "generations": "\\boxed{1,000}", "ground_truth": "1000"}]
    sud = [{"question": "Solve the following Sudoku puzzle: 1030020040000301", "prompt_input": "p",
            "generations": "<answer>1432324141232314</answer>", "ground_truth": "1432324141232314"},
           {"question": "Solve the following Sudoku puzzle: 1030020040000301", "prompt_input": "p",
            "generations": "<answer>1232324141232314</answer>", "ground_truth": "1432324141232314"}]
    files = []
    for name, gens in [("gsm8k_256_rank0.json", gsm), ("gsm8k_256_rank1.json", gsm_r1), ("sudoku_128_rank0.json", sud)]:
        (tmp_path / name).write_text(json.dumps({"generations": gens, "metrics": {}}))
        files.append(str(tmp_path / name))
    summary = E.rescore(files)  # d1's parser by default: "\\boxed{1,000}" is 1.0 for it, 1000 for ours
    assert summary[("gsm8k", 256)]["n"] == 3 and summary[("gsm8k", 256)]["accuracy"] == pytest.approx(1 / 3)
    assert summary[("gsm8k", 256)]["accuracy_ours"] == pytest.approx(2 / 3)
    # Sudoku: 10 blanks per puzzle; the second answer gets cell 1 wrong -> (10 + 9) / 20 cells, 1 of 2 solved
    assert summary[("sudoku", 128)]["accuracy"] == pytest.approx(19 / 20)
    assert summary[("sudoku", 128)]["solved"] == pytest.approx(0.5)


def records(path):
    drop = ("tokens_per_s", "batch_seconds")  # wall-clock timings differ between any two runs
    return [{k: v for k, v in json.loads(l).items() if k not in drop} for l in open(path)]


def test_tiny_run_writes_jsonl_and_table_and_a_second_run_resumes(tmp_path, monkeypatch):
    out = str(tmp_path / "ev")
    E.main(TINY_EVAL + ["--task", "sudoku", "--out-dir", out])
    E.main(TINY_EVAL + ["--task", "countdown", "--out-dir", out])
    recs = records(os.path.join(out, "generations.jsonl"))
    assert [(r["task"], r["idx"]) for r in recs] == [("countdown", i) for i in range(5)] + \
        [("sudoku", i) for i in range(5)]
    table = open(os.path.join(out, "summary.md")).read()
    assert "| sudoku | 32 | 5 |" in table and "| countdown | 32 | 5 |" in table
    calls = []
    real = E.generate
    monkeypatch.setattr(E, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    E.main(TINY_EVAL + ["--task", "sudoku", "--out-dir", out])
    assert calls == []  # everything was already there
    assert records(os.path.join(out, "generations.jsonl")) == recs


def test_two_rank_gloo_run_gives_the_same_records_as_one_rank(tmp_path):
    args = TINY_EVAL + ["--task", "sudoku"]
    launch("eval.py", args + ["--out-dir", str(tmp_path / "one")])
    launch("eval.py", args + ["--out-dir", str(tmp_path / "two")], nproc=2)
    assert records(tmp_path / "one" / "generations.jsonl") == records(tmp_path / "two" / "generations.jsonl")


@llada_only
def test_d1_protocol_scores_do_not_depend_on_batch_size_and_records_what_was_encoded(tmp_path):
    """d1's protocol on d1's own Sudoku file: with the attention mask, batch 1 and batch 5 give the same
    generations (d1's unmasked batches would not); each record keeps d1's question and the exact input text."""
    base = ["--model", TINY, "--gen-length", "32", "--block-length", "16", "--limit", "5", "--task", "sudoku"]
    E.main(base + ["--batch-size", "1", "--out-dir", str(tmp_path / "b1")])
    E.main(base + ["--batch-size", "5", "--out-dir", str(tmp_path / "b5")])
    a, b = records(tmp_path / "b1" / "generations.jsonl"), records(tmp_path / "b5" / "generations.jsonl")
    assert [r["generation"] for r in a] == [r["generation"] for r in b]
    assert a[0]["question"].startswith("Solve the following Sudoku puzzle: ") and a[0]["question"].endswith("\n")
    assert a[0]["input_text"].endswith("<|start_header_id|>assistant<|end_header_id|>\n\n<reasoning>")
    summary = open(tmp_path / "b1" / "summary.md").read()
    assert "d1 parser %" in summary and "our parser %" in summary


@llada_only
def test_d1_protocol_scores_the_whole_canvas_with_special_tokens_and_clean_stops_at_eos():
    tok = M.tiny_tokenizer(ARCH)
    text = "<answer>\n1234123412341234\n</answer>"
    ids = tok(text + "<|eot_id|><|endoftext|><|endoftext|>" + "77", add_special_tokens=False)["input_ids"]
    completion = torch.tensor([ids])
    assert E.decode_for_scoring(tok, completion, tok.eos_token_id, "d1") == \
        [text + "<|eot_id|><|endoftext|><|endoftext|>77"]
    assert E.decode_for_scoring(tok, completion, tok.eos_token_id, "clean") == [text]


def test_a_rerun_with_other_settings_into_the_same_out_dir_is_refused(tmp_path):
    out = str(tmp_path / "ev")
    E.main(TINY_EVAL + ["--task", "sudoku", "--out-dir", out])
    with pytest.raises(M.UsageError, match="other settings"):  # it would otherwise report the first run's items
        E.main(TINY_EVAL + ["--task", "sudoku", "--temperature", "1.0", "--out-dir", out])


def test_sampled_evaluation_is_reproducible_per_seed(tmp_path):
    def gens(seed, name):
        E.main(TINY_EVAL + ["--task", "sudoku", "--temperature", "1.0", "--seed", str(seed),
                            "--out-dir", str(tmp_path / name)])
        return [r["generation"] for r in records(tmp_path / name / "generations.jsonl")]
    a = gens(0, "a")
    assert gens(0, "b") == a and gens(1, "c") != a
